"""Training-step throughput and MFU on one CUDA GPU: MiniMind against transformers' Llama of the same shape.

bf16 autocast and SDPA (flash attention), for the 26.88M and 108M presets, in one process, runs alternating.

    python bench/bench_gpu.py                                # both presets, batch 32 x 512, bf16 autocast
    python bench/bench_gpu.py --compile                      # also torch.compile(ours)
    python bench/bench_gpu.py --peak_tflops 756              # a GPU the peak table does not know (H100 PCIe)
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

from bench_train import build_reference, describe_machine, flops_per_token, load_average, matmul_flops  # noqa: E402
from model.LMConfig import LMConfig, preset  # noqa: E402
from model.device import DeviceError, resolve_device  # noqa: E402
from model.model import Transformer  # noqa: E402

# bf16 dense tensor-core peak from the datasheets (TFLOP/s, no sparsity); matched against the device name
PEAK_BF16_TFLOPS = [(r"H200", 989), (r"H100(?!.*(PCIe|NVL))", 989), (r"A100", 312), (r"\bL4\b", 121),
                    (r"RTX 4090", 165)]
MODELS = {"26.88M": lambda: LMConfig(), "108M": lambda: preset("minimind-v1")}
TINY = {"tiny": lambda: LMConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2)}
SDPA_OPS = re.compile(r"_scaled_dot_product_\w+|_flash_attention\w*|_efficient_attention\w*")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (smoke run of the code path)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="bf16 = autocast, fp32 weights")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--tiny", action="store_true", help="instead of the presets: dim 64, 2 layers (smoke run)")
    p.add_argument("--batch", type=int, default=32, help="default: 1-pretrain.py's --batch_size")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model before the rounds")
    p.add_argument("--steps", type=int, default=5, help="timed steps per model in each round")
    p.add_argument("--rounds", type=int, default=3, help="rounds alternating ours and the reference")
    p.add_argument("--compile", action="store_true", help="also time torch.compile(ours)")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="the device's bf16 dense peak for MFU (default: from the table for known GPUs)")
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
        return matmul_flops(512, args.dtype, budget_s=1.0), "measured CPU matmul, not a datasheet peak"
    name = torch.cuda.get_device_name(device)
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, name):
            return tflops * 1e12, f"bf16 dense datasheet peak of {name}"
    sys.exit(f"bench_gpu.py: no bf16 peak known for {name!r}; give it with --peak_tflops (dense, no sparsity)")


def cuda_matmul_flops(n, dtype, device):
    """FLOP/s of a large square matmul on the GPU: what this GPU reaches today, against the datasheet peak."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
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
    return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()


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


def bench_model(label, config, args, device, peak):
    torch.manual_seed(0)
    ours = Transformer(config).to(device).train()
    ref = build_reference(config).to(device).train()
    n_ours, n_ref = (sum(p.numel() for p in m.parameters()) for m in (ours, ref))
    assert n_ours == n_ref, (n_ours, n_ref)
    ids = torch.randint(3, config.vocab_size, (args.batch, args.seq), device=device)
    tokens, fpt = args.batch * args.seq, flops_per_token(config, n_ours, args.seq)
    print(f"\n[{label}] dim {config.dim}, {config.n_layers} layers, {config.n_heads}/{config.n_kv_heads} heads: "
          f"{n_ours:,} parameters; batch {args.batch} x seq {args.seq}, {args.dtype}; warmup {args.warmup}, "
          f"{args.rounds} rounds x {args.steps} steps")
    models = {"ours": ours, "ref": ref}
    for name, m in models.items():
        forced, ops = flash_check(m, ids, device, args.dtype)
        print(f"  {name:13s} flash-only forward+backward runs: {forced}; a plain step uses: {ops}")
    if args.compile:
        models["ours+compile"] = torch.compile(ours)
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
    times = {name: [] for name in steps}  # seconds per step, one entry per round
    for _ in range(args.rounds):
        for name, step in steps.items():  # alternate, so a change in machine state hits both
            sync(device)
            t = time.perf_counter()
            for _ in range(args.steps):
                step()
            sync(device)
            times[name].append((time.perf_counter() - t) / args.steps)
    results = {}
    for name, ts in times.items():
        best, median = tokens / min(ts), tokens / statistics.median(ts)
        results[name] = (best, median)
        mem = f", peak memory {memory[name]:.1f} GiB" if memory[name] is not None else ""
        print(f"  {name:13s} best {best:12,.0f} tokens/s, median {median:12,.0f}; "
              f"{best * fpt / 1e12:7.2f} TFLOP/s = MFU {100 * best * fpt / peak:5.1f}%{mem}")
    for name in steps:
        if name != "ref":
            (b, m), (rb, rm) = results[name], results["ref"]
            print(f"  ratio {name}/ref: {b / rb:.2f}x on best rounds, {m / rm:.2f}x on medians")
    del models, steps, ours, ref
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


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
    print("MFU     : (6 x parameters + 12 x layers x seq x dim) FLOP per token x tokens/s / peak (as bench_train.py)")
    presets = TINY if args.tiny else {k: MODELS[k] for k in args.models.split(",")}
    for label, make_config in presets.items():
        bench_model(label, make_config(), args, device, peak)
    print(f"\nload at end: {load_average()}")


if __name__ == "__main__":
    main()
