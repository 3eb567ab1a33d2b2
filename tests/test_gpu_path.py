"""The engine's GPU-facing rules checked on CPU: host syncs per step, loader workers that change nothing, per-rank
seeds, the precision/compile/checkpointing knobs, MFU and peak memory in the metrics."""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT
from model import cli, trainer as T
from model.dataset import collate_pad
from model.LMConfig import LMConfig
from model.model import Transformer

VOCAB = 97


class Rows(torch.utils.data.Dataset):
    """Deterministic variable-length token rows (a fresh object per item, as a real dataset returns)."""

    def __init__(self, n=40, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.rows = [torch.randint(3, VOCAB, (int(torch.randint(8, 24, (1,), generator=g)),), generator=g)
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
    args = make_args(tmp_path, *flags)
    rt = T.Runtime(args)
    rt.rank = rank
    torch.manual_seed(0)
    model = Transformer(LMConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, max_seq_len=32,
                                 dropout=dropout))
    return T.Trainer(args, rt, model, dataset or Rows(), collate_pad, Path(tmp_path) / "m.pth")


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
            if calls and ROOT in caller.parents and "tests" not in caller.parts:
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
    assert T.default_workers(torch.device("cpu"), cpus=16) == 0
    assert T.default_workers(torch.device("cuda", 0), cpus=16) == 4
    assert T.default_workers(torch.device("cuda", 0), cpus=2) == 1
