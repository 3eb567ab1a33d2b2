"""Measures what each stage did to the model on the demo world's held-out files: fact completion, held-out
questions, identity answers, DPO preference and style, with the answer rule the demo manifest states."""
import json
import random
from contextlib import nullcontext
from pathlib import Path

import torch

from .generate import Engine, SamplingParams


def read_jsonl(path, limit=None, seed=0):
    """Rows of a JSONL file; with limit, a fixed random sample of that many (the same on every run)."""
    rows = [json.loads(l) for l in Path(path).read_text(encoding="utf-8").splitlines() if l.strip()]
    return sample_rows(rows, limit, seed)


def sample_rows(rows, limit=None, seed=0):
    """A fixed random sample of limit rows (all of them when there are fewer)."""
    if limit is not None and len(rows) > limit:
        rows = random.Random(seed).sample(rows, limit)
    return rows


def greedy(model, tokenizer, prompts, max_new_tokens=48, batch=16):
    """Greedy answers to many prompts (chat message lists or raw strings), decoded in batches."""
    engine = Engine(model, tokenizer, max_batch=batch)
    params = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens)
    requests = [engine.prepare(p, params) for p in prompts]
    waiting = list(requests)
    with torch.no_grad():
        while waiting or engine.active:
            while waiting and len(engine.active) < batch:
                engine.add(waiting.pop(0))
            if engine.active:
                engine.step()
    return [r.result().text for r in requests]


def contains(text, answer):
    return answer.lower() in text.lower()


def fact_accuracy(model, tokenizer, rows):
    """Pretraining: does the model complete a held-out phrasing of a fact with the right value?"""
    outs = greedy(model, tokenizer, ["<s>" + r["prompt"] for r in rows])
    hits = [contains(o, r["answer"]) for o, r in zip(outs, rows)]
    return sum(hits) / len(rows), examples(rows, outs, hits, "prompt")


def qa_accuracy(model, tokenizer, rows):
    """SFT: does the chat answer to a question about a held-out entity contain the right value?"""
    outs = greedy(model, tokenizer, [[{"role": "user", "content": r["question"]}] for r in rows])
    hits = [contains(o, r["answer"]) for o, r in zip(outs, rows)]
    return sum(hits) / len(rows), examples(rows, outs, hits, "question")


def keyword_rate(model, tokenizer, prompts, keywords, any_of=False):
    """Share of chat answers containing the keyword(s): identity answers, rude/evasive markers."""
    outs = greedy(model, tokenizer, [[{"role": "user", "content": p}] for p in prompts])
    test = any if any_of else all
    hits = [test(contains(o, k) for k in keywords) for o in outs]
    return sum(hits) / max(len(prompts), 1), [{"prompt": p, "output": o, "hit": h}
                                              for p, o, h in list(zip(prompts, outs, hits))[:4]]


def examples(rows, outs, hits, key, n=4):
    return [{key: r[key], "expected": r["answer"], "output": o, "correct": h}
            for r, o, h in list(zip(rows, outs, hits))[:n]]


def pair_logps(model, tokenizer, path, max_length=256):
    """Summed log-probability of the chosen and of the rejected answer of each pair of a DPO file."""
    from .dataset import DPODataset, collate_pad
    from .trainer import pad_cat, sequence_logps
    dataset = DPODataset(path, tokenizer, max_length=max_length)
    chosen, rejected = [], []
    with torch.no_grad():
        for start in range(0, len(dataset), 32):
            b = collate_pad([dataset[i] for i in range(start, min(start + 32, len(dataset)))])
            n = b["chosen_input_ids"].shape[0]
            logp = sequence_logps(model, pad_cat(b["chosen_input_ids"], b["rejected_input_ids"]),
                                  pad_cat(b["chosen_labels"], b["rejected_labels"], value=-100), nullcontext())
            chosen.append(logp[:n])
            rejected.append(logp[n:])
    return torch.cat(chosen), torch.cat(rejected)


def preference_accuracy(policy_logps, reference_logps):
    """DPO's implicit reward r = log pi(y|x) - log pi_ref(y|x): the share of pairs with r_chosen > r_rejected,
    a tie counting one half (before DPO the policy is the reference, every reward is 0: 0.5)."""
    (pc, pr), (rc, rr) = policy_logps, reference_logps
    margin = (pc - rc) - (pr - rr)
    return float(((margin > 1e-6).float() + 0.5 * (margin.abs() <= 1e-6).float()).mean())


def likelihood_preference(logps):
    """The share of pairs whose chosen answer is more likely than the rejected one under the model alone."""
    chosen, rejected = logps
    return float((chosen > rejected).float().mean())
