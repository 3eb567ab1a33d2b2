"""The one training engine behind every stage script: device/dtype/distributed set-up, the data order,
gradient accumulation, the LR schedule, logging, and checkpoints that resume exactly where training stopped."""
import errno
import json
import math
import os
import pickle
import random
import resource
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .checkpoint import STAGE_SCRIPTS, CheckpointError, load_tensors, save_weights, weights_name
from .device import (DeviceError, active_parameters, cuda_dtype, enable_tf32, flops_per_token, peak_tflops,
                     resolve_device, use_tf32)
from .files import atomic_write, first_line, remove, space_left
from .model import IGNORE, next_token_targets


class TrainError(Exception):
    """A user-facing problem (bad flag, missing file, shape mismatch): printed as one line, no traceback."""


# ----------------------------------------------------------------------------- the model and data of a stage

def shape_overrides(args):
    return {k: getattr(args, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "use_moe", "vocab_size")
            if getattr(args, k, None) is not None}


def init_model(args, prefix):
    """The starting model of a stage: --init, else the `prefix` stage's weights in --out_dir for the requested
    shape (dim 512, dense, by default). The shape flags must agree with it."""
    from .checkpoint import load_model
    path = Path(args.init or Path(args.out_dir) / weights_name(prefix, args))
    if not path.exists():
        raise TrainError(f"--init checkpoint {path} not found; it is made by `python {STAGE_SCRIPTS[prefix]}` "
                         "(or pass --init with another checkpoint)")
    model = load_model(path)
    for field, wanted in shape_overrides(args).items():
        have = getattr(model.config, field)
        if bool(have) != bool(wanted) if field == "use_moe" else have != wanted:
            raise TrainError(f"--{field} {wanted} does not match the --init checkpoint {path} ({field} {have}); "
                             f"drop the flag or pick another checkpoint")
    model.config.max_seq_len = max(model.config.max_seq_len, args.max_seq_len)
    return model


def freeze_matching(model, pattern):
    """Stop training the parameters whose names match the regular expression (None: train everything)."""
    if not pattern:
        return
    import re
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise TrainError(f"--freeze {pattern!r} is not a regular expression: {e}") from None
    params = dict(model.named_parameters())
    frozen = [n for n in params if regex.search(n)]
    for n in frozen:
        params[n].requires_grad_(False)
    if not frozen or len(frozen) == len(params):
        raise TrainError(f"--freeze {pattern!r} matches {'no' if not frozen else 'every'} parameter")


def seed_everything(seed):
    """Seed every random generator a stage uses; called before anything random is made (weights, adapters)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def new_model(args, **defaults):
    """A randomly initialised model of the shape the flags ask for."""
    from .LMConfig import LMConfig
    from .model import Transformer
    try:
        config = LMConfig(**{**defaults, **shape_overrides(args)}, max_seq_len=args.max_seq_len)
    except ValueError as e:
        raise TrainError(str(e)) from None
    seed_everything(args.seed)  # the same initial weights on every rank and every launcher
    return Transformer(config)


def require_data(path, how):
    if Path(path).is_dir():
        raise TrainError(f"--data_path {path} is a folder; pass the data file in it (made by `{how}`)")
    if not Path(path).is_file():
        raise TrainError(f"data file {path} not found; make it with `{how}` or pass --data_path")


# ----------------------------------------------------------------------------- distributed and precision

class Runtime:
    """Where this process runs: rank, world size, device, autocast context."""

    def __init__(self, args):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.distributed = self.world_size > 1
        try:
            self.device = resolve_device(args.device)
        except DeviceError as e:
            raise TrainError(str(e)) from None
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            if use_tf32(torch.cuda.get_device_capability(self.device)):
                enable_tf32()
        if self.distributed and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if args.deepspeed:
                import deepspeed
                if self.device.type == "cpu":
                    # DeepSpeed's shared-memory allreduce kernel is compiled on first use (minutes on a small
                    # CPU); plain gloo does the same job for models of this size
                    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
                deepspeed.init_distributed(dist_backend=backend)
            else:
                dist.init_process_group(backend=backend)
        # host-side agreements (stop on a signal) go over a CPU group: no wait for the GPU's queue
        self.host_group = (dist.new_group(backend="gloo") if self.distributed and self.device.type == "cuda"
                           else None)
        self.dtype_name = auto_dtype(self.device) if args.dtype == "auto" else args.dtype  # args stay as given
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.dtype_name]
        if self.dtype == torch.float16 and self.device.type == "cpu":
            raise TrainError("--dtype float16 needs a GPU; on CPU use bfloat16 or float32")
        self.autocast = (nullcontext() if self.dtype == torch.float32 else
                         torch.autocast(device_type=self.device.type, dtype=self.dtype))
        self.is_main = self.rank == 0

    def any_rank(self, flag):
        """Whether any rank's flag is set, agreed on the host (a CPU collective, never a GPU sync)."""
        if not self.distributed:
            return flag
        t = torch.tensor([float(flag)])
        dist.all_reduce(t, group=self.host_group)
        return bool(t[0] > 0)

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def print(self, *a, **k):
        if self.is_main:
            print(*a, **k, flush=True)


