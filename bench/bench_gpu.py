"""Throughput, MFU and memory on one CUDA GPU: MiniMind against transformers' Llama of the same shape.

For the 26.88M, 108M and MoE presets, in one process, runs alternating: a bare training step (bf16 autocast and
SDPA; eager, and with --compile both compiled), which SDPA kernel ran, peak memory; the training engine itself
(model/trainer.py, what the stage scripts run) against the bare step; batch-1 and batch-16 decoding through the
serving engine.

    python bench/bench_gpu.py                                # all presets, batch 32 x 512, bf16 autocast
    python bench/bench_gpu.py --compile                      # also torch.compile(ours) and torch.compile(ref)
    python bench/bench_gpu.py --peak_tflops 756              # a GPU the peak table does not know
    python bench/bench_gpu.py --device cpu --dtype fp32 --tiny   # smoke run of the code path, no GPU needed
"""
import argparse
import gc
import os
import re
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import build_reference, describe_machine, load_average, matmul_flops  # noqa: E402
from model.LMConfig import LMConfig, preset  # noqa: E402
from model.device import DeviceError, active_parameters, peak_tflops, resolve_device  # noqa: E402
from model.device import flops_per_token  # noqa: E402
from model.model import Transformer  # noqa: E402

MODELS = {"26.88M": lambda: LMConfig(), "108M": lambda: preset("minimind-v1"),
          "MoE": lambda: preset("minimind-v1-moe")}
TINY = {"tiny": lambda: LMConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2),
        "tiny-MoE": lambda: LMConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, use_moe=True)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
SDPA_OPS = re.compile(r"_scaled_dot_product_\w+|_flash_attention\w*|_efficient_attention\w*")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (smoke run of the code path)")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="bf16/fp16 = autocast, fp32 weights")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--tiny", action="store_true", help="instead of the presets: dim 64, 2 layers (smoke run)")
    p.add_argument("--batch", type=int, default=32, help="default: 1-pretrain.py's --batch_size")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model before the rounds")
    p.add_argument("--steps", type=int, default=5, help="timed steps per model in each round")
    p.add_argument("--rounds", type=int, default=3, help="rounds alternating ours and the reference")
    p.add_argument("--compile", action="store_true", help="also time torch.compile(ours) and torch.compile(ref)")
    p.add_argument("--engine_steps", type=int, default=10, help="timed steps of the training engine per model")
    p.add_argument("--decode_tokens", type=int, default=128, help="new tokens per request in the decode rows")
    p.add_argument("--decode_batches", default="1,16", help="comma list of decode batch sizes")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="the device's dense bf16/fp16 peak for MFU (default: model/device.py's table)")
    p.add_argument("--matmul_n", type=int, default=8192, help="size of the square matmul that measures the ceiling")
    return p.parse_args()


def check_device(args):
    try:
        device = resolve_device(args.device)
    except DeviceError as e:
        sys.exit(f"bench_gpu.py: {e}. This benchmark needs an NVIDIA GPU; to check the code path on CPU: "
                 "python bench/bench_gpu.py --device cpu --dtype fp32 --tiny")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def describe_gpu(device):
    describe_machine()
    if device.type != "cuda":
        print(f"device  : {device} (smoke run: the numbers say nothing about a GPU)")
        return
    p = torch.cuda.get_device_properties(device)
    b = torch.backends.cuda
    print(f"device  : {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
          f"{p.multi_processor_count} SMs; {torch.cuda.device_count()} visible; CUDA {torch.version.cuda}, "
          f"cuDNN {torch.backends.cudnn.version()}")
    print(f"sdpa    : flash kernel built {b.is_flash_attention_available()}, enabled {b.flash_sdp_enabled()}; "
          f"mem-efficient enabled {b.mem_efficient_sdp_enabled()}; cuDNN enabled {b.cudnn_sdp_enabled()}")


def peak_flops(args, device):
    """(FLOP/s, where it comes from) that MFU divides by."""
    if args.peak_tflops:
        return args.peak_tflops * 1e12, "--peak_tflops"
    if device.type != "cuda":
        return matmul_flops(512, "fp32" if args.dtype == "fp32" else "bf16", budget_s=1.0), \
            "measured CPU matmul, not a datasheet peak"
    name = torch.cuda.get_device_name(device)
    tflops = peak_tflops(name)
    if tflops is None:
        sys.exit(f"bench_gpu.py: no bf16 peak known for {name!r}; give it with --peak_tflops (dense, no sparsity)")
    return tflops * 1e12, f"dense bf16/fp16 datasheet peak of {name}"


