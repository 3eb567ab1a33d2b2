"""Serving throughput of my_openai_api.py over real HTTP: aggregate generated tokens/s with 1, 4 and 16 concurrent
streaming clients (decoding is batched across requests), and a check that every answer is unchanged by the batching.

    python bench/bench_serve.py                  # LMConfig() (26.88M, random init) served from a temp folder
    python bench/bench_serve.py --model out/full_sft_512.pth --new_tokens 128

Each level sends the same 16 greedy requests (ignore_eos, so every answer has exactly new_tokens tokens):
1 client sends them one after another, 4 clients four each, 16 clients one each.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench_decode import machine  # noqa: E402

QUESTIONS = ["长江有多长？", "泰山在哪里？", "世界上最高的山峰是什么？", "万有引力是谁提出的？", "大熊猫的主要食物是什么？",
             "海水为什么是咸的？", "What is the longest river in China?", "Who proposed universal gravitation?"]


def random_model(folder):
    """LMConfig() with random weights, saved as our .pth (the server then uses the shipped tokenizer)."""
    import torch

    from model.checkpoint import save_weights
    from model.LMConfig import LMConfig
    from model.model import Transformer
    torch.manual_seed(0)
    path = Path(folder) / "bench_26m.pth"
    save_weights(Transformer(LMConfig()), path)
    return path


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ask(url, i, new_tokens):
    """One streaming request; returns (text, completion tokens)."""
    body = {"messages": [{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} ({i})"}], "stream": True,
            "temperature": 0, "max_tokens": new_tokens, "ignore_eos": True, "stream_options": {"include_usage": True}}
    text, tokens = [], 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                text.append(choice["delta"].get("content") or "")
    return "".join(text), tokens


def run_level(url, clients, n_requests, new_tokens):
    """n_requests spread over `clients` threads; returns (answers by request, total tokens, seconds)."""
    answers, tokens, errors = {}, [0] * clients, []

    def client(c):
        try:
            for i in range(c, n_requests, clients):
                answers[i], n = ask(url, i, new_tokens)
                tokens[c] += n
        except Exception as e:  # reported by the caller
            errors.append(e)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return answers, sum(tokens), elapsed


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a checkpoint to serve (default: LMConfig() with random weights)")
    p.add_argument("--tokenizer", default=None, help="(default: the shipped one)")
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--levels", default="1,4,16", help="concurrent clients per level")
    p.add_argument("--rounds", type=int, default=2, help="times each level runs (the median is reported)")
    p.add_argument("--threads", type=int, default=0, help="the server's torch CPU threads (default: torch's choice)")
    args = p.parse_args()

    tmp = tempfile.mkdtemp(prefix="bench_serve_")
    model, tokenizer = args.model or random_model(tmp), args.tokenizer
    port = free_port()
    cmd = [sys.executable, str(ROOT / "my_openai_api.py"), "--model", str(model), "--port", str(port),
           "--max-batch", "16", "--threads", str(args.threads)]
    if tokenizer:
        cmd += ["--tokenizer", str(tokenizer)]
    log = open(Path(tmp) / "server.log", "w+")  # a file, not a pipe: a pipe nobody reads can block the server
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if server.poll() is not None:
                log.seek(0)
                sys.exit(f"the server exited:\n{log.read()}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        print(f"machine: {machine()}; the server runs with {args.threads or 'the default number of'} torch threads")
        print(f"serving {model}; {args.requests} greedy streaming requests of {args.new_tokens} new tokens per level")
        ask(url, 0, 8)  # warm-up
        levels = [int(x) for x in args.levels.split(",")]
        speeds, answers = {c: [] for c in levels}, {}
        for r in range(args.rounds):  # levels alternate, so a busy spell on the machine hits all of them
            for clients in levels:
                before = httpx.get(url + "/health").json()
                got, tokens, seconds = run_level(url, clients, args.requests, args.new_tokens)
                after = httpx.get(url + "/health").json()
                steps = after["steps"] - before["steps"]
                decode_s = after["decode_seconds"] - before["decode_seconds"]
                prefill_s = after["prefill_seconds"] - before["prefill_seconds"]
                speeds[clients].append(tokens / seconds)
                answers.setdefault(clients, got)
                print(f"round {r + 1}: {clients:3d} clients: {tokens:5d} tokens in {seconds:6.1f} s = "
                      f"{tokens / seconds:7.1f} tokens/s aggregate, {tokens / max(steps, 1):5.1f} requests per "
                      f"decode step on average, {1e3 * decode_s / max(steps, 1):5.1f} ms per step; the engine "
                      f"decoded {100 * decode_s / seconds:3.0f}% and prefilled {100 * prefill_s / seconds:2.0f}% "
                      "of the time")
        base = levels[0]
        base_tps = statistics.median(speeds[base])
        print(f"median {base:3d} clients: {base_tps:7.1f} tokens/s")
        for clients in levels[1:]:
            tps = statistics.median(speeds[clients])
            same = sum(answers[clients][i] == answers[base][i] for i in answers[base])
            print(f"median {clients:3d} clients: {tps:7.1f} tokens/s = {tps / base_tps:.2f}x {base} client(s) "
                  f"(target for 16: >= 6x); answers unchanged {same}/{len(answers[base])}")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
