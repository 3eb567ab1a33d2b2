"""Batch-1 decoding speed with a KV cache: our generation engine (the path 2-eval.py and the server use) against
transformers' LlamaForCausalLM.generate() of the same shape, in one process, runs alternating.

    python bench/bench_decode.py                 # LMConfig() (26.88M), 32-token prompt, 256 new tokens, greedy
    python bench/bench_decode.py --threads 1 --rounds 5
"""
import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from model.engine import Engine  # noqa: E402
from model.fast_decode import SkinnyLinear  # noqa: E402
from model.sampling import SamplingParams  # noqa: E402
from model.LMConfig import LMConfig  # noqa: E402
from model.model import Transformer  # noqa: E402


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import transformers
    load = " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"transformers {transformers.__version__}, load average {load}")


def reference_model(config):
    from transformers import LlamaConfig, LlamaForCausalLM
    ref = LlamaForCausalLM(LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.hidden_dim,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads,
        max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta,
        tie_word_embeddings=True, attn_implementation="sdpa", bos_token_id=1, eos_token_id=2, pad_token_id=0))
    ref.generation_config.eos_token_id = None  # always the full number of new tokens, like ignore_eos below
    return ref.eval()


def weight_floor(decoder, model, repeats=20):
    """Tokens/s if a decode step did nothing but its matrix products (our layout, then nn.Linear's): batch-1
    decoding reads every weight once per token, so this is the bound for any fp32 implementation here."""
    ours = [m for m in decoder.modules() if isinstance(m, SkinnyLinear)]
    linear = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    floors = []
    with torch.inference_mode():
        for weights, product in ((ours, lambda m: m(torch.ones(1, m.n_in))),
                                 (linear, lambda w: torch.nn.functional.linear(torch.ones(1, w.shape[1]), w))):
            for w in weights:
                product(w)
            t = time.perf_counter()
            for _ in range(repeats):
                for w in weights:
                    product(w)
            floors.append(repeats / (time.perf_counter() - t))
    return floors


def profile_decode(ours, ref, prompt, steps=10):
    """Where a decode step's time goes: ours with 1 and with 16 requests in flight (the server's batch), and
    transformers' generate() for the same number of tokens."""
    from common import profile_side_by_side
    params = SamplingParams(temperature=0, max_new_tokens=ours.max_len, ignore_eos=True)
    batched = Engine(ours.model, None, max_batch=16)
    for engine, n in ((ours, 1), (batched, 16)):
        for i in range(n):  # prompts of a few different lengths, as concurrent requests have
            engine.add(engine.prepare(prompt[0, :prompt.shape[1] - i % 4].tolist(), params))

    def decode(engine):
        def run():
            for _ in range(steps):
                engine.step()
        return run

    def generate():
        with torch.inference_mode():
            ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=steps, do_sample=False)

    profile_side_by_side({"ours 1 row": decode(ours), "ours 16 rows": decode(batched), "transformers": generate},
                         f"seconds per {steps} decode steps by operator category (transformers: its prompt's "
                         f"prefill + {steps} tokens)", rest="everything else (norms, rotary, cache, sampling, ...)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3, help="timed runs of each, alternating")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--profile", action="store_true",
                   help="instead of the benchmark, profile our decode step with 1 and 16 requests in flight and "
                        "transformers' generate() step, by operator category")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = LMConfig()
    ours = Engine(Transformer(config).to(args.device), tokenizer=None)
    ref = reference_model(config).to(args.device)
    n_params = sum(p.numel() for p in ours.model.parameters()) / 1e6
    prompt = torch.randint(3, config.vocab_size, (1, args.prompt_len), device=args.device)

    def run_ours():
        done = ours.complete(prompt[0].tolist(), temperature=0, max_new_tokens=args.new_tokens, ignore_eos=True)
        return done.completion_tokens

    def run_ref():
        with torch.inference_mode():
            out = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new_tokens,
                               do_sample=False, use_cache=True)
        return out.shape[1] - prompt.shape[1]

    print(f"machine: {machine()}")
    if args.profile:
        return profile_decode(ours, ref, prompt)
    print(f"model: LMConfig() {n_params:.2f}M parameters, fp32, {args.device}; prompt {args.prompt_len} tokens, "
          f"{args.new_tokens} new tokens, greedy, batch 1")
    times = {"ours": [], "transformers": []}
    for name, fn in (("ours", run_ours), ("transformers", run_ref)):  # warm-up
        fn()
    for r in range(args.rounds):
        for name, fn in (("transformers", run_ref), ("ours", run_ours)):
            t = time.perf_counter()
            n = fn()
            dt = time.perf_counter() - t
            assert n == args.new_tokens, f"{name} made {n} tokens"
            times[name].append(args.new_tokens / dt)
            print(f"round {r + 1}: {name:13s} {times[name][-1]:8.1f} tokens/s")
    ours_tps, ref_tps = statistics.median(times["ours"]), statistics.median(times["transformers"])
    print(f"median: ours {ours_tps:.1f} tokens/s, transformers generate() {ref_tps:.1f} tokens/s, "
          f"ratio {ours_tps / ref_tps:.2f}x (target >= 4x)")
    if ours.fast and args.device == "cpu":
        floor_ours, floor_linear = weight_floor(ours.decoder, ours.model)
        print(f"matrix products alone (one pass over the weights per token): {floor_ours:.1f} tokens/s in our layout, "
              f"{floor_linear:.1f} in nn.Linear's; ours runs at {ours_tps / floor_ours:.0%} of its bound, "
              f"transformers at {ref_tps / floor_linear:.0%} of its")


if __name__ == "__main__":
    main()