def cuda_matmul_flops(n, dtype, device):
    """FLOP/s of a large square matmul on the GPU: what this GPU reaches today, against the datasheet peak."""
    a = torch.randn(n, n, device=device, dtype=DTYPES[dtype] or torch.float32)
    b = torch.randn_like(a)
    a @ b
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=DTYPES[dtype]) if DTYPES[dtype] else nullcontext()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(model, ids, ctx):
    """One full training step as bench_train.py times it (forward with loss, backward, AdamW), on any device."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

    def step():
        opt.zero_grad(set_to_none=True)
        with ctx:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
    return step


def flash_check(model, ids, device, dtype):
    """Whether a forward+backward runs with SDPA restricted to the flash kernel, and which SDPA ops a plain step
    dispatches to (the profiler's op names: flash, efficient, cudnn, or math)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION), autocast(device, dtype):
            model(input_ids=ids[:1], labels=ids[:1]).loss.backward()
        forced = "yes"
    except RuntimeError as e:
        forced = "no (" + str(e).strip().splitlines()[0][:100] + ")"
    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof, autocast(device, dtype):
        model(input_ids=ids[:1], labels=ids[:1]).loss.backward()
    sync(device)
    model.zero_grad(set_to_none=True)
    ops = sorted({e.key for e in prof.key_averages() if SDPA_OPS.search(e.key)})
    return forced, ", ".join(ops) or "no SDPA op"


def timed_rounds(steps, args, device):
    """Seconds per step of each step function, one entry per round, the functions alternating within a round."""
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():  # alternate, so a change in machine state hits both
            sync(device)
            t = time.perf_counter()
            for _ in range(args.steps):
                step()
            sync(device)
            times[name].append((time.perf_counter() - t) / args.steps)
    return times


def bench_model(label, config, args, device, peak):
    """The bare training step, ours against the reference (a dense Llama; none for MoE)."""
    torch.manual_seed(0)
    ours = Transformer(config).to(device).train()
    models = {"ours": ours}
    if not config.use_moe:
        models["ref"] = build_reference(config).to(device).train()
        assert sum(p.numel() for p in models["ref"].parameters()) == sum(p.numel() for p in ours.parameters())
    ids = torch.randint(3, config.vocab_size, (args.batch, args.seq), device=device)
    n_active = active_parameters(ours)
    tokens, fpt = args.batch * args.seq, flops_per_token(config, n_active, args.seq)
    print(f"\n[{label}] dim {config.dim}, {config.n_layers} layers, {config.n_heads}/{config.n_kv_heads} heads"
          f"{', MoE' if config.use_moe else ''}: {sum(p.numel() for p in ours.parameters()):,} parameters "
          f"({n_active:,} active per token); batch {args.batch} x seq {args.seq}, {args.dtype}; warmup "
          f"{args.warmup}, {args.rounds} rounds x {args.steps} steps"
          + ("" if "ref" in models else "; no reference (transformers' Llama has no mixture of experts)"))
    for name, m in models.items():
        forced, ops = flash_check(m, ids, device, args.dtype)
        print(f"  {name:13s} flash-only forward+backward runs: {forced}; a plain step uses: {ops}")
    if args.compile:
        models.update({f"{name}+compile": torch.compile(m) for name, m in list(models.items())})
    ctx = autocast(device, args.dtype)
    steps, memory = {}, {}
    for name, m in models.items():
        steps[name] = make_step(m, ids, ctx)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.warmup):
            steps[name]()
        sync(device)
        memory[name] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    times = timed_rounds(steps, args, device)
    results = {}
    for name, ts in times.items():
        best, median = tokens / min(ts), tokens / statistics.median(ts)
        results[name] = (best, median)
        mem = f", peak memory {memory[name]:.2f} GiB" if memory[name] is not None else ""
        print(f"  {name:13s} best {best:12,.0f} tokens/s, median {median:12,.0f}; "
              f"{best * fpt / 1e12:7.2f} TFLOP/s = MFU {100 * best * fpt / peak:5.1f}%{mem}")
    for name in steps:
        base = name.replace("ours", "ref")
        if name.startswith("ours") and base in results:
            (b, m), (rb, rm) = results[name], results[base]
            print(f"  ratio {name}/{base}: {b / rb:.2f}x on best rounds, {m / rm:.2f}x on medians")
    bare = max(results["ours+compile" if args.compile else "ours"])
    del models, steps
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return ours, bare, fpt


