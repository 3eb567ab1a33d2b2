"""llama.cpp (through llama-cpp-python) against our generation engine on the same model: how closely each GGUF
outtype (f32, f16, q8_0) reproduces our tokens and logits, and batch-1 decode tokens/s side by side in one
process, runs alternating. This is the anchor our own decoder is measured against.

    python bench/bench_llamacpp.py                          # LMConfig() (26.88M), random init: speed only
    python bench/bench_llamacpp.py --model out/full_sft_512.pth   # a trained model: agreement means something
    python bench/bench_llamacpp.py --rounds 1 --new_tokens 16     # a quick look
    python bench/bench_llamacpp.py --tiny --rounds 1              # a 64-dim model: the smoke test

Both sides use the same number of threads. llama.cpp decodes with its default f16 KV cache in the speed runs
(what its users get) and an f32 one in the agreement runs (f32 weights are then exact, so any difference is
the weight type's). Agreement: a greedy continuation counts the tokens before its first difference from ours.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# torch and llama.cpp each bring an OpenMP runtime; by default their idle threads spin and take the cores from the
# other one (ours ran several times slower between llama.cpp runs). Idle threads sleep instead: set before either loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench_decode import machine  # noqa: E402
from bench_serve import QUESTIONS  # noqa: E402
from model.checkpoint import DEFAULT_TOKENIZER, load_model  # noqa: E402
from model.engine import Engine  # noqa: E402
from model.gguf_export import (CHECK_TEXTS, OUTTYPES, agreement, llama_greedy, llama_logits,  # noqa: E402
                               llama_tokenize, open_llama, write_gguf)

RAW = ["长江是", "The river", "从前有一座山，", "1 2 3 4 5", "def add(a, b):\n"]


def prompts(tokenizer):
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True) for q in QUESTIONS]
    return [tokenizer.encode(t, add_special_tokens=False) for t in chats + RAW]


@torch.inference_mode()
def agreement_row(model, gguf, tokenizer, threads, new_tokens):
    """(tokenization equal, texts, greedy tokens matched, tokens, prompts identical, prompts, max |logit diff|)."""
    llm = open_llama(gguf, n_ctx=model.config.max_seq_len, threads=threads)
    same_tok = sum(llama_tokenize(llm, t) == tokenizer.encode(t, add_special_tokens=False) for t in CHECK_TEXTS)
    matched = total = identical = 0
    worst = 0.0
    ps = prompts(tokenizer)
    for ids in ps:
        ours = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False, eos_token_id=2,
                              pad_token_id=0)[0, len(ids):].tolist()
        theirs = llama_greedy(llm, ids, new_tokens, eos_id=2)
        m, t = agreement(ours, theirs)
        matched, total, identical = matched + m, total + t, identical + (ours == theirs)
        full = ids + ours
        worst = max(worst, float(np.abs(llama_logits(llm, full) - model(torch.tensor([full])).logits[0].numpy()).max()))
    llm.close()
    return same_tok, len(CHECK_TEXTS), matched, total, identical, len(ps), worst


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="our .pth or exported folder (default: LMConfig(), random init)")
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER)
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=256, help="decoded tokens per speed run")
    p.add_argument("--agree_tokens", type=int, default=32, help="greedy tokens per prompt in the agreement runs")
    p.add_argument("--rounds", type=int, default=3, help="timed runs of each, alternating")
    p.add_argument("--threads", type=int, default=0, help="threads for both (default: torch's choice)")
    p.add_argument("--tiny", action="store_true", help="a 64-dim, 2-layer random model (the smoke test)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    from transformers import AutoTokenizer
    from model.LMConfig import LMConfig
    from model.model import Transformer
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    torch.manual_seed(0)
    shape = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2) if args.tiny else {}
    model = load_model(args.model) if args.model else Transformer(LMConfig(**shape)).eval()
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"machine: {machine()}; llama.cpp threads {threads}; OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
    print(f"model: {args.model or 'LMConfig(' + ', '.join(f'{k}={v}' for k, v in shape.items()) + '), random init'} "
          f"({n_params:.2f}M parameters, "
          f"{'MoE' if model.config.use_moe else 'dense'})")

    tmp = tempfile.TemporaryDirectory()
    files = {}
    for t in OUTTYPES:
        files[t] = Path(tmp.name) / f"model-{t}.gguf"
        write_gguf(model, args.tokenizer, files[t], t)
        print(f"GGUF {t}: {files[t].stat().st_size / 2**20:.1f} MiB")

    print(f"agreement with ours ({args.agree_tokens} greedy tokens per prompt, f32 KV cache"
          f"{'; random weights: these lines mean little' if not args.model else ''}):")
    for t in OUTTYPES:
        tok_eq, texts, m, total, ident, n, worst = agreement_row(model, files[t], tokenizer, threads,
                                                                 args.agree_tokens)
        print(f"  {t:5s} tokenization {tok_eq}/{texts} texts equal; greedy {m}/{total} tokens ({m / total:.1%}), "
              f"{ident}/{n} prompts identical; max |logit diff| {worst:.3g}")

    prompt = torch.randint(3, model.config.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(1))
    prompt = prompt.tolist()
    engine = Engine(model, tokenizer=None)
    llms = {t: open_llama(files[t], n_ctx=args.prompt_len + args.new_tokens + 8, threads=threads,
                          all_logits=False, kv_type="f16") for t in OUTTYPES}

    def run_ours():
        return engine.complete(prompt, temperature=0, max_new_tokens=args.new_tokens, ignore_eos=True).completion_tokens

    def run_llama(llm):
        return lambda: len(llama_greedy(llm, prompt, args.new_tokens))

    runners = {"ours": run_ours, **{f"llama.cpp {t}": run_llama(llms[t]) for t in OUTTYPES}}
    print(f"batch-1 decode: prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, runs alternating")
    for fn in runners.values():  # warm-up
        fn()
    speeds = {name: [] for name in runners}
    for r in range(args.rounds):
        for name, fn in runners.items():
            t0 = time.perf_counter()
            n = fn()
            speeds[name].append(n / (time.perf_counter() - t0))
            assert n == args.new_tokens, f"{name} made {n} tokens"
        print(f"round {r + 1}: " + ", ".join(f"{name} {v[-1]:.1f}" for name, v in speeds.items()) + " tokens/s")
    ours = statistics.median(speeds["ours"])
    print(f"median tokens/s: ours {ours:.1f}; " + "; ".join(
        f"{name} {statistics.median(v):.1f} (ratio ours/{name.split()[-1]} {ours / statistics.median(v):.2f}x)"
        for name, v in speeds.items() if name != "ours"))
    for llm in llms.values():
        llm.close()
    tmp.cleanup()


if __name__ == "__main__":
    main()