def auto_dtype(device):
    """bf16 where the hardware computes it natively (GPUs: sm_80 and newer, else fp16); on CPUs without bf16
    units it is emulated and many times slower than fp32 (measured: a 2048x256x6400 matmul 33x slower on an
    AVX2-only CPU)."""
    if device.type == "cuda":
        return cuda_dtype(torch.cuda.get_device_capability(device))
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "float32"
    return "bfloat16" if ("amx_bf16" in flags or "avx512_bf16" in flags) else "float32"


def lr_at(step, total_steps, peak_lr, warmup_iters):
    """Linear warmup, then cosine decay from the peak to a tenth of it (the seed's floor)."""
    if step < warmup_iters:
        return peak_lr * (step + 1) / warmup_iters
    progress = (step - warmup_iters) / max(1, total_steps - warmup_iters)
    min_lr = peak_lr / 10
    return min_lr + 0.5 * (peak_lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------- the data order

def epoch_order(n, seed, epoch):
    """The global sample order of one epoch: the same on every rank and every run with this seed."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def step_chunks(order, start, global_batch, n_chunks):
    """The samples of the optimizer step starting at `start`, split into n_chunks micro-batches (rank-major
    within each micro step). Fewer samples at the end of an epoch leave some chunks empty."""
    indices = order[start:start + global_batch]
    return [c.tolist() for c in np.array_split(indices, n_chunks)]


# ----------------------------------------------------------------------------- losses

def token_loss(model, batch, autocast):
    """Summed next-token cross-entropy over target tokens, with the count it is summed over."""
    with autocast:
        out = model(input_ids=batch["input_ids"])
    logits, targets = out.logits, next_token_targets(batch["labels"])
    loss_sum = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                               ignore_index=IGNORE, reduction="sum")
    aux = getattr(out, "aux_loss", None)
    return loss_sum, aux, {}


def token_count(batch):
    return int((next_token_targets(batch["labels"]) != IGNORE).sum())


def input_tokens(batch):
    """Real (non-padding) input tokens of a batch."""
    return sum(int((v != 0).sum()) for k, v in batch.items() if k.endswith("input_ids"))


HOST_COUNTS = "host_counts"  # the batch key of (loss count, input tokens), counted by the loader on the host


class HostBatch:
    """The collate step run in the loader's workers: the padded batch, plus under HOST_COUNTS the numbers the
    step needs from it (count_fn's count and the real input tokens), counted on the host so that the step never
    asks the GPU. count_fn None: no counts (a rollout replaces the batch; the step counts what it made)."""

    def __init__(self, collate, count_fn):
        self.collate, self.count_fn = collate, count_fn

    def __call__(self, items):
        batch = self.collate(items)
        if self.count_fn is not None:
            batch[HOST_COUNTS] = (self.count_fn(batch), input_tokens(batch))
        return batch


def quiet_worker(_worker_id):
    """Loader workers leave Ctrl-C (sent to the whole foreground process group) to the training process, which
    finishes its step (reading from them), saves and stops; they end when it closes its loader."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def default_workers(device, cpus=None):
    """--num_workers by default: loader processes on a GPU (the model is not waiting on the CPU there); none on
    CPU, where workers would take cores from the training maths (bench/bench_data.py measures both)."""
    cpus = cpus or len(os.sched_getaffinity(0))
    return min(4, max(cpus - 1, 0)) if device.type == "cuda" else 0


# ----------------------------------------------------------------------------- training state

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
    import hashlib
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


def run_settings(args, model, params):
    config = getattr(model, "config", None)
    shape = {k: getattr(config, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "use_moe")
             if hasattr(config, k)}
    return {"data": data_identity(args.data_path), "batch_size": args.batch_size,
            "accumulation_steps": args.accumulation_steps, "seed": args.seed, "learning_rate": args.learning_rate,
            "warmup_iters": args.warmup_iters, "epochs": args.epochs, "grad_clip": args.grad_clip,
            "max_seq_len": args.max_seq_len, "shape": shape, "trainable_parameters": sum(p.numel() for p in params)}


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


def read_metrics(path, say=None):
    """The records of a metrics file. A line that is not a JSON record (a run killed while writing it) is
    skipped, and say() is told which one."""
    rows = []
    lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            if say:
                say(f"{path}:{n}: skipped a torn line (not a JSON record; a run was stopped while writing it)")
            continue
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- the engine

def rollout_seed(seed, step, rank, micro):
    """The sampling seed of one micro-batch's rollouts: fixed by the run's seed, the step, the rank and the
    micro-batch, so a resumed run samples what the uninterrupted one did."""
    return int(np.random.SeedSequence([seed, step, rank, micro]).generate_state(1, dtype=np.uint64)[0] >> 1)


class Trainer:
    """Runs one stage. The stage script provides the model, the dataset, the loss and what to save.

    Reinforcement learning plugs in rollout_fn(model, batch, seed) -> batch: it turns a collated micro-batch of
    prompts into a training batch with the model as it is now (sampled answers, rewards, advantages), seeded by
    rollout_seed. Each batch of rollouts is trained on for `reuse` optimizer steps (GRPO's mu); a state saved
    between them keeps the rollouts, so a resumed run goes on with the same ones."""

    def __init__(self, args, runtime, model, dataset, collate, out_weights, *, loss_fn=token_loss,
                 count_fn=token_count, trainable=None, save_fn=save_weights, metric_names=(), rollout_fn=None,
                 reuse=1, plot_keys=("loss",)):
        self.args, self.rt = args, runtime
        self.dataset, self.collate = dataset, collate
        self.loss_fn, self.count_fn = loss_fn, count_fn
        self.rollout_fn, self.reuse = rollout_fn, reuse
        self.pending, self.inner = None, 0  # the rollouts in use, and how many optimizer steps have used them
        self.rollout_seconds = 0.0
        self.out_weights = Path(out_weights)
        self.stem = self.out_weights.stem
        self.save_fn = save_fn
        self.metric_names, self.plot_keys = metric_names, plot_keys
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        self.states = StateFiles(args.out_dir, self.stem)
        self.metrics_path = self.out_weights.with_name(f"{self.stem}.metrics.jsonl")
        self.plot_path = self.out_weights.with_name(f"{self.stem}.loss.png")
        if args.accumulation_steps < 1 or args.batch_size < 1:
            raise TrainError("--batch_size and --accumulation_steps must be at least 1")
        if len(dataset) == 0:
            raise TrainError(f"{args.data_path}: the data file has no samples")

        seed_everything(args.seed)
        torch.manual_seed(args.seed + runtime.rank)  # dropout differs per rank; the data order does not use it
        self.model = model.to(runtime.device)
        if getattr(args, "grad_checkpointing", False):
            model.activation_checkpointing_enable({"use_reentrant": False})
        params = [p for p in (trainable if trainable is not None else model.parameters()) if p.requires_grad]
        self.params = params
        self.global_batch = args.batch_size * args.accumulation_steps * runtime.world_size
        self.steps_per_epoch = math.ceil(len(dataset) / self.global_batch)
        self.total_steps = self.steps_per_epoch * args.epochs * reuse
        if args.max_steps is not None:
            self.total_steps = min(self.total_steps, args.max_steps)
        self.flops_per_token = flops_per_token(model.config, active_parameters(model), args.max_seq_len)
        peak = getattr(args, "peak_tflops", None)
        if peak is None and runtime.device.type == "cuda":
            peak = peak_tflops(torch.cuda.get_device_name(runtime.device))
        self.peak_flops = peak * 1e12 * runtime.world_size if peak else None  # MFU only against a known peak
        self.ds_engine = None
        if args.deepspeed:
            self._init_deepspeed(params)
        else:
            self.optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.0,
                                               fused=runtime.device.type == "cuda")
            self.scaler = torch.amp.GradScaler(enabled=runtime.dtype == torch.float16)
            self.wrapped = torch.compile(model) if getattr(args, "compile", False) else model
            if runtime.distributed:
                from torch.nn.parallel import DistributedDataParallel
                ids = [runtime.device.index] if runtime.device.type == "cuda" else None
                self.wrapped = DistributedDataParallel(
                    self.wrapped, device_ids=ids, find_unused_parameters=bool(getattr(model.config, "use_moe", False)))
        self.settings = run_settings(args, model, params)
        self.partial_weights = self.out_weights.with_name(f"{self.stem}.partial{self.out_weights.suffix}")
        self.step, self.epoch, self.position, self.tokens_seen = 0, 0, 0, 0
        workers = getattr(args, "num_workers", None)
        self.num_workers = default_workers(runtime.device) if workers is None else workers
        self._batches, self._batches_at = None, None
        self.saved_step = None
        self.state_step = None  # the step of the newest training state of this run on disk
        self.resumed = False  # set when --resume found a state (its "previous" state is then this run's too)
        self.stop_requested = 0  # the signal that asked to stop
        self.wandb = None

    # -- set-up helpers

    def _init_deepspeed(self, params):
        a, rt = self.args, self.rt
        if Path(a.deepspeed).is_file():
            config = json.loads(Path(a.deepspeed).read_text())
        elif a.deepspeed.isdigit():
            config = {"zero_optimization": {"stage": int(a.deepspeed)}}
        else:
            raise TrainError(f"--deepspeed {a.deepspeed}: neither a config file nor a ZeRO stage number")
        if config.get("zero_optimization", {}).get("stage", 0) >= 3:
            raise TrainError(f"--deepspeed {a.deepspeed}: ZeRO stage 3 is not supported (it partitions the weights "
                             "across processes and the weights saved would be empty); use stage 1 or 2")
        if getattr(a, "compile", False):
            raise TrainError("--compile with --deepspeed is not supported; drop one of them")
        import deepspeed
        config.update(train_micro_batch_size_per_gpu=a.batch_size, gradient_accumulation_steps=a.accumulation_steps,
                      gradient_clipping=a.grad_clip, zero_allow_untested_optimizer=True)
        config.pop("train_batch_size", None)
        config["bf16"] = {"enabled": rt.dtype == torch.bfloat16}
        config["fp16"] = {"enabled": rt.dtype == torch.float16}
        optimizer = torch.optim.AdamW(params, lr=a.learning_rate, weight_decay=0.0)
        self.ds_engine, self.optimizer, _, _ = deepspeed.initialize(model=self.model, optimizer=optimizer,
                                                                    config=config)
        self.wrapped = self.ds_engine
        self.scaler = None
        # DeepSpeed runs the model in bf16/fp16 itself; our autocast would only add casts
        self.rt.autocast = nullcontext()

    def _install_signal_handlers(self):
        def request_stop(signum, frame):
            self.stop_requested = signum
        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)

    # -- checkpointing

    def save(self, final=False):
        """The full state for --resume, and the weights: under the seed's name once training is finished, under
        `<stem>.partial.pth` before (the final name never holds a half-trained model). Rank 0 writes."""
        rt = self.rt
        rngs = [rng_state()]
        pending = [self._cpu(self.pending)]
        if rt.distributed:
            rngs, pending = [None] * rt.world_size, [None] * rt.world_size
            dist.all_gather_object(rngs, rng_state())
            if self.pending is not None:
                dist.all_gather_object(pending, self._cpu(self.pending))
        if self.ds_engine is not None:
            self.ds_engine.save_checkpoint(str(Path(self.args.out_dir) / f"{self.stem}.deepspeed"),
                                           tag="latest_state")
        if rt.is_main:
            state = {
                "format": STATE_FORMAT,
                "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "optimizer": None if self.ds_engine is not None else self.optimizer.state_dict(),
                "scaler": None if self.scaler is None else self.scaler.state_dict(),
                "step": self.step, "epoch": self.epoch, "position": self.position, "tokens_seen": self.tokens_seen,
                "world_size": rt.world_size, "global_batch": self.global_batch,
                "total_steps": self.total_steps, "rng": rngs, "seed": self.args.seed,
                "deepspeed": self.ds_engine is not None, "settings": self.settings,
                "inner": self.inner, "pending": pending if self.pending is not None else None,
            }
            try:
                self.save_fn(self.model, self.out_weights if final else self.partial_weights)
                # the first save of a fresh run must not keep an earlier run's state as its "previous"
                self.states.save(state, keep_previous=self.resumed or self.saved_step is not None)
            except OSError as e:  # a WriteError naming the file, or the OS's own message
                raise TrainError(self._write_failure(e, state)) from None
            if final:
                for path in self.partial_paths():
                    remove(path)
        self.saved_step = self.state_step = self.step
        rt.barrier()

    def partial_paths(self):
        """Where save_fn puts weights given the partial name: the .pth and its .json, or a LoRA adapter folder."""
        p = self.partial_weights
        return [p, p.with_suffix(".json"), p.with_suffix("")]

    def _write_failure(self, e, state=None):
        """One line: what could not be written (on a full disk, how much room it needed and had), and only true
        statements about what survives."""
        if getattr(self, "bar", None) is not None:
            self.bar.close()  # the error line goes below the progress bar, not onto it
        what = first_line(e)
        if getattr(e, "errno", None) == errno.ENOSPC:
            needed = tensor_bytes(state) + tensor_bytes(state["model"]) if state else 0  # the state and the weights
            what = f"cannot write {e.filename or self.args.out_dir}: {space_left(self.args.out_dir, needed)}"
        if self.state_step is None:
            return (f"{what}; no training state of this run was written before it: free "
                    f"space in {self.args.out_dir} and start the run again")
        return (f"{what}; the training state of step {self.state_step} ({self.states.latest}) is intact: free "
                "space and rerun with --resume")

    def try_resume(self):
        rt, a = self.rt, self.args
        state = self.states.load(rt.print)
        if state is None:
            if self.out_weights.exists():
                raise TrainError(f"--resume: no training state for {self.stem} in {a.out_dir}, but "
                                 f"{self.out_weights} exists; pass --fresh to train from the beginning and replace it")
            rt.print(f"resume: no training state for {self.stem} in {a.out_dir}; starting from the beginning")
            return
        self._check_settings(state)
        self.resumed = True
        self.model.load_state_dict(state["model"])
        if self.ds_engine is not None:
            folder = Path(a.out_dir) / f"{self.stem}.deepspeed"
            try:
                with deepspeed_weights_only():
                    self.ds_engine.load_checkpoint(str(folder), tag="latest_state", load_module_strict=False)
            except pickle.UnpicklingError as e:
                raise TrainError(f"--resume: cannot read the DeepSpeed state in {folder}: {first_line(e)} "
                                 "(refused: loading it could run code)") from None
        elif state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.state_step = self.step
        self.tokens_seen = state.get("tokens_seen", 0)
        self.inner = state.get("inner", 0)
        if state.get("pending") is not None and state["world_size"] == rt.world_size:
            batches, n_samples = state["pending"][rt.rank]
            self.pending = [(self._to_device(b), w) for b, w in batches], n_samples
        elif self.inner:
            rt.print(f"resume: the rollouts of step {self.step} were made by another process count; sampling anew")
            self.inner = 0
        if state["world_size"] == rt.world_size:
            set_rng_state(state["rng"][rt.rank])
        else:
            rt.print(f"resume: the state was written by {state['world_size']} process(es), this run has "
                     f"{rt.world_size}. The global sample order is unchanged and continues at sample "
                     f"{self.position} of epoch {self.epoch}; only the split of each step across processes "
                     f"and the global batch ({state['global_batch']} -> {self.global_batch}) change. "
                     "Random states are re-seeded per rank.")
            torch.manual_seed(a.seed + 1000 * self.step + rt.rank)
        rt.print(f"resume: continuing {self.stem} at step {self.step} (epoch {self.epoch}, sample {self.position})")
        self._truncate_metrics(self.step)

    def _check_settings(self, state):
        """--resume continues the saved run: a changed setting stops it, unless --allow_changes names it."""
        saved = state.get("settings")
        if saved is None:
            self.rt.print("resume: the state predates recorded run settings; they cannot be compared")
            return
        allowed = {x.strip() for x in (getattr(self.args, "allow_changes", None) or "").split(",") if x.strip()}
        unknown = allowed - set(RUN_SETTINGS) - {"all"}
        if unknown:
            raise TrainError(f"--allow_changes {','.join(sorted(unknown))}: not a run setting (one of "
                             f"{', '.join(s for s in RUN_SETTINGS if s not in FIXED_SETTINGS)}, or all)")
        changes = settings_changes(saved, self.settings, allowed)
        if changes:
            fixed = [c for c in changes if c.split()[0] in FIXED_SETTINGS]
            way = ("the saved weights cannot take another model shape: restore the flags, or pass --fresh" if fixed
                   else "restore the flags, or pass --allow_changes "
                   f"{','.join(c.split()[0] for c in changes)} to continue with the new values")
            raise TrainError(f"--resume: this run's settings differ from the saved run's ({self.states.latest}): "
                             f"{'; '.join(changes)}. Nothing was written; {way}")
        for name in sorted(allowed & set(RUN_SETTINGS)):
            text = describe_change(name, saved.get(name), self.settings.get(name)) if name in saved else None
            if text:
                self.rt.print(f"resume: continuing with a changed setting, as allowed: {text}")
        if state.get("total_steps") not in (None, self.total_steps):
            self.rt.print(f"resume: the run is now {self.total_steps} steps long (was {state['total_steps']}); "
                          "the learning-rate schedule follows the new length from here")

    def _truncate_metrics(self, step):
        """Keep the metrics up to the resumed step (a torn line of the killed run is dropped, and said so)."""
        if not (self.rt.is_main and self.metrics_path.exists()):
            return
        kept = [r for r in read_metrics(self.metrics_path, self.rt.print) if r["step"] <= step]
        if len(kept) == len(self.metrics_path.read_text(encoding="utf-8", errors="replace").splitlines()):
            return  # nothing to drop: the file stays as it is
        atomic_write(self.metrics_path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in kept)))

    # -- the loop

    def _to_device(self, batch):
        return {k: v.to(self.rt.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    @staticmethod
    def _cpu(pending):
        if pending is None:
            return None
        batches, n_samples = pending
        return [({k: v.cpu() if torch.is_tensor(v) else v for k, v in b.items()}, w) for b, w in batches], n_samples

    def _my_chunks(self, order, position):
        """This rank's micro-batch index lists of the steps from `position` to the end of the epoch: (indices,
        weight), weight 0 (and the epoch's first sample as a stand-in) for the empty chunks of a short last step."""
        rt, a = self.rt, self.args
        while position < len(order):
            chunks = step_chunks(order, position, self.global_batch, a.accumulation_steps * rt.world_size)
            for m in range(a.accumulation_steps):
                chunk = chunks[m * rt.world_size + rt.rank]
                yield (chunk, 1.0) if chunk else (order[:1].tolist(), 0.0)
            position += self.global_batch

    def _loader(self, order):
        """This rank's micro-batches from the current position on, read, tokenized and collated ahead by
        --num_workers processes into pinned memory; the same batches in the same order whatever the worker count,
        so a resumed run sees exactly what the uninterrupted one saw."""
        workers = self.num_workers
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=(c for c, _ in self._my_chunks(order, self.position)),
            collate_fn=HostBatch(self.collate, None if self.rollout_fn else self.count_fn), num_workers=workers,
            pin_memory=self.rt.device.type == "cuda", prefetch_factor=4 if workers else None,
            worker_init_fn=quiet_worker if workers else None)
        return zip(loader, (w for _, w in self._my_chunks(order, self.position)))

    def _micro_batches(self, order):
        """This rank's micro-batches of the current step on the device: (batch, weight) with weight 0 for padding
        chunks."""
        rt, a = self.rt, self.args
        if self._batches is None or self._batches_at != (self.epoch, self.position):
            self._batches = self._loader(order)  # a new epoch, a resume, or a position set from outside
        batches = []
        for m in range(a.accumulation_steps):
            batch, weight = next(self._batches)
            batch = self._to_device(batch)
            if self.rollout_fn is not None:
                started = time.time()
                batch = self.rollout_fn(self.model, batch, rollout_seed(a.seed, self.step, rt.rank, m))
                self.rollout_seconds += time.time() - started
            batches.append((batch, weight))
        n_samples = len(order[self.position:self.position + self.global_batch])
        self._batches_at = (self.epoch, self.position + n_samples)
        return batches, n_samples

    def fit(self):
        """Train to the end; True when this run trained and wrote the final weights (a signal exits instead)."""
        try:
            return self._fit()
        finally:
            self._batches = None  # the loader's workers end now

    def _fit(self):
        a, rt = self.args, self.rt
        if a.resume and not getattr(a, "fresh", False):
            self.try_resume()
        elif rt.is_main and self.metrics_path.exists():
            self.metrics_path.unlink()
        self._install_signal_handlers()
        if a.use_wandb and rt.is_main:
            import wandb
            self.wandb = wandb.init(project=a.wandb_project, name=self.stem, config=vars(a))
        rt.print(f"{self.stem}: {len(self.dataset)} samples, global batch {self.global_batch} "
                 f"({rt.world_size} process(es) x {a.batch_size} x {a.accumulation_steps} accumulation), "
                 f"{self.steps_per_epoch} steps/epoch, {self.total_steps} steps in total, "
                 f"{sum(p.numel() for p in self.params) / 1e6:.3f}M trainable parameters, {rt.dtype_name} on {rt.device}")
        self.model.train()
        t0, tokens_since, tokens_pending, t_last = time.time(), 0, 0, time.time()
        steps_at_start = self.step
        self.bar = progress_bar(self.stem, self.total_steps, self.step, enabled=rt.is_main)
        while self.step < self.total_steps and self.epoch < a.epochs:
            order = epoch_order(len(self.dataset), a.seed, self.epoch)
            while self.position < len(order) and self.step < self.total_steps:
                step_metrics, n_tokens = self._train_step(order)
                tokens_pending += n_tokens  # on the device when distributed: read on logging and saving steps
                self.step += 1
                self.bar.update(1)
                log = self.step % a.log_interval == 0 or self.step == self.total_steps or self.step == 1
                stop = self._agree_to_stop()
                if log or stop or self.step % a.save_interval == 0:
                    n = int(tokens_pending)
                    self.tokens_seen += n
                    tokens_since += n
                    tokens_pending = 0
                if log:
                    metrics = self._reduce_metrics(step_metrics)
                    now = time.time()
                    tok_s = tokens_since / max(now - t_last, 1e-9)
                    done = self.step - steps_at_start
                    eta = (now - t0) / max(done, 1) * (self.total_steps - self.step)
                    self._log({**metrics, **self._performance(tok_s)}, tok_s, eta)
                    tokens_since, t_last = 0, now
                if stop and self.step < self.total_steps:  # (a stop at the last step lets the run finish)
                    self.bar.close()
                    self.save()
                    self._exit_interrupted(stop)
                if self.step % a.save_interval == 0 and self.step < self.total_steps:
                    self.save()
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
        self.bar.close()
        self.tokens_seen += int(tokens_pending)
        if self.step == steps_at_start:
            rt.print(f"{self.stem}: nothing to train: the saved run is at step {self.step} of {self.total_steps} "
                     f"(raise --max_steps or --epochs to go on); nothing was written")
            return False
        self.save(final=True)
        if rt.is_main:
            self.plot()
            rt.print(f"{self.stem}: done in {time.time() - t0:.1f}s -> {self.out_weights}")
        if self.wandb is not None:
            self.wandb.finish()
        return True

    def _agree_to_stop(self):
        """The signal that stops the run (0: go on); one rank's signal stops them all (agreed on the host)."""
        if not self.rt.distributed:
            return self.stop_requested
        return self.stop_requested or (signal.SIGTERM if self.rt.any_rank(self.stop_requested > 0) else 0)

    def _exit_interrupted(self, signum):
        """Exit as a shell expects of a process stopped by a signal (128 + its number: 130 for SIGINT, 143 for
        SIGTERM), so that `a && b` does not go on with a half-trained model."""
        if self.rt.is_main:
            print(f"{self.stem}: stopped by {signal.Signals(signum).name} at step {self.step} of "
                  f"{self.total_steps}: training state in {self.states.latest} (continue with --resume), "
                  f"partial weights in {next((p for p in self.partial_paths() if p.exists()), self.partial_weights)}; "
                  f"{self.out_weights} was not written",
                  file=sys.stderr, flush=True)
        if self.wandb is not None:
            self.wandb.finish(exit_code=128 + signum)
        raise SystemExit(128 + signum)

    def _counts(self, batch, weight):
        """(loss count, input tokens) of a micro-batch: the loader's host counts, or for a batch made on the
        device (a rollout) counted there (a host sync, beside the many of sampling)."""
        count, tokens = batch[HOST_COUNTS] if HOST_COUNTS in batch else (self.count_fn(batch), input_tokens(batch))
        return count * weight, tokens * int(weight)

    def _train_step(self, order):
        """One optimizer step. Returns its metrics still on the device (numbers only through _reduce_metrics) and
        its input tokens over all ranks: an int, or a device tensor when distributed. No host sync in here for
        loader batches (fp16's GradScaler makes one, to skip a step whose gradients overflowed)."""
        a, rt = self.args, self.rt
        started, self.rollout_seconds = time.time(), 0.0
        lr = lr_at(self.step, self.total_steps, a.learning_rate, a.warmup_iters)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.pending is None:
            self.pending = self._micro_batches(order)
        batches, n_samples = self.pending
        counted = [self._counts(b, w) for b, w in batches]
        local_count, n_tokens = sum(c for c, _ in counted), sum(t for _, t in counted)
        if rt.distributed:  # summed on the device: the step goes on without waiting for the result
            totals = torch.tensor([local_count, n_tokens], dtype=torch.float64, device=rt.device)
            dist.all_reduce(totals)
            global_count, n_tokens = totals[0].clamp(min=1.0), totals[1]
            scale = (rt.world_size / global_count).float()
        else:
            global_count = max(local_count, 1)
            scale = 1.0 / global_count
        # each micro-batch's loss is its summed loss over the global count, so gradients (averaged across
        # ranks by DDP/DeepSpeed) equal those of one process seeing the whole global batch
        sums, counts = {}, {}

        def add(into, k, v, weight):
            into[k] = into.get(k, 0.0) + torch.as_tensor(v, device=rt.device).detach().double() * weight
        for i, (batch, weight) in enumerate(batches):
            last = i == len(batches) - 1
            sync = nullcontext() if (last or not rt.distributed or self.ds_engine is not None) \
                else self.wrapped.no_sync()
            with sync:
                loss_sum, aux, extra = self.loss_fn(self.wrapped, batch, rt.autocast)
                loss = loss_sum * scale * weight
                if aux is not None:
                    loss = loss + aux * weight / len(batches)
                if self.ds_engine is not None:
                    self.ds_engine.backward(loss, scale_wrt_gas=False)
                    self.ds_engine.step()
                else:
                    self.scaler.scale(loss).backward()
            for k, v in {"loss": loss_sum, **extra}.items():  # a (sum, count) pair is averaged over its own count
                total, count = v if isinstance(v, tuple) else (v, None)
                add(sums, k, total, weight)
                if count is not None:
                    add(counts, k, count, weight)
        if self.ds_engine is None:
            if a.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.params, a.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
        times = {}
        if self.rollout_fn is not None:  # (rank 0's times)
            times = {"rollout_s": self.rollout_seconds, "step_s": time.time() - started}
        self.inner += 1
        if self.inner == self.reuse:
            self.position += n_samples
            self.pending, self.inner = None, 0
        return (sums, counts, global_count, lr, times), n_tokens

    def _reduce_metrics(self, step_metrics):
        """A step's metrics as numbers, summed over ranks and divided by the global count (or a pair's own
        count): a host sync, and a collective every rank joins, so fit() calls it on logging steps only."""
        sums, counts, global_count, lr, times = step_metrics
        keys, own = sorted(sums), sorted(counts)
        values = torch.stack([sums[k] for k in keys] + [counts[k] for k in own])
        if self.rt.distributed:
            dist.all_reduce(values)
        totals, count = values.tolist(), float(global_count)
        metrics = {k: v / count for k, v in zip(keys, totals)}
        for k, c in zip(own, totals[len(keys):]):
            metrics[k] = totals[keys.index(k)] / max(c, 1e-12)
        return {**metrics, "lr": lr, **times}

    def _performance(self, tok_s):
        """MFU (model FLOPs of the real tokens per second over the devices' peak, when it is known) and this
        process's peak memory: what the GPU holds at most, or on CPU the resident set."""
        out = {}
        if self.peak_flops:
            out["mfu"] = tok_s * self.flops_per_token / self.peak_flops
        if self.rt.device.type == "cuda":
            out["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.rt.device) / 2**30
        else:
            out["peak_mem_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return out

    def _log(self, metrics, tok_s, eta):
        if not self.rt.is_main:
            return
        record = {"step": self.step, "epoch": self.epoch, **metrics, "tokens": self.tokens_seen,
                  "tokens_per_s": round(tok_s, 1),
                  "time": round(time.time(), 3)}
        try:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise TrainError(self._write_failure(e)) from None
        extra = "".join(f" {k} {metrics[k]:.4f}" for k in self.metric_names if k in metrics)
        self.bar.set_postfix_str(f"loss {metrics['loss']:.4f}{extra} {tok_s:.0f} tok/s", refresh=False)
        self.bar.write(f"{self.stem} step {self.step}/{self.total_steps} epoch {self.epoch + 1}/{self.args.epochs} "
                       f"loss {metrics['loss']:.4f}{extra} lr {metrics['lr']:.3e} {tok_s:.0f} tok/s"
                       + (f" mfu {metrics['mfu']:.1%}" if "mfu" in metrics else "")
                       + f" mem {metrics['peak_mem_gib']:.2f} GiB eta {eta / 60:.1f} min", file=sys.stdout)
        sys.stdout.flush()
        if self.wandb is not None:
            self.wandb.log(record, step=self.step)

    def plot(self):
        plot_metrics(self.metrics_path, self.plot_path, title=self.stem, keys=self.plot_keys)


def progress_bar(name, total, done, enabled=True):
    """A live bar on stderr (step/total, loss, tokens/s, ETA) while the log lines go to stdout through its write(),
    so a log file keeps every line and a terminal shows where the run is."""
    from tqdm import tqdm
    return tqdm(total=total, initial=done, desc=name, unit="step", file=sys.stderr, dynamic_ncols=True,
                mininterval=0.5, disable=not enabled)


def plot_metrics(metrics_path, png_path, title, keys=("loss",)):
    """Loss (and any other logged metrics named in keys, one panel each) against step from a metrics file, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_metrics(metrics_path, print)
    if not rows:
        return
    fig, axes = plt.subplots(len(keys), 1, figsize=(6, 3.5 * len(keys)), squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        logged = [r for r in rows if key in r]
        ax.plot([r["step"] for r in logged], [r[key] for r in logged])
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0, 0].set_title(title)
    fig.tight_layout()
    atomic_write(png_path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def load_tokenizer(args, model):
    """The --tokenizer folder, checked to fit the model's embedding table."""
    from .checkpoint import load_tokenizer_dir
    if not Path(args.tokenizer).is_dir():
        raise TrainError(f"tokenizer folder {args.tokenizer} not found; the shipped one is model/minimind_tokenizer "
                         "(or train one with `python train_tokenizer.py`)")
    tokenizer = load_tokenizer_dir(args.tokenizer)
    if len(tokenizer) > model.config.vocab_size:
        raise TrainError(f"tokenizer {args.tokenizer} has {len(tokenizer)} tokens but the model's vocab_size is "
                         f"{model.config.vocab_size}; pass --vocab_size {len(tokenizer)} (or more) for a new model")
    return tokenizer