class RandomRows(torch.utils.data.Dataset):
    """Full rows of random tokens: what a packed pretraining dataset hands the engine."""

    def __init__(self, n, seq, vocab):
        self.ids = torch.randint(3, vocab, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def bench_engine(label, model, args, device, peak, bare, fpt):
    """The training engine (model/trainer.py: loader workers, accumulation, loss, clipping, AdamW, the GradScaler
    for fp16) on the same shape: what 1-pretrain.py runs, against the bare step."""
    import tempfile
    from model import batching, cli, trainer as T
    from model.dataset import collate_pad
    dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[args.dtype]
    steps = args.warmup + args.engine_steps
    with tempfile.TemporaryDirectory() as out:
        flags = ["--device", str(device), "--dtype", dtype, "--out_dir", out, "--batch_size", str(args.batch),
                 "--max_seq_len", str(args.seq), "--save_interval", str(10 ** 9), "--log_interval", str(10 ** 9)]
        if args.compile:
            flags.append("--compile")
        if args.peak_tflops:
            flags += ["--peak_tflops", str(args.peak_tflops)]
        a = cli.train_config(cli.stage_parser("bench", lr=1e-4, epochs=1, batch_size=args.batch,
                                              data_path="-").parse_args(flags))
        trainer = T.Trainer(a, T.Runtime(a), model, RandomRows(args.batch * (steps + 1), args.seq,
                                                                model.config.vocab_size),
                            collate_pad, Path(out) / "bench.pth")
        order = batching.epoch_order(len(trainer.dataset), a.seed, 0)
        for _ in range(args.warmup):
            trainer._train_step(order)
        sync(device)
        t = time.perf_counter()
        for _ in range(args.engine_steps):
            trainer._train_step(order)
        sync(device)
        took = time.perf_counter() - t
    tok_s = args.batch * args.seq * args.engine_steps / took
    print(f"  engine        {tok_s:12,.0f} tokens/s = MFU {100 * tok_s * fpt / peak:5.1f}% over {args.engine_steps} "
          f"steps ({trainer.num_workers} loader workers{', compiled' if args.compile else ''}); "
          f"ratio engine/bare step: {tok_s / bare:.2f}x")
    del trainer
    gc.collect()


def bench_decode(label, model, args, device):
    """Decoding through the serving engine (half-precision weights on a GPU, as the server loads them)."""
    from model.device import cuda_dtype
    from model.engine import Engine
    from model.sampling import SamplingParams
    if device.type == "cuda":
        model = model.to(device=device, dtype=getattr(torch, cuda_dtype(torch.cuda.get_device_capability(device))))
    model = model.to(device).eval()
    prompt = list(range(3, 35))
    for batch in (int(b) for b in args.decode_batches.split(",")):
        engine = Engine(model, None, max_batch=batch)
        params = SamplingParams(temperature=0, max_new_tokens=args.decode_tokens, ignore_eos=True)
        rates = []
        for _ in range(max(args.rounds, 2)):  # the first round warms up
            reqs = [engine.prepare(prompt, params) for _ in range(batch)]
            sync(device)
            t = time.perf_counter()
            engine.add_many(reqs)
            while engine.active:
                engine.step()
            sync(device)
            rates.append(batch * args.decode_tokens / (time.perf_counter() - t))
        print(f"  decode batch {batch:2d}: best {max(rates[1:]):10,.0f} tokens/s (32-token prompt, "
              f"{args.decode_tokens} new tokens per request, greedy, {next(model.parameters()).dtype})")
        del engine


def main():
    args = parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    device = check_device(args)
    describe_gpu(device)
    peak, source = peak_flops(args, device)
    line = f"peak    : {peak / 1e12:,.3f} TFLOP/s ({source})"
    if device.type == "cuda":
        mm = cuda_matmul_flops(args.matmul_n, args.dtype, device)
        line += f"; {args.dtype} matmul {args.matmul_n}^3 reaches {mm / 1e12:,.1f} TFLOP/s = {100 * mm / peak:.0f}%"
    print(line)
    print("MFU     : (6 x active parameters + 12 x layers x seq x dim) FLOP per token x tokens/s / peak")
    presets = TINY if args.tiny else {k: MODELS[k] for k in args.models.split(",")}
    for label, make_config in presets.items():
        config = make_config()
        model, bare, fpt = bench_model(label, config, args, device, peak)
        bench_engine(label, model, args, device, peak, bare, fpt)
        bench_decode(label, model, args, device)
    print(f"\nload at end: {load_average()}")


if __name__ == "__main__":
    main()
