"""The engine's GPU-facing rules checked on CPU: host syncs per step, loader workers that change nothing, per-rank
seeds, the precision/compile/checkpointing knobs, MFU and peak memory in the metrics."""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT
from model import batching, cli, trainer as T
from model.dataset import collate_pad
from model.LMConfig import LMConfig
from model.model import Transformer

VOCAB = 97


class Rows(torch.utils.data.Dataset):
    """Deterministic variable-length token rows (a fresh object per item, as a real dataset returns)."""

    def __init__(self, n=40, seed=0, length=None):
        g = torch.Generator().manual_seed(seed)
        self.rows = [torch.randint(3, VOCAB, (length or int(torch.randint(8, 24, (1,), generator=g)),), generator=g)
                     for _ in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i].clone(), "labels": self.rows[i].clone()}


def make_args(tmp_path, *flags):
    p = cli.stage_parser("test", lr=3e-3, epochs=1, batch_size=4, data_path="unused")
    return p.parse_args(["--device", "cpu", "--dtype", "float32", "--out_dir", str(tmp_path), "--max_seq_len", "32",
                         "--dim", "32", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2", "--vocab_size",
                         str(VOCAB), "--save_interval", "1000", *flags])


def make_trainer(tmp_path, *flags, dataset=None, rank=0, dropout=0.0):
    config = cli.train_config(make_args(tmp_path, *flags))
    rt = T.Runtime(config)
    rt.rank = rank
    torch.manual_seed(0)
    model = Transformer(LMConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, max_seq_len=32,
                                 dropout=dropout))
    return T.Trainer(config, rt, model, dataset or Rows(), collate_pad, Path(tmp_path) / "m.pth")


def metrics(tmp_path):
    return [json.loads(line) for line in (Path(tmp_path) / "m.metrics.jsonl").read_text().splitlines()]


SYNC_METHODS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu", "numpy")


def test_no_host_sync_on_steps_that_do_not_log(tmp_path, monkeypatch):
    """Every tensor -> Python conversion made by the repository's code (where it would make the host wait for the
    GPU) is counted per step. Torch's own CPU-side bookkeeping (AdamW's step counter lives on the host) is not ours
    and not a GPU sync. The loader's counting runs in the worker process, outside this count."""
    calls = {}
    trainer = make_trainer(tmp_path, "--log_interval", "4", "--max_steps", "9", "--num_workers", "1", "--epochs", "2",
                           "--accumulation_steps", "2")
    real_step = T.Trainer._train_step

    def train_step(self, order):
        calls[self.step + 1] = 0  # the step being taken (fit increments self.step afterwards)
        return real_step(self, order)
    monkeypatch.setattr(T.Trainer, "_train_step", train_step)
    for name in SYNC_METHODS:
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, **k):
            caller = Path(sys._getframe(1).f_code.co_filename).resolve()
            ours = ROOT in caller.parents and not {"tests", "site-packages"} & set(caller.parts)  # (a venv may sit in ROOT)
            if calls and ours:
                calls[max(calls)] += 1
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    trainer.fit()
    logged = {r["step"] for r in metrics(tmp_path)}
    assert logged == {1, 4, 8, 9}
    assert calls.keys() == set(range(1, 10))
    quiet = {step: n for step, n in calls.items() if step not in logged}
    assert quiet == dict.fromkeys(quiet, 0), calls
    assert all(calls[step] > 0 for step in logged)  # the count sees the logging steps' reads


def test_distributed_counts_reach_the_device_by_a_queued_copy(tmp_path, monkeypatch):
    """torch.tensor(..., device=cuda) is a blocking copy that waits for the GPU's queue: the step's counts are made
    on the host and copied non-blocking before their all-reduce (the distributed branch run in a one-process
    gloo group on CPU, where both copies are no-ops)."""
    import torch.distributed as dist
    plain = make_trainer(tmp_path / "plain", "--max_steps", "3", "--log_interval", "1")
    plain.fit()
    made, real = [], torch.tensor

    def spy(*a, **k):
        if sys._getframe(1).f_code.co_filename.endswith("trainer.py"):
            made.append(k.get("device"))
        return real(*a, **k)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        t = make_trainer(tmp_path / "dist", "--max_steps", "3", "--log_interval", "1")
        t.rt.distributed = True
        monkeypatch.setattr(torch, "tensor", spy)
        t.fit()
    finally:
        monkeypatch.undo()
        dist.destroy_process_group()
    assert made == [None] * 3
    assert [r["tokens"] for r in metrics(tmp_path / "dist")] == [r["tokens"] for r in metrics(tmp_path / "plain")]


def test_loader_workers_change_nothing(tmp_path):
    """Worker processes read ahead; the batches, losses and weights are those of the in-process loader."""
    runs = {}
    for workers in (0, 2):
        out = tmp_path / str(workers)
        t = make_trainer(out, "--log_interval", "1", "--max_steps", "6", "--num_workers", str(workers),
                         "--accumulation_steps", "3", "--epochs", "2", "--batch_size", "3")
        t.fit()
        runs[workers] = ([(r["loss"], r["tokens"]) for r in metrics(out)], t.model.state_dict())
    assert runs[0][0] == runs[2][0]
    assert all(torch.equal(v, runs[2][1][k]) for k, v in runs[0][1].items())


