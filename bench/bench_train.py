"""Training-step throughput of MiniMind against transformers' Llama of the same shape, measured in one process."""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import (autocast, build_reference, describe_machine, load_average, make_step,  # noqa: E402
                    matmul_flops, native_bf16, profile_side_by_side)
from model.LMConfig import LMConfig  # noqa: E402
from model.device import flops_per_token  # noqa: E402
from model.model import Transformer  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model and dtype before the rounds")
    p.add_argument("--steps", type=int, default=1, help="timed steps per model in each round")
    p.add_argument("--rounds", type=int, default=5, help="rounds alternating ours and the reference")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16 (bf16 = autocast)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile(ours)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--matmul_n", type=int, default=2048, help="size of the square matmul that measures the peak")
    p.add_argument("--demo", action="store_true",
                   help="instead: the demo's pretraining shape, the training engine on packed demo rows against a bare "
                        "step on the same tensors (the engine's tokens/s as a share of the bare step's)")
    p.add_argument("--profile", default=None, choices=["fp32", "bf16"],
                   help="instead of the benchmark, profile steps of ours and the reference in this precision and "
                        "print the time per operator category side by side")
    return p.parse_args()


def profile_steps(models, ids, dtype):
    step_fns = {name: make_step(model, dtype, ids) for name, model in models.items()}
    profile_side_by_side(step_fns, f"[{dtype}] seconds per training step by operator category")


