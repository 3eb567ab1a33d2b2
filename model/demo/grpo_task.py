"""The demo's task for GRPO (6-grpo_train.py): questions whose answer a program checks, trained on the SFT entities
(data_process.py demo writes them as grpo.jsonl) and measured on the held-out ones (eval_grpo.jsonl) as pass@1 and
pass@k of sampled answers (what RL can reach: the answers sampling already finds now and then, made the first one)."""
import random
from math import comb

import numpy as np

from ..sampling import SamplingParams
from ..rewards import answer_reward
from . import world as W
from .measure import generate_all, proportion, sample, value_baselines

TASK = "heldout_qa"


def qa_rows(world, split, one_wording=False, seed=0):
    """Prompt rows for the questions about one split's entities: every wording, or one random wording per fact
    and language. Each row carries its answer and the other values of the attribute (a rival named in the first
    answer makes it wrong), as the demo's held-out measurements judge answers."""
    rng = random.Random(f"minimind-demo-grpo-{world['seed']}-{split}-{seed}")
    asked = W.entity_qas(world, split)
    if one_wording:
        facts = {}
        for etype, attr, e, lang, k in asked:
            facts.setdefault((etype, attr, e["zh"], lang), []).append((etype, attr, e, lang, k))
        asked = [rng.choice(v) for v in facts.values()]
    rows = []
    for etype, attr, e, lang, k in asked:
        rows.append({"conversations": [{"role": "user", "content": W.question(etype, attr, lang, k, e)}],
                     "answer": e["attrs"][attr][lang], "competitors": W.rivals(world, etype, attr), "lang": lang,
                     "type": etype, "attr": attr, "entity": e["zh"], "split": split})
    rng.shuffle(rows)
    return rows


def pass_at(n, c, k):
    """The chance that k of n sampled answers, c of them right, hold a right one (the unbiased pass@k estimate)."""
    return 1.0 - comb(n - c, k) / comb(n, k)


def pass_at_k(model, tokenizer, rows, k=8, n=None, temperature=1.0, max_new_tokens=40, seed=0, batch=64,
              limit=None, sft_value_counts=None):
    """pass@1 and pass@k on prompt rows ({"conversations", "answer", ...}): n (default k) answers sampled per
    prompt at the rollout temperature, scored by the answer reward, and the greedy answer's accuracy beside them.
    Each is a measurement (value, n, ci95) for report.put; with sft_value_counts also the trivial baselines of
    those rows (always the most common value, a random SFT entity's value)."""
    n = n or k
    rows = sample(rows, limit)
    seeds = np.random.SeedSequence(seed).generate_state(len(rows) * n, dtype=np.uint64) >> np.uint64(1)
    prompts = [r["conversations"] for r in rows]
    sampled = [SamplingParams(temperature=temperature, top_p=1.0, max_new_tokens=max_new_tokens,
                              seed=int(seeds[i * n + j]), stop=["\n"]) for i in range(len(rows)) for j in range(n)]
    greedy = [SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop=["\n"])] * len(rows)
    asked = [p for p in prompts for _ in range(n)] + prompts
    texts = [c.text for c in generate_all(model, tokenizer, asked, sampled + greedy, batch)]
    right = [[answer_reward(texts[i * n + j], r) for j in range(n)] for i, r in enumerate(rows)]
    greedy_right = [answer_reward(t, r) for t, r in zip(texts[len(sampled):], rows)]
    out = {"pass1": proportion([sum(h) / n for h in right]),
           f"pass{k}": proportion([pass_at(n, int(sum(h)), k) for h in right]),
           "greedy": proportion(greedy_right),
           "examples": [{"question": r["conversations"][-1]["content"], "expected": r["answer"],
                         "samples": texts[i * n:i * n + min(n, 3)], "right_of_n": int(sum(right[i]))}
                        for i, r in enumerate(rows[:4])]}
    if sft_value_counts is not None:
        base = value_baselines(rows, sft_value_counts)
        out["baselines"], out["baseline"] = base, max(base.values())
    return out
