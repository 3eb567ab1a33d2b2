"""GRPO rollouts: sampled tokens/s of a group batch through our generation engine (the path 6-grpo_train.py uses:
one batch for every answer of every prompt, KV cache) against transformers' generate() on the same model and the
same batch, runs alternating; then one whole GRPO step (rollouts, reference and policy log-probabilities, the loss,
backward, AdamW) and the share of it spent generating.

    python bench/bench_rollout.py                       # the demo's model shape, 8 prompts x 8 answers x 32 tokens
    python bench/bench_rollout.py --prompts 4 --group 16 --new_tokens 128 --threads 1
"""
import argparse
import copy
import statistics
import sys
import time
from argparse import Namespace
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import machine  # noqa: E402
from model.engine import Engine, run_to_completion  # noqa: E402
from model.sampling import SamplingParams  # noqa: E402
from model.LMConfig import LMConfig  # noqa: E402
from model.model import Transformer  # noqa: E402


def load_stage():
    import importlib.util
    spec = importlib.util.spec_from_file_location("grpo_train", Path(__file__).resolve().parents[1] / "6-grpo_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8, help="answers sampled per prompt (G)")
    p.add_argument("--prompt_len", type=int, default=24)
    p.add_argument("--new_tokens", type=int, default=32, help="every answer this long (end of text ignored)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--n_layers", type=int, default=4)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = LMConfig(dim=args.dim, n_layers=args.n_layers, n_heads=4, n_kv_heads=2, max_seq_len=256)
    model = Transformer(config).eval()
    prompts = torch.randint(3, config.vocab_size, (args.prompts, args.prompt_len))
    n_rows, n_new = args.prompts * args.group, args.prompts * args.group * args.new_tokens
    engine = Engine(model, None, max_batch=n_rows)

    def run_ours(seed=0):
        params = [SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=args.new_tokens, ignore_eos=True,
                                 seed=seed * n_rows + i) for i in range(n_rows)]
        requests = [engine.prepare(prompts[i // args.group].tolist(), params[i]) for i in range(n_rows)]
        done = run_to_completion(engine, requests)
        assert sum(c.completion_tokens for c in done) == n_new
        return done

    def run_ref():
        with torch.inference_mode():
            out = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, temperature=1.0,
                                 top_p=1.0, top_k=0, num_return_sequences=args.group, max_new_tokens=args.new_tokens,
                                 min_new_tokens=args.new_tokens, use_cache=True)
        assert out.shape == (n_rows, args.prompt_len + args.new_tokens)

    print(f"machine: {machine()}")
    print(f"model: dim {args.dim}, {args.n_layers} layers ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
          f"parameters), fp32; {args.prompts} prompts of {args.prompt_len} tokens x {args.group} answers of "
          f"{args.new_tokens} tokens, sampled at temperature 1: {n_new} new tokens per rollout")
    run_ours(), run_ref()  # warm-up
    speed = {"engine": [], "generate()": []}
    for r in range(args.rounds):
        for name, fn in (("generate()", run_ref), ("engine", run_ours)):
            t = time.perf_counter()
            fn()
            speed[name].append(n_new / (time.perf_counter() - t))
            print(f"round {r + 1}: {name:11s} {speed[name][-1]:8.1f} tokens/s")
    ours, ref = statistics.median(speed["engine"]), statistics.median(speed["generate()"])
    print(f"median: engine {ours:.1f} tokens/s, transformers generate() {ref:.1f} tokens/s, "
          f"ratio engine/generate() {ours / ref:.2f}x")

    # one GRPO step as 6-grpo_train.py takes it: rollouts, the batch they make, loss, backward, AdamW
    stage = load_stage()
    hp = Namespace(num_generations=args.group, loss_type="grpo", mu=1, beta=0.04, temperature=1.0, epsilon=0.2,
                   epsilon_high=None, max_new_tokens=args.new_tokens)
    policy, reference = model.train(), copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    loss_fn = stage.grpo_loss_fn(hp)
    shares = []
    for r in range(args.rounds):
        t0 = time.perf_counter()
        engine.refresh()
        done = run_ours(seed=r + 1)
        policy.train()
        t1 = time.perf_counter()
        rewards = torch.rand(n_rows)
        batch = stage.scored_batch(policy, reference, [prompts[i // args.group].tolist() for i in range(n_rows)],
                                   [c.token_ids for c in done], rewards, hp, nullcontext())
        loss_sum, _, _ = loss_fn(policy, batch, nullcontext())
        (loss_sum / n_rows).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        shares.append((t1 - t0) / (t2 - t0))
        print(f"step {r + 1}: generating {t1 - t0:.2f} s, the rest (log-probabilities, loss, backward, AdamW) "
              f"{t2 - t1:.2f} s")
    print(f"share of a step spent generating: {statistics.median(shares):.0%} (median of {args.rounds})")


if __name__ == "__main__":
    main()