def test_default_workers_only_on_gpu():
    assert batching.default_workers(torch.device("cpu"), cpus=16) == 0
    assert batching.default_workers(torch.device("cuda", 0), cpus=16) == 4
    assert batching.default_workers(torch.device("cuda", 0), cpus=2) == 1


def test_dropout_differs_per_rank_but_the_data_does_not(tmp_path):
    """Each rank draws its own dropout masks (seed + rank); the split of the global order is the same rule."""
    masks, chunks = [], []
    for rank in (0, 1):
        t = make_trainer(tmp_path / str(rank), "--batch_size", "2", rank=rank, dropout=0.5)
        t.rt.world_size = 2
        t.global_batch = 4
        ids = torch.arange(3, 19).view(2, 8)
        masks.append(t.model.train()(input_ids=ids).logits)
        order = batching.epoch_order(len(t.dataset), t.config.seed, 0)
        chunks.append([c for c, _ in t._my_chunks(order, 0)])
    assert not torch.equal(masks[0], masks[1])
    assert chunks[0] != chunks[1]
    order = batching.epoch_order(40, 1337, 0).tolist()
    assert [i for pair in zip(chunks[0], chunks[1]) for c in pair for i in c] == order


def test_grad_checkpointing_recomputes_and_matches(tmp_path):
    grads, forwards = [], []
    for flags in ((), ("--grad_checkpointing",)):
        t = make_trainer(tmp_path / str(len(flags)), *flags)
        calls = []
        t.model.layers[0].attention.register_forward_hook(lambda *a: calls.append(1))
        batch = collate_pad([t.dataset[i] for i in range(4)])
        loss, _, _ = batching.token_loss(t.model.train(), batch, t.rt.autocast)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in t.model.named_parameters()})
        forwards.append(len(calls))
    assert forwards == [1, 2]  # the checkpointed block ran its forward again in the backward pass
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-5, atol=1e-6)


def test_mfu_and_peak_memory_reach_the_log_and_the_metrics(tmp_path, capsys):
    t = make_trainer(tmp_path, "--log_interval", "1", "--max_steps", "2", "--peak_tflops", "0.001")
    t.fit()
    rows = metrics(tmp_path)
    out = capsys.readouterr().out
    assert all(r["mfu"] > 0 and r["peak_mem_gib"] > 0 for r in rows)
    n = sum(p.numel() for p in t.model.parameters())
    assert rows[-1]["mfu"] == pytest.approx(rows[-1]["tokens_per_s"] * (6 * n + 12 * 2 * 32 * 32) / 1e9, rel=1e-3)
    assert " mfu " in out and " GiB " in out
    # without a known peak (any CPU) no MFU is claimed
    t = make_trainer(tmp_path / "cpu", "--log_interval", "1", "--max_steps", "1")
    t.fit()
    assert "mfu" not in metrics(tmp_path / "cpu")[0]


def test_active_parameters_of_a_mixture_of_experts():
    from model.device import active_parameters
    dense = Transformer(LMConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB))
    moe = Transformer(LMConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, use_moe=True))
    assert active_parameters(dense) == sum(p.numel() for p in dense.parameters())
    c = moe.config
    expert = sum(p.numel() for p in moe.layers[0].feed_forward.experts[0].parameters())
    idle = c.n_layers * expert * (c.n_routed_experts - c.num_experts_per_tok)
    assert active_parameters(moe) == sum(p.numel() for p in moe.parameters()) - idle


def test_zero3_is_refused_in_one_line(tmp_path):
    with pytest.raises(T.TrainError, match="ZeRO stage 3 is not supported"):
        make_trainer(tmp_path, "--deepspeed", "3")


@pytest.mark.slow  # inductor compiles C++ kernels for the CPU: tens of seconds
def test_compile_trains_like_eager(tmp_path):
    losses = {}
    for flags in ((), ("--compile",)):
        out = tmp_path / str(len(flags))
        # rows of one length: one compiled graph
        t = make_trainer(out, "--log_interval", "1", "--max_steps", "3", "--batch_size", "8", *flags,
                         dataset=Rows(length=16))
        t.fit()
        losses[flags] = [r["loss"] for r in metrics(out)]
    assert losses[()] == pytest.approx(losses[("--compile",)], rel=1e-4)
    assert len(set(losses[()])) == 3  # the weights changed between the steps compared


# ----------------------------------------------------------------------------- serving


def tiny_engine(batched, max_batch=6, **to):
    from model.engine import Engine
    torch.manual_seed(0)
    model = Transformer(LMConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=300, max_seq_len=64))
    return Engine(model.eval().to(**to), None, max_batch=max_batch, batched_sampling=batched)


