"""The stage scripts under their real launchers (python, torchrun, deepspeed) on CPU with tiny shapes:
distributed runs match one process, kill -9 and resume reproduces the uninterrupted run, each stage learns."""
import json
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dim", "32", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2"]
COMMON = ["--device", "cpu", "--dtype", "float32", "--max_seq_len", "96", "--log_interval", "1"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
       "WANDB_MODE": "offline"}


pytestmark = pytest.mark.slow  # training processes under python, torchrun and deepspeed
BIN = Path(sys.executable).parent  # the launchers installed beside this interpreter
TORCHRUN, DEEPSPEED = str(BIN / "torchrun"), str(BIN / "deepspeed")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, timeout=3600, check=True, env=ENV):
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def losses(path, key="loss"):
    return [json.loads(l)[key] for l in Path(path).read_text().splitlines() if l.strip()]


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def max_weight_diff(a, b):
    a, b = weights(a), weights(b)
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    run([sys.executable, "data_process.py", "demo", "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def pretrained(demo, tmp_path_factory):
    """A single-process pretraining run: the reference for the distributed runs and the start of later stages."""
    out = tmp_path_factory.mktemp("single")
    run([sys.executable, "1-pretrain.py", *TINY, *COMMON, "--data_path", str(demo / "pretrain.jsonl"),
         "--out_dir", str(out), "--batch_size", "8", "--max_steps", "8", "--learning_rate", "3e-3",
         "--save_interval", "3"])
    return out


def test_pretrain_writes_weights_sidecar_metrics_plot_and_lowers_loss(pretrained):
    for name in ["pretrain_32.pth", "pretrain_32.json", "pretrain_32.metrics.jsonl", "pretrain_32.loss.png",
                 "pretrain_32.state.pt"]:
        assert (pretrained / name).is_file(), name
    config = json.loads((pretrained / "pretrain_32.json").read_text())
    assert (config["dim"], config["n_layers"]) == (32, 2)
    rows = [json.loads(l) for l in (pretrained / "pretrain_32.metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all({"step", "loss", "lr"} <= r.keys() for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.15  # 8 tiny steps from ln(6400) ~ 8.77
    assert isinstance(weights(pretrained / "pretrain_32.pth"), dict)


def test_torchrun_ddp_matches_single_process(demo, pretrained, tmp_path):
    run([TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()), "1-pretrain.py", *TINY, *COMMON,
         "--data_path", str(demo / "pretrain.jsonl"), "--out_dir", str(tmp_path), "--batch_size", "4",
         "--max_steps", "8", "--learning_rate", "3e-3", "--save_interval", "100"])
    single, ddp = losses(pretrained / "pretrain_32.metrics.jsonl"), losses(tmp_path / "pretrain_32.metrics.jsonl")
    assert len(single) == len(ddp) == 8
    for a, b in zip(single, ddp):
        assert abs(a - b) / abs(a) < 1e-4
    assert max_weight_diff(pretrained / "pretrain_32.pth", tmp_path / "pretrain_32.pth") < 1e-4


def test_two_node_torchrun_on_localhost(demo, tmp_path):
    port = str(free_port())
    cmds = [[TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank),
             "--master_addr", "127.0.0.1", "--master_port", port, "1-pretrain.py", *TINY, *COMMON,
             "--data_path", str(demo / "pretrain.jsonl"), "--out_dir", str(tmp_path / f"node{rank}"),
             "--batch_size", "4", "--max_steps", "3"] for rank in (0, 1)]
    procs = [subprocess.Popen(c, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in cmds]
    outs = [p.communicate(timeout=3600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    assert "2 process(es)" in outs[0]
    assert len(losses(tmp_path / "node0" / "pretrain_32.metrics.jsonl")) == 3


def test_deepspeed_zero2_pretrain_and_sft_match_single_process(demo, pretrained, tmp_path):
    ds = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port())]
    run([*ds, "1-pretrain.py", *TINY, *COMMON, "--deepspeed", "2", "--data_path", str(demo / "pretrain.jsonl"),
         "--out_dir", str(tmp_path), "--batch_size", "4", "--max_steps", "8", "--learning_rate", "3e-3"])
    single, zero = losses(pretrained / "pretrain_32.metrics.jsonl"), losses(tmp_path / "pretrain_32.metrics.jsonl")
    for a, b in zip(single, zero):
        assert abs(a - b) / abs(a) < 1e-4
    sft_args = [*COMMON, "--init", str(pretrained / "pretrain_32.pth"), "--data_path", str(demo / "sft_single.jsonl"),
                "--max_steps", "4", "--learning_rate", "1e-3"]
    run([DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "3-full_sft.py", *sft_args,
         "--deepspeed", "2", "--out_dir", str(tmp_path / "ds_sft"), "--batch_size", "4"])
    run([sys.executable, "3-full_sft.py", *sft_args, "--out_dir", str(tmp_path / "sft"), "--batch_size", "8"])
    a, b = losses(tmp_path / "sft" / "full_sft_32.metrics.jsonl"), losses(tmp_path / "ds_sft" / "full_sft_32.metrics.jsonl")
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert abs(x - y) / abs(x) < 1e-4


# runs a stage script that SIGKILLs itself when it is about to start optimizer step KILL_AT: a kill at a chosen
# point of the run, whatever the speed of the machine
KILLED_AT_STEP = """
import os, runpy, signal, sys
from model import trainer
real_step = trainer.Trainer._train_step
def train_step(self, order):
    if self.step == int(os.environ["KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_step(self, order)
trainer.Trainer._train_step = train_step
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("seed", [14])
def test_kill9_then_resume_reproduces_the_uninterrupted_run(demo, pretrained, tmp_path, seed):
    args = ["1-pretrain.py", *TINY, *COMMON, "--data_path", str(demo / "pretrain.jsonl"),
            "--out_dir", str(tmp_path), "--batch_size", "8", "--max_steps", "8", "--learning_rate", "3e-3",
            "--save_interval", "3"]
    metrics = tmp_path / "pretrain_32.metrics.jsonl"
    kill_at = random.Random(seed).randint(4, 7)  # between saves or right after one (steps 3 and 6 save)
    proc = run([sys.executable, "-c", KILLED_AT_STEP, *args], check=False, env={**ENV, "KILL_AT": str(kill_at)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert len(metrics.read_text().splitlines()) == kill_at
    args = [sys.executable, *args]
    resumed = run(args + ["--resume"])
    assert "resume: continuing" in resumed.stdout
    assert losses(metrics) == losses(pretrained / "pretrain_32.metrics.jsonl")
    assert max_weight_diff(tmp_path / "pretrain_32.pth", pretrained / "pretrain_32.pth") <= 1e-6


def test_truncated_state_falls_back_to_the_previous_one(demo, tmp_path):
    args = [sys.executable, "1-pretrain.py", *TINY, *COMMON, "--data_path", str(demo / "pretrain.jsonl"),
            "--out_dir", str(tmp_path), "--batch_size", "8", "--learning_rate", "3e-3", "--save_interval", "2"]
    run(args + ["--max_steps", "4"])
    state = tmp_path / "pretrain_32.state.pt"
    assert (tmp_path / "pretrain_32.state.prev.pt").is_file()
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    out = run(args + ["--max_steps", "5", "--resume"])
    assert "unreadable" in out.stdout and "previous" in out.stdout
    assert "continuing pretrain_32 at step 2" in out.stdout


def test_resume_with_a_different_process_count_explains_the_data_order(demo, tmp_path):
    args = ["1-pretrain.py", *TINY, *COMMON, "--data_path", str(demo / "pretrain.jsonl"), "--out_dir", str(tmp_path),
            "--batch_size", "4", "--max_steps", "4", "--save_interval", "2"]
    run([sys.executable, *args, "--max_steps", "2"])
    out = run([TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()), *args, "--resume"])
    assert "1 process(es), this run has 2" in out.stdout
    assert "continues at sample 8" in out.stdout


def test_sft_lora_dpo_stages_learn(demo, pretrained, tmp_path):
    init = str(pretrained / "pretrain_32.pth")
    run([sys.executable, "3-full_sft.py", *COMMON, "--init", init, "--data_path", str(demo / "sft_single.jsonl"),
         "--out_dir", str(tmp_path), "--batch_size", "8", "--max_steps", "12", "--learning_rate", "3e-3"])
    sft = losses(tmp_path / "full_sft_32.metrics.jsonl")
    assert sft[-1] < sft[0]

    sft_pth = tmp_path / "full_sft_32.pth"
    base_before = weights(sft_pth)
    out = run([sys.executable, "4-lora_sft.py", *COMMON, "--init", str(sft_pth), "--data_path",
               str(demo / "lora_identity.jsonl"), "--out_dir", str(tmp_path), "--batch_size", "8", "--max_steps", "10",
               "--learning_rate", "1e-2", "--lora_dropout", "0", "--merge"])
    assert f"-> {tmp_path / 'lora_sft_32'}\n" in out.stdout  # names the adapter folder it wrote, not a .pth
    lora = losses(tmp_path / "lora_sft_32.metrics.jsonl")
    assert lora[-1] < lora[0]
    state = torch.load(tmp_path / "lora_sft_32.state.pt", map_location="cpu", weights_only=True)["model"]
    base_keys = [k for k in state if k.endswith(".base_layer.weight")]
    assert len(base_keys) == 2 * 7
    for k in base_keys:  # frozen: the base projections inside the adapted model are the SFT weights
        plain = k.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(state[k], base_before[plain]), k
    trained = [k for k in state if "lora_B" in k]
    assert trained and any(state[k].abs().max() > 0 for k in trained)
    assert (tmp_path / "lora_sft_32" / "adapter_config.json").is_file()
    check_merged_lora_matches_adapter(tmp_path, demo)

    run([sys.executable, "5-dpo_train.py", *COMMON, "--init", str(sft_pth), "--data_path", str(demo / "dpo.jsonl"), "--out_dir",
         str(tmp_path), "--batch_size", "8", "--max_steps", "12", "--learning_rate", "2e-3"])
    dpo = losses(tmp_path / "rl_32.metrics.jsonl")
    assert dpo[-1] < dpo[0]
    rows = [json.loads(l) for l in (tmp_path / "rl_32.metrics.jsonl").read_text().splitlines()]
    assert {"chosen_reward", "rejected_reward", "margin", "pref_acc"} <= rows[-1].keys()
    before = held_out_preference_accuracy(sft_pth, demo)
    after = held_out_preference_accuracy(tmp_path / "rl_32.pth", demo)
    assert after > before, (before, after)


def check_merged_lora_matches_adapter(out, demo):
    from peft import PeftModel
    from model.checkpoint import load_model
    base = load_model(out / "full_sft_32.pth")
    adapted = PeftModel.from_pretrained(base, out / "lora_sft_32").eval()
    merged = load_model(out / "lora_32.pth")
    ids = torch.randint(3, 6400, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (adapted(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max() < 1e-4


def held_out_preference_accuracy(pth, demo):
    """Share of held-out pairs whose chosen answer the model finds more likely than the rejected one."""
    from transformers import AutoTokenizer
    from model.checkpoint import load_model
    from model.demo.measure import likelihood_preference, pair_logps
    tok = AutoTokenizer.from_pretrained(ROOT / "model" / "minimind_tokenizer")
    return likelihood_preference(pair_logps(load_model(pth), tok, demo / "eval_dpo.jsonl", max_length=96))["value"]


@pytest.mark.parametrize("script,args,expected", [
    ("1-pretrain.py", ["--data_path", "nowhere/pre.jsonl"], "python data_process.py pretrain"),
    ("3-full_sft.py", ["--data_path", "{demo}/sft_single.jsonl", "--init", "nowhere/p.pth"], "1-pretrain.py"),
    ("5-dpo_train.py", ["--data_path", "{demo}/dpo.jsonl", "--out_dir", "nowhere"], "3-full_sft.py"),
    ("3-full_sft.py", ["--data_path", "{demo}/sft_single.jsonl", "--init", "{pre}", "--dim", "64"], "dim"),
    ("1-pretrain.py", ["--data_path", "{demo}/pretrain.jsonl", "--dim", "30", "--n_heads", "4"], "divisible"),
    ("1-pretrain.py", ["--data_path", "{demo}/pretrain.jsonl", *TINY, "--vocab_size", "1000"], "--vocab_size 6400"),
])
def test_bad_flags_and_paths_give_one_line_errors(demo, pretrained, script, args, expected):
    args = [a.format(demo=demo, pre=pretrained / "pretrain_32.pth") for a in args]
    out = run([sys.executable, script, *COMMON, *args], check=False)
    assert out.returncode != 0
    lines = [l for l in out.stderr.splitlines() if l.strip() and "Warning" not in l and "WARNING" not in l]
    assert len(lines) == 1 and lines[0].startswith("error:"), out.stderr
    assert expected in lines[0]
