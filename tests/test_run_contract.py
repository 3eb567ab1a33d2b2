"""What a shell pipeline and a job scheduler rely on from a training run: --resume continues the saved run or
says what changed, the same seed gives the same LoRA adapter, a signal exits 130/143 and leaves the final name
to finished weights, and a full disk is said in plain words with only true statements about what survives."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.LMConfig import LMConfig
from model.checkpoint import save_weights
from model.model import Transformer
from test_user_errors import ENV, ROOT, TINY, error_line, run_script, sha

TRAIN = ["--device", "cpu", "--dtype", "float32", "--max_seq_len", "48", "--batch_size", "4", "--log_interval", "1"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    texts = [f"第{i}座城市的名字叫做城{i}，那里的人喜欢喝茶，也喜欢在河边散步。" for i in range(48)]
    write_jsonl(folder / "pretrain.jsonl", [{"text": t} for t in texts])
    write_jsonl(folder / "small.jsonl", [{"text": t} for t in texts[:6]])
    write_jsonl(folder / "sft.jsonl", [{"conversations": [{"role": "user", "content": f"城{i}的人喜欢什么？"},
                                                          {"role": "assistant", "content": "喝茶和散步。"}]}
                                       for i in range(24)])
    return folder


def pretrain(data, out, *extra, data_file="pretrain.jsonl"):
    return run_script("1-pretrain.py", *TINY, *TRAIN, "--data_path", data / data_file, "--out_dir", out,
                      "--save_interval", "2", *extra)


@pytest.fixture(scope="module")
def saved_run(data, tmp_path_factory):
    """A finished 4-step run with states at steps 2 and 4."""
    out = tmp_path_factory.mktemp("saved")
    code, _, err = pretrain(data, out, "--max_steps", "4")
    assert code == 0, err
    return out


def copy_run(saved_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(saved_run, out)
    return out


# ---------------------------------------------------------------- --resume refuses changed settings


@pytest.mark.parametrize("flags,named", [
    (["--batch_size", "2"], "batch_size 4 -> 2"),
    (["--learning_rate", "1e-3"], "learning_rate 0.0002 -> 0.001"),
    (["--seed", "7"], "seed 1337 -> 7"),
    (["--max_seq_len", "40"], "max_seq_len 48 -> 40"),
    (["--accumulation_steps", "2"], "accumulation_steps 1 -> 2"),
    (["--warmup_iters", "3"], "warmup_iters 0 -> 3"),
    (["--data_file", "small.jsonl"], "small.jsonl"),
    (["--batch_size", "2", "--seed", "7"], "batch_size 4 -> 2; seed 1337 -> 7"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_resume_with_changed_settings_stops_naming_each(data, saved_run, tmp_path, flags, named):
    out = copy_run(saved_run, tmp_path)
    before = {p.name: sha(p) for p in out.iterdir() if p.is_file()}
    data_file = "pretrain.jsonl"
    if flags[0] == "--data_file":
        data_file, flags = flags[1], []
    extra = ["--max_steps", "4", "--resume", *flags]
    # (the shipped default flags plus the changed ones, on the data file given)
    line = error_line(pretrain(data, out, *extra, data_file=data_file))
    assert named in line and "--allow_changes" in line and "Nothing was written" in line, line
    assert {p.name: sha(p) for p in out.iterdir() if p.is_file()} == before


def test_allow_changes_names_the_intended_change(data, saved_run, tmp_path):
    out = copy_run(saved_run, tmp_path)
    code, stdout, err = pretrain(data, out, "--max_steps", "6", "--resume", "--learning_rate", "1e-3",
                                 "--allow_changes", "learning_rate")
    assert code == 0, err
    assert "as allowed: learning_rate 0.0002 -> 0.001" in stdout and "continuing pretrain_32 at step 4" in stdout
    assert "now 6 steps long (was 4)" in stdout
    line = error_line(pretrain(data, out, "--max_steps", "6", "--resume", "--allow_changes", "lr"))
    assert "--allow_changes lr: not a run setting" in line


def test_a_changed_shape_is_never_allowed(data, saved_run, tmp_path):
    out = copy_run(saved_run, tmp_path)
    line = error_line(run_script("1-pretrain.py", "--dim", "32", "--n_layers", "3", "--n_heads", "4", "--n_kv_heads",
                                 "2", *TRAIN, "--data_path", data / "pretrain.jsonl", "--out_dir", out,
                                 "--max_steps", "4", "--resume", "--allow_changes", "all"))
    assert "shape n_layers 2 -> 3" in line and "--fresh" in line


def test_a_run_that_trains_nothing_writes_nothing(data, saved_run, tmp_path):
    out = copy_run(saved_run, tmp_path)
    before = {p.name: sha(p) for p in out.iterdir() if p.is_file()}
    code, stdout, err = pretrain(data, out, "--max_steps", "4", "--resume")
    assert code == 0, err
    assert "nothing to train" in stdout and "nothing was written" in stdout and "done in" not in stdout
    assert {p.name: sha(p) for p in out.iterdir() if p.is_file()} == before


# ---------------------------------------------------------------- LoRA: same seed, same adapter


def test_lora_twice_with_the_same_seed_gives_the_same_adapter(data, tmp_path):
    torch.manual_seed(0)
    init = tmp_path / "full_sft_32.pth"
    save_weights(Transformer(LMConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=48)), init)
    states, adapters = [], []
    for run, noise in enumerate((1, 2)):
        torch.manual_seed(noise)  # whatever the process did before must not matter
        out = tmp_path / f"lora{run}"
        code, _, err = run_script("4-lora_sft.py", *TRAIN, "--init", init, "--data_path", data / "sft.jsonl",
                                  "--out_dir", out, "--max_steps", "3", "--learning_rate", "1e-2")
        assert code == 0, err
        states.append(torch.load(out / "lora_sft_32.state.pt", weights_only=True)["model"])
        adapters.append(out / "lora_sft_32")
    lora_keys = [k for k in states[0] if "lora_" in k]
    assert lora_keys
    for k in lora_keys:
        assert torch.equal(states[0][k], states[1][k]), k
    # a new process with other string hashing (set orders) writes the same adapter folder, byte for byte
    out = tmp_path / "lora_process"
    proc = subprocess.run([sys.executable, "4-lora_sft.py", *TRAIN, "--init", str(init), "--data_path",
                           str(data / "sft.jsonl"), "--out_dir", str(out), "--max_steps", "3", "--learning_rate",
                           "1e-2"], cwd=ROOT, env={**ENV, "PYTHONHASHSEED": "3"}, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr[-2000:]
    adapters.append(out / "lora_sft_32")
    files = sorted(p.name for p in adapters[0].iterdir())
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    for adapter in adapters[1:]:
        assert sorted(p.name for p in adapter.iterdir()) == files
        for name in files:
            assert sha(adapter / name) == sha(adapters[0] / name), name


# ---------------------------------------------------------------- signals: exit codes and the final name


# a stage script that sends itself SIGNAL when it is about to start optimizer step STOP_AT
SIGNALLED_AT_STEP = """
import os, runpy, signal, sys
from model import trainer
real_step = trainer.Trainer._train_step
def train_step(self, order):
    if self.step == int(os.environ["STOP_AT"]):
        os.kill(os.getpid(), getattr(signal, os.environ["SIGNAL"]))
    return real_step(self, order)