def mixed_requests(engine):
    from model.sampling import SamplingParams
    params = [dict(temperature=0), dict(temperature=0.8, seed=1), dict(temperature=0, repetition_penalty=1.3),
              dict(temperature=1.2, top_k=20, seed=2), dict(temperature=0.9, top_p=0.5, seed=3, repetition_penalty=2),
              dict(temperature=0.5, seed=4)]
    return [engine.prepare(list(range(3, 3 + n)), SamplingParams(max_new_tokens=12, ignore_eos=True, **p))
            for n, p in zip((5, 17, 9, 2, 12, 7), params)]


def test_batched_sampling_picks_the_row_by_row_tokens_with_one_transfer_per_step(monkeypatch):
    """The GPU path (every row's token in one host transfer) draws exactly what the CPU path draws."""
    answers = {}
    for batched in (False, True):
        engine = tiny_engine(batched)
        reqs = mixed_requests(engine)
        engine.add_many(reqs)
        transfers = []
        for name in ("tolist", "item", "__int__", "__float__", "__bool__"):
            real = getattr(torch.Tensor, name)

            def counted(self, *a, _real=real, _name=name, **k):
                if sys._getframe(1).f_code.co_filename.endswith(("sampling.py", "engine.py")):
                    transfers.append(_name)
                return _real(self, *a, **k)
            monkeypatch.setattr(torch.Tensor, name, counted)
        per_step = []
        while engine.active:
            transfers.clear()
            engine.step()
            per_step.append(len(transfers))
        monkeypatch.undo()
        answers[batched] = [r.token_ids for r in reqs]
        if batched:
            assert set(per_step) == {1}, per_step
        else:
            assert per_step[0] >= len(reqs)  # row by row: at least one per row
    assert answers[True] == answers[False]


def test_batched_sampling_fails_a_nan_row_alone():
    from model.sampling import pick_tokens
    engine = tiny_engine(True)
    reqs = mixed_requests(engine)[:3]
    logits = torch.randn(3, 300)
    logits[1, 7] = float("nan")
    picked = pick_tokens(reqs, logits)
    assert isinstance(picked[1], FloatingPointError)
    assert picked[0] == int(logits[0].argmax()) and isinstance(picked[2], int)


def test_prefill_asks_sdpa_for_causal_attention_without_a_mask(monkeypatch):
    """Flash attention takes no mask: prefill must reach SDPA with is_causal and attn_mask None."""
    import torch.nn.functional as F
    from model.sampling import SamplingParams
    seen, real = [], F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        seen.append((attn_mask is None, is_causal, q.shape[-2]))
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    engine = tiny_engine(False)
    engine.add_many([engine.prepare(list(range(3, 3 + n)), SamplingParams(max_new_tokens=4)) for n in (9, 5)])
    assert seen == [(True, True, 9)] * 2  # one call per layer, the whole padded prompt at once


def test_serving_weights_are_half_precision_on_a_gpu(monkeypatch, tmp_path):
    """load_model_and_tokenizer on a (simulated) Ampere GPU asks for bf16 weights, on a T4 for fp16; CPU fp32."""
    from model import checkpoint
    asked = []
    monkeypatch.setattr(checkpoint, "load_model", lambda path, device, dtype, **k: asked.append((device, dtype))
                        or SimpleNamespace(config=SimpleNamespace(vocab_size=10 ** 6)))
    monkeypatch.setattr(checkpoint, "load_tokenizer_dir", lambda *a: None)
    args = SimpleNamespace(model="m.pth", tokenizer="t", dim=None, n_layers=None, use_moe=None, device="cpu")
    checkpoint.load_model_and_tokenizer(args)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    for capability in ((8, 0), (7, 5)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, c=capability: c)
        checkpoint.load_model_and_tokenizer(SimpleNamespace(**{**vars(args), "device": "cuda"}))
    assert asked == [(torch.device("cpu"), None), (torch.device("cuda", 0), torch.bfloat16),
                     (torch.device("cuda", 0), torch.float16)]


CTRL_C_RUN = """
import sys
sys.path.insert(0, "tests")
from test_gpu_path import make_trainer, Rows
t = make_trainer(sys.argv[1], "--log_interval", "1", "--max_steps", "100000", "--epochs", "100000",
                 "--num_workers", "2", "--save_interval", "100000", dataset=Rows(n=400))
print("finished" if t.fit() else "stopped", flush=True)
"""


@pytest.mark.slow  # a training process and its loader workers
def test_ctrl_c_to_the_whole_process_group_still_saves(tmp_path):
    """Ctrl-C signals every process of the foreground group, loader workers included: they must not stop under
    the training process, which finishes its step, saves its state and exits 130."""
    import os
    import signal
    import subprocess
    proc = subprocess.Popen([sys.executable, "-c", CTRL_C_RUN, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if " step 3/" in line:
            os.killpg(proc.pid, signal.SIGINT)
            break
    out = "".join(lines) + proc.stdout.read()
    assert proc.wait(timeout=120) == 130, out[-3000:]  # exits as a shell expects of Ctrl-C, state saved
    assert "stopped by SIGINT" in out and "Traceback" not in out, out[-3000:]
    assert (tmp_path / "m.state.pt").exists()
