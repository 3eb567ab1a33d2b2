"""Training state on disk: the state files and their atomic swap, the run settings that --resume compares, every
random state, and DeepSpeed's checkpoint read weights-only."""
import hashlib
import os
import random
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_tensors
from .errors import CheckpointError, TrainError
from .files import atomic_write, first_line
from .LMConfig import SHAPE_FLAGS


STATE_FORMAT = "minimind-train-state-2"  # 2: random states as tensors, so weights_only=True loads it


class StateFiles:
    """`<stem>.state.pt` is the latest good training state, `<stem>.state.prev.pt` the one before it.
    A new state is written to a temporary file and renamed in; the previous one survives until then.
    States are read with weights_only=True: a state file cannot run code."""

    def __init__(self, out_dir, stem):
        self.latest = Path(out_dir) / f"{stem}.state.pt"
        self.previous = Path(out_dir) / f"{stem}.state.prev.pt"

    def save(self, state, keep_previous=True):
        """keep_previous=False: the first save of a fresh run, whose older states belong to another run."""
        def write(tmp):
            torch.save(state, tmp)
            if self.latest.exists() and keep_previous:
                os.replace(self.latest, self.previous)
            elif self.previous.exists() and not keep_previous:
                self.previous.unlink()
        atomic_write(self.latest, write)

    def load(self, say):
        """The newest readable state, or None when there is no state file at all. State files that exist but
        cannot be read stop the run: starting over would silently replace what they describe."""
        problems = []
        for path in (self.latest, self.previous):
            if not path.exists():
                continue
            try:
                state = load_tensors(path)
                if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
                    raise CheckpointError(f"{path} is not a training state written by this version of the engine")
            except CheckpointError as e:
                problems.append(first_line(e, 240))
                continue
            if problems:
                say(f"resume: the latest state is unreadable ({problems[0]}); using the previous state {path.name} "
                    f"(step {state['step']})")
            elif path == self.previous:
                say(f"resume: the latest state {self.latest.name} is missing; using the previous one {path.name} "
                    f"(step {state['step']})")
            return state
        if problems:
            raise TrainError(f"--resume: no readable training state ({'; '.join(problems)}); restore one, or pass "
                             "--fresh to start over and replace this run's weights")
        return None


# what defines a run: --resume with any of these changed stops, unless --allow_changes names the change
# (--max_steps is not one of them: it only says how far this run goes)
RUN_SETTINGS = ("data", "batch_size", "accumulation_steps", "seed", "learning_rate", "warmup_iters", "epochs",
                "grad_clip", "max_seq_len", "shape", "trainable_parameters")


def data_identity(path, chunk=1 << 20):
    """A data file's size and a fingerprint of its first and last MiB: another file (or the same file edited) is
    told apart without reading a corpus of many GB."""
    if not os.path.isfile(path):  # a dataset built in memory (tests, notebooks): no file to tell apart
        return {"file": str(path), "bytes": None, "fingerprint": None}
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(chunk))
        if size > chunk:
            f.seek(max(chunk, size - chunk))
            h.update(f.read(chunk))
    return {"file": str(Path(path).resolve()), "bytes": size, "fingerprint": h.hexdigest()[:16]}


def run_settings(config, model, params):
    """What defines this run (RUN_SETTINGS), as saved in its states."""
    shape = {k: getattr(model.config, k) for k in SHAPE_FLAGS if hasattr(getattr(model, "config", None), k)}
    return {"data": data_identity(config.data_path), "batch_size": config.batch_size,
            "accumulation_steps": config.accumulation_steps, "seed": config.seed,
            "learning_rate": config.learning_rate, "warmup_iters": config.warmup_iters, "epochs": config.epochs,
            "grad_clip": config.grad_clip, "max_seq_len": config.max_seq_len, "shape": shape,
            "trainable_parameters": sum(p.numel() for p in params)}


def describe_change(name, saved, now):
    if name == "data":
        if saved["fingerprint"] == now["fingerprint"]:
            return None  # the same bytes, moved or renamed
        return (f"data {saved['file']} ({saved['bytes']} bytes) -> {now['file']} ({now['bytes']} bytes"
                f"{', other content' if saved['bytes'] == now['bytes'] else ''})")
    if name == "shape":
        diffs = [f"{k} {saved.get(k)} -> {now.get(k)}" for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
        return "shape " + ", ".join(diffs) if diffs else None
    return None if saved == now else f"{name} {saved} -> {now}"


FIXED_SETTINGS = ("shape", "trainable_parameters")  # the saved weights fit no other shape: never allowed


def settings_changes(saved, now, allowed):
    """The changes from the saved run's settings that --allow_changes does not name, one phrase each."""
    changes = []
    for name in RUN_SETTINGS:
        if name in FIXED_SETTINGS or name not in allowed and "all" not in allowed:
            if name not in saved or name not in now:
                continue
            text = describe_change(name, saved[name], now[name])
            if text:
                changes.append(text)
    return changes


def check_settings(state, settings, total_steps, allow_changes, where, say):
    """--resume continues the saved run: a changed setting stops it, unless --allow_changes names it."""
    saved = state.get("settings")
    if saved is None:
        say("resume: the state predates recorded run settings; they cannot be compared")
        return
    allowed = {x.strip() for x in (allow_changes or "").split(",") if x.strip()}
    unknown = allowed - set(RUN_SETTINGS) - {"all"}
    if unknown:
        raise TrainError(f"--allow_changes {','.join(sorted(unknown))}: not a run setting (one of "
                         f"{', '.join(s for s in RUN_SETTINGS if s not in FIXED_SETTINGS)}, or all)")
    changes = settings_changes(saved, settings, allowed)
    if changes:
        fixed = [c for c in changes if c.split()[0] in FIXED_SETTINGS]
        way = ("the saved weights cannot take another model shape: restore the flags, or pass --fresh" if fixed
               else "restore the flags, or pass --allow_changes "
               f"{','.join(c.split()[0] for c in changes)} to continue with the new values")
        raise TrainError(f"--resume: this run's settings differ from the saved run's ({where}): "
                         f"{'; '.join(changes)}. Nothing was written; {way}")
    for name in sorted(allowed & set(RUN_SETTINGS)):
        text = describe_change(name, saved.get(name), settings.get(name)) if name in saved else None
        if text:
            say(f"resume: continuing with a changed setting, as allowed: {text}")
    if state.get("total_steps") not in (None, total_steps):
        say(f"resume: the run is now {total_steps} steps long (was {state['total_steps']}); "
            "the learning-rate schedule follows the new length from here")


def tensor_bytes(obj, seen=None):
    """The bytes of the tensors in a nested state (what writing it needs, give or take its small index); storage
    shared by several tensors (tied weights) counts once, as torch.save writes it once."""
    seen = set() if seen is None else seen
    if torch.is_tensor(obj):
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    return sum(tensor_bytes(v, seen) for v in values)


def rng_state():
    """Every random state the run depends on, as tensors and plain numbers (weights_only=True can load them)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def deepspeed_weights_only():
    """DeepSpeed's checkpoint loader asks torch.load for full unpickling; within this block every torch.load is
    weights-only, allowing just the three plain DeepSpeed classes its ZeRO optimizer state holds."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    real_load = torch.load

    def load(*args, **kwargs):
        return real_load(*args, **{**kwargs, "weights_only": True})

    torch.load = load
    try:
        with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
            yield
    finally:
        torch.load = real_load
