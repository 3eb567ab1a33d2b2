"""What the benchmarks share: the machine's description and load, the training step they time, the reference
Llama of our shape, the matmul ceiling, and a profile of several steps side by side."""
import os
import platform
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from model.LMConfig import PAD_ID, LMConfig


def cpu_name_and_flags():
    cpu, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return cpu, flags


def native_bf16():
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX); unknown (not Linux) counts as yes."""
    _, flags = cpu_name_and_flags()
    return not flags or bool(flags & {"avx512_bf16", "amx_bf16"})


def describe_machine():
    cpu, flags = cpu_name_and_flags()
    simd = sorted(f for f in flags if f.startswith(("avx512_bf16", "amx", "avx512f", "avx2", "avx_vnni")))
    import transformers
    print(f"machine : {cpu}; {os.cpu_count()} logical cores; torch threads {torch.get_num_threads()}; "
          f"SIMD {' '.join(simd) or '?'}")
    print(f"software: python {platform.python_version()}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    print(f"load    : {load_average()} (other processes on this machine slow every number alike)")


def load_average():
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def autocast(dtype):
    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()


def build_reference(config: LMConfig):
    """transformers' Llama with MiniMind's shape: same vocabulary, GQA, SwiGLU width, tied embeddings, sdpa."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.hidden_dim,
                      num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
                      num_key_value_heads=config.n_kv_heads, rms_norm_eps=config.norm_eps,
                      rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
                      max_position_embeddings=config.max_seq_len, tie_word_embeddings=True,
                      attention_bias=False, mlp_bias=False, pad_token_id=PAD_ID, use_cache=False)
    return LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")


def make_step(model, dtype, ids):
    """One full training step: forward with loss, backward, AdamW update."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(dtype):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        return loss.item()
    return step


def matmul_flops(n, dtype, budget_s=3.0):
    """FLOP/s of a large square matmul (best of a few within a time budget): the practical ceiling here."""
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    a, b = torch.randn(n, n, dtype=torch_dtype), torch.randn(n, n, dtype=torch_dtype)
    best, spent = float("inf"), 0.0
    for i in range(4):  # the first call warms up; without native bf16 one call can take many seconds
        t = time.perf_counter()
        a @ b
        took = time.perf_counter() - t
        best, spent = (min(best, took) if i else took), spent + took
        if spent > budget_s:
            break
    return 2 * n ** 3 / best


CATEGORIES = (  # (label, substrings of aten op names), first match wins
    ("matrix products", ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm")),
    ("attention (SDPA)", ("scaled_dot_product",)),
    ("cross-entropy", ("log_softmax", "nll_loss")),
    ("zero fills", ("aten::fill_", "aten::zero_")),
)


def profile_side_by_side(step_fns, title, steps=3, rest="everything else (norms, rotary, SwiGLU, AdamW, ...)"):
    """Self CPU time per operator category for a few calls of each step function (alternating, so machine load
    hits all alike), printed side by side, then each one's top operators: where the time goes."""
    from torch.profiler import ProfilerActivity, profile
    names = list(step_fns)
    totals = {name: dict.fromkeys([label for label, _ in CATEGORIES] + [rest], 0.0) for name in names}
    tables = {}
    for name in names:
        step_fns[name]()  # warm-up
    for _ in range(steps):
        for name in names:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step_fns[name]()
            events = prof.key_averages()
            for e in events:
                label = next((lab for lab, keys in CATEGORIES if any(k in e.key for k in keys)), rest)
                totals[name][label] += e.self_cpu_time_total / 1e6 / steps
            tables[name] = events.table(sort_by="self_cpu_time_total", row_limit=15)
    print(f"\n{title} (self CPU time, mean of {steps} profiled calls):")
    print(f"  {'category':52s}" + "".join(f"{n:>14s}" for n in names))
    for label in totals[names[0]]:
        print(f"  {label:52s}" + "".join(f"{totals[n][label]:14.4f}" for n in names))
    print(f"  {'total':52s}" + "".join(f"{sum(totals[n].values()):14.4f}" for n in names))
    for name in names:
        print(f"\n{name}, top operators:\n{tables[name]}")