def demo_engine_share(args):
    """The engine's real (non-padding) tokens per second on the demo's packed pretraining rows, against a bare
    forward/backward/AdamW step on random full rows of the same shape, alternating in one process."""
    import tempfile
    import demo
    import subprocess
    from transformers import AutoTokenizer
    from model import batching, cli, trainer as T
    from model.stage import new_model
    from model.dataset import PackedPretrainDataset, PretrainDataset, collate_pad
    defaults = vars(demo.parse_args([]))  # the demo's own defaults
    work = Path(tempfile.mkdtemp(prefix="bench-demo-"))
    subprocess.run([sys.executable, "data_process.py", "demo", "--out", str(work), "--n_entities",
                    str(defaults["n_entities"])], cwd=Path(__file__).resolve().parent.parent, check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run([sys.executable, "train_tokenizer.py", "--data_path", str(work / "tokenizer.jsonl"), "--out_dir",
                    str(work / "tok"), "--vocab_size", str(defaults["vocab_size"])],
                   cwd=Path(__file__).resolve().parent.parent, check=True, stdout=subprocess.DEVNULL)
    tok = AutoTokenizer.from_pretrained(work / "tok")
    seq, batch = defaults["max_seq_len"], defaults["pretrain_batch"]
    flags = ["--out_dir", str(work), "--dim", str(defaults["dim"]), "--n_layers", str(defaults["n_layers"]),
             "--n_heads", str(defaults["n_heads"]), "--n_kv_heads", str(defaults["n_kv_heads"]), "--vocab_size",
             str(defaults["vocab_size"]), "--max_seq_len", str(seq), "--batch_size", str(batch), "--dtype", "float32",
             "--device", "cpu", "--save_interval", "1000000", "--learning_rate", "1e-3"]
    a = cli.train_config(cli.stage_parser("bench", lr=1e-3, epochs=1, batch_size=batch,
                                          data_path=str(work / "pretrain.jsonl")).parse_args(flags))
    model = new_model(a)
    packed = PackedPretrainDataset(work / "pretrain.jsonl", tok, seq)
    plain = PretrainDataset(work / "pretrain.jsonl", tok, seq)
    trainer = T.Trainer(a, T.Runtime(a), model, packed, collate_pad, work / "bench.pth")
    order = batching.epoch_order(len(packed), a.seed, 0)
    bare_model = new_model(a)
    ids = torch.randint(3, defaults["vocab_size"], (batch, seq))
    bare = make_step(bare_model, "fp32", ids)

    def engine():
        if trainer.position + batch > len(order):
            trainer.position = 0
        return trainer._train_step(order)[1]

    real_share = {name: sum(int((ds[i]["input_ids"] != 0).sum()) for i in range(len(ds))) / (len(ds) * seq)
                  for name, ds in (("packed", packed), ("unpacked", plain))}
    for _ in range(args.warmup):
        engine(), bare()
    engine_tps, bare_tps = [], []
    for _ in range(args.rounds):
        for _ in range(args.steps):
            t = time.perf_counter()
            n = engine()
            engine_tps.append(n / (time.perf_counter() - t))
            t = time.perf_counter()
            bare()
            bare_tps.append(batch * seq / (time.perf_counter() - t))
    e, b = statistics.median(engine_tps), statistics.median(bare_tps)
    print(f"demo shape: dim {defaults['dim']}, {defaults['n_layers']} layers, vocab {defaults['vocab_size']}, "
          f"batch {batch} x seq {seq}, fp32; {len(packed)} packed rows from {len(plain)} documents")
    print(f"  rows filled with real tokens: packed {real_share['packed']:.1%}, unpacked and padded to "
          f"{seq} {real_share['unpacked']:.1%} (padded to each batch's longest, the unpacked loader wastes less, "
          f"but a step then holds ~{batch * sum(len(plain[i]['input_ids']) for i in range(len(plain))) / len(plain):.0f} "
          f"real tokens)")
    print(f"  engine  median {e:8,.0f} real tokens/s ({len(engine_tps)} steps)")
    print(f"  bare    median {b:8,.0f} tokens/s")
    print(f"  engine / bare: {e / b:.1%}")


def main():
    args = parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # progress shows up even when piped to a file
    if args.threads:
        torch.set_num_threads(args.threads)
    describe_machine()
    if args.demo:
        return demo_engine_share(args)
    torch.manual_seed(0)
    config = LMConfig()
    ours, ref = Transformer(config), build_reference(config)
    ours.train()
    ref.train()
    n_ours = sum(p.numel() for p in ours.parameters())
    n_ref = sum(p.numel() for p in ref.parameters())
    assert n_ours == n_ref, (n_ours, n_ref)
    ids = torch.randint(3, config.vocab_size, (args.batch, args.seq))
    tokens = args.batch * args.seq
    models = {"ours": ours, "ref": ref}
    if args.profile:
        return profile_steps(models, ids, args.profile)
    if args.compile:
        models["ours+compile"] = torch.compile(ours)
    print(f"model   : LMConfig() {n_ours:,} parameters (reference Llama {n_ref:,}); batch {args.batch} x "
          f"seq {args.seq}; AdamW full step; warmup {args.warmup}, {args.rounds} rounds x {args.steps} steps")

    fpt = flops_per_token(config, n_ours, args.seq)
    results = {}
    for dtype in args.dtypes.split(","):
        if dtype == "bf16" and not native_bf16() and args.matmul_n > 512:
            # emulated bf16 takes about a minute per 2048^3 product, and its rate depends on the shape anyway
            print(f"\n[bf16] no native bf16 matmul on this CPU: the matmul is measured at 512^3, not "
                  f"{args.matmul_n}^3, and the % of it below is no ceiling")
            args.matmul_n = 512
        peak = matmul_flops(args.matmul_n, dtype)
        steps = {name: make_step(m, dtype, ids) for name, m in models.items()}
        for name, step in steps.items():
            for _ in range(args.warmup):
                step()
        times = {name: [] for name in steps}  # seconds of every timed step
        for r in range(args.rounds):
            peak = max(peak, matmul_flops(args.matmul_n, dtype, budget_s=1.0))  # the ceiling under today's load
            for name, step in steps.items():  # alternate, so a change in machine load hits both
                for _ in range(args.steps):
                    t = time.perf_counter()
                    step()
                    times[name].append(time.perf_counter() - t)
        print(f"\n[{dtype}] matmul {args.matmul_n}^3 (best of the rounds): {peak / 1e9:,.1f} GFLOP/s")
        for name, ts in times.items():
            best, median = tokens / min(ts), tokens / statistics.median(ts)
            results[(dtype, name)] = (best, median)
            print(f"  {name:13s} best {best:8,.0f} tokens/s, median {median:8,.0f}  "
                  f"({tokens * fpt / min(ts) / 1e9:6.1f} GFLOP/s = {100 * best * fpt / peak:5.1f}% of matmul)")
            print(f"  {'':13s} every step: {' '.join(f'{tokens / t:,.0f}' for t in ts)}")
        for name in steps:
            if name != "ref":
                (b, m), (rb, rm) = results[(dtype, name)], results[(dtype, "ref")]
                print(f"  ratio {name}/ref: {b / rb:.2f}x on best steps, {m / rm:.2f}x on medians")
    print(f"\nload at end: {load_average()}")


if __name__ == "__main__":
    main()