trainer.Trainer._train_step = train_step
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow  # a training process per signal
@pytest.mark.parametrize("name,code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_exits_like_a_shell_expects_and_leaves_the_final_name_alone(data, tmp_path, name, code):
    args = ["1-pretrain.py", *TINY, *TRAIN, "--data_path", str(data / "pretrain.jsonl"), "--out_dir", str(tmp_path),
            "--max_steps", "6", "--save_interval", "100"]
    proc = subprocess.run([sys.executable, "-c", SIGNALLED_AT_STEP, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=1800, env={**ENV, "STOP_AT": "2", "SIGNAL": name})
    assert proc.returncode == code, proc.stderr[-2000:]
    final, partial = tmp_path / "pretrain_32.pth", tmp_path / "pretrain_32.partial.pth"
    assert not final.exists(), "the final name holds a half-trained model"
    assert partial.is_file() and (tmp_path / "pretrain_32.state.pt").is_file()
    assert f"stopped by {name} at step 3 of 6" in proc.stderr and str(partial) in proc.stderr
    # `a && b` stops here; the resumed run finishes, writes the final name and removes the partial weights
    proc = subprocess.run([sys.executable, *args, "--resume"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "continuing pretrain_32 at step 3" in proc.stdout
    assert final.is_file() and not partial.exists() and not partial.with_suffix(".json").exists()


# ---------------------------------------------------------------- a full disk


def tmpfs_available():
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


def run_on_small_disk(tmp_path, size, cmd):
    """cmd with --out_dir on a fresh tmpfs of `size` (a private mount namespace: no privileges needed)."""
    mount = tmp_path / "disk"
    mount.mkdir(parents=True)
    script = (f"mount -t tmpfs -o size={size} tmpfs {mount} && exec " +
              " ".join(f"'{c}'" for c in [*cmd, "--out_dir", str(mount / "out")]))
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=1800)


def full_disk_line(proc):
    return error_line((proc.returncode, proc.stdout, proc.stderr))


@pytest.mark.slow  # training processes on a small file system
@pytest.mark.skipif(not tmpfs_available(), reason="no private tmpfs here; test_enospc_message covers the words")
def test_a_full_disk_says_so_and_only_what_is_true(data, tmp_path):
    cmd = [sys.executable, "1-pretrain.py", *TINY, *TRAIN, "--data_path", str(data / "pretrain.jsonl"),
           "--max_steps", "6", "--save_interval", "2"]
    # the first save does not fit: no state was written before it, and the line says so
    line = full_disk_line(run_on_small_disk(tmp_path / "a", "600k", cmd))
    assert "No space left on device (" in line and "MB needed, " in line and "MB free)" in line, line
    assert "no training state of this run was written" in line and "intact" not in line, line
    needed, free = (float(x) for x in re.search(r"\(([\d.]+) MB needed, ([\d.]+) MB free\)", line).groups())
    assert 0.3 < free <= 0.62 < needed, line  # the failed write's temporary file is gone: its space counts as free
    # one state fits, the second save does not: the line names the state of step 2 as intact
    line = full_disk_line(run_on_small_disk(tmp_path / "b", "5m", cmd))
    assert "No space left on device (" in line and "training state of step 2" in line and "--resume" in line, line


def test_enospc_message(tmp_path, monkeypatch):
    """torch.save's own report of a full disk ("unexpected pos") is read as one, with the numbers."""
    from model import files
    target = tmp_path / "x.pt"

    def failing_save(obj, f):
        Path(f).write_bytes(b"x" * 10)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2191168 vs 2191056")

    monkeypatch.setattr(files, "disk_is_full", lambda folder, slack=0: True)
    with pytest.raises(files.WriteError) as e:
        files.atomic_write(target, lambda tmp: failing_save({}, tmp))
    assert e.value.errno == 28 and e.value.filename == str(target)
    assert str(e.value).startswith(f"cannot write {target}: No space left on device (") and "MB free)" in str(e.value)
    assert not [p for p in tmp_path.iterdir()], "the temporary file was left behind"
