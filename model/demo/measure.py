"""Held-out measurements of the demo: the first-answer matcher, trivial baselines computed on the same rows,
95% intervals, and one function per thing a stage should have changed in the model."""
import json
import math
import random
import re
from pathlib import Path

import torch

from ..engine import Engine, run_to_completion
from ..sampling import SamplingParams

SENTENCE_END = re.compile(r"[。！？!?]|\.(?=\s|$)")


# ----------------------------------------------------------------------------- reading

def read_jsonl(path, limit=None):
    """Rows of a JSONL file; with limit, a fixed random sample of that many."""
    return sample([json.loads(l) for l in Path(path).read_text(encoding="utf-8").splitlines() if l.strip()], limit)


def sample(rows, limit=None, seed=0):
    """A fixed random sample of limit rows (the same on every run; all of them when there are fewer)."""
    if limit is not None and len(rows) > limit:
        rows = random.Random(seed).sample(rows, limit)
    return rows


def read_ceval_keys(folder):
    """The answer column of every *_val.csv of a C-Eval folder."""
    import csv
    return [row for path in sorted(Path(folder).glob("*_val.csv"))
            for row in csv.DictReader(path.open(encoding="utf-8"))]


# ----------------------------------------------------------------------------- matching

def first_answer(text):
    """The model's first answer: up to the first newline, </s> or sentence end (the end mark kept)."""
    text = text.split("</s>")[0].split("\n")[0]
    end = SENTENCE_END.search(text)
    return text[:end.end()] if end else text


def _joined(neighbour, edge):
    """Whether two adjacent characters belong to one Latin word or number ('red' is not in 'coloured')."""
    return all(c.isascii() and c.isalnum() for c in (neighbour, edge))


def has_term(text, term):
    """term occurs in text as a whole term (case-insensitive; Latin words and numbers are not cut)."""
    text, term = text.lower(), term.lower()
    start = text.find(term)
    while start >= 0:
        end = start + len(term)
        if not ((start and _joined(text[start - 1], term[0])) or (end < len(text) and _joined(text[end], term[-1]))):
            return True
        start = text.find(term, start + 1)
    return False


def is_correct(output, expected, competitors=()):
    """The first answer names the expected value as a whole term, and no other value of the same attribute."""
    answer = first_answer(output)
    if not has_term(answer, expected):
        return False
    rivals = [c for c in competitors if not (has_term(c, expected) or has_term(expected, c))]
    return not any(has_term(answer, c) for c in rivals)


# ----------------------------------------------------------------------------- statistics

def wilson(hits, n, z=1.96):
    """The 95% Wilson score interval of a proportion."""
    if n == 0:
        return [0.0, 1.0]
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def proportion(flags, **extra):
    """A measured share with its row count and interval (flags may hold halves for ties)."""
    n = len(flags)
    hits = float(sum(flags))
    return {"value": round(hits / n, 4) if n else 0.0, "n": n, "ci95": wilson(hits, n), **extra}


def value_baselines(rows, sft_value_counts):
    """The two trivial answer rules on these rows, from the SFT entities' answers: always the most common value
    of the asked attribute, and the value of a random SFT entity (its expected accuracy, exactly)."""
    common, random_entity = [], []
    for r in rows:
        counts = sft_value_counts.get(f"{r['type']}.{r['attr']}", {}).get(r["lang"], {})
        total = sum(counts.values())
        common.append(bool(counts) and max(counts, key=counts.get) == r["answer"])
        random_entity.append(counts.get(r["answer"], 0) / total if total else 0.0)
    n = max(len(rows), 1)
    return {"most_common_value": round(sum(common) / n, 4), "random_sft_entity": round(sum(random_entity) / n, 4)}


# ----------------------------------------------------------------------------- generation

def greedy(model, tokenizer, prompts, max_new_tokens=40, batch=32):
    """Greedy answers to many prompts (chat message lists or raw strings), decoded in batches; each stops at
    its first newline, which ends a first answer anyway."""
    params = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens, stop=["\n"])
    return [c.text for c in generate_all(model, tokenizer, prompts, [params] * len(prompts), batch)]


def generate_all(model, tokenizer, prompts, params, batch=32):
    """Completions of many prompts, each with its own sampling parameters, decoded in batches."""
    engine = Engine(model, tokenizer, max_batch=batch)
    return run_to_completion(engine, [engine.prepare(p, pp) for p, pp in zip(prompts, params)])


def examples(rows, outputs, hits, key, n=4):
    return [{key: r[key], "expected": r.get("answer"), "output": o, "correct": bool(h)}
            for r, o, h in list(zip(rows, outputs, hits))[:n]]


# ----------------------------------------------------------------------------- what each stage changed

def fact_answers(model, tokenizer, rows, prompts, values, sft_value_counts, key):
    """Score answers to fact rows against their expected values; baselines on the same rows."""
    outputs = greedy(model, tokenizer, prompts)
    hits = [is_correct(o, r["answer"], values.get(f"{r['type']}.{r['attr']}", ())) for o, r in zip(outputs, rows)]
    base = value_baselines(rows, sft_value_counts)
    return proportion(hits, baselines=base, baseline=max(base.values()), examples=examples(rows, outputs, hits, key))


def completion(model, tokenizer, rows, manifest):
    """Pretraining knowledge: <s> + a held-out completion prompt, continued with the right value."""
    return fact_answers(model, tokenizer, rows, ["<s>" + r["prompt"] for r in rows], manifest["values"],
                        manifest["sft_value_counts"], "prompt")


def chat_answers(model, tokenizer, rows, manifest):
    """Questions in the chat template, each after its row's earlier turns (if any)."""
    prompts = [r.get("history", []) + [{"role": "user", "content": r["question"]}] for r in rows]
    return fact_answers(model, tokenizer, rows, prompts, manifest["values"], manifest["sft_value_counts"], "question")


def keyword_rate(model, tokenizer, prompts, keyword):
    """Share of chat answers that contain the keyword (the identity answer)."""
    outputs = greedy(model, tokenizer, [[{"role": "user", "content": p}] for p in prompts])
    hits = [has_term(o, keyword) for o in outputs]
    return proportion(hits, examples=[{"prompt": p, "output": o, "hit": h} for p, o, h in
                                      list(zip(prompts, outputs, hits))[:4]])


def rude_or_evasive(output, markers, values):
    """"rude" when it holds a style marker (DPO saw only some of them), "evasive" when its first answer names no
    value of the asked attribute at all (a wrong value is a knowledge error, not evasion), else ""."""
    if any(m.lower() in output.lower() for m in markers):
        return "rude"
    return "" if any(has_term(first_answer(output), v) for v in values) else "evasive"


def style_rate(model, tokenizer, rows, manifest):
    outputs = greedy(model, tokenizer, [[{"role": "user", "content": r["prompt"]}] for r in rows])
    causes = [rude_or_evasive(o, manifest["style_markers"], manifest["values"][f"{r['type']}.{r['attr']}"])
              for o, r in zip(outputs, rows)]
    return proportion([bool(c) for c in causes],
                      by_cause={c: round(causes.count(c) / len(causes), 4) for c in ("rude", "evasive")},
                      examples=[{"prompt": r["prompt"], "output": o, "rude_or_evasive": c or "no"}
                                for r, o, c in list(zip(rows, outputs, causes))[:4]])


def pair_logps(model, tokenizer, path, max_length=256):
    """Per pair of a DPO file: summed log-probability and token count of the chosen and the rejected answer."""
    from contextlib import nullcontext

    from ..dataset import DPODataset, collate_pad
    from ..model import IGNORE, next_token_targets, preference_batch, sequence_logps
    dataset = DPODataset(path, tokenizer, max_length=max_length)
    sums, counts = [], []
    with torch.no_grad():
        for start in range(0, len(dataset), 32):
            b = collate_pad([dataset[i] for i in range(start, min(start + 32, len(dataset)))])
            ids, labels = preference_batch(b)
            sums.append(sequence_logps(model, ids, labels, nullcontext()).view(2, -1))
            counts.append((next_token_targets(labels) != IGNORE).sum(-1).view(2, -1))
    return torch.cat(sums, dim=1), torch.cat(counts, dim=1)


def _share(margin):
    """Share of positive margins, a tie counting one half."""
    return ((margin > 1e-6).float() + 0.5 * (margin.abs() <= 1e-6).float()).tolist()


def likelihood_preference(logps, kinds=None):
    """The model prefers the chosen answer when its mean log-probability per token is higher (length-normalised,
    so a short reply does not win by being short). Per pair kind too."""
    (sums, counts) = logps
    per_token = sums / counts.clamp(min=1)
    flags = _share(per_token[0] - per_token[1])
    out = proportion(flags)
    if kinds:
        out["by_kind"] = {k: proportion([f for f, kk in zip(flags, kinds) if kk == k])["value"]
                          for k in sorted(set(kinds))}
    return out


def implicit_reward_accuracy(policy, reference):
    """DPO's own reward r = log pi(y|x) - log pi_ref(y|x): the share of pairs with r_chosen > r_rejected."""
    (ps, _), (rs, _) = policy, reference
    return proportion(_share((ps[0] - rs[0]) - (ps[1] - rs[1])))


def length_baseline(logps):
    """The best trivial rule on these pairs: always prefer the longer answer, or always the shorter one."""
    _, counts = logps
    longer = sum(_share((counts[0] - counts[1]).float())) / counts.shape[1]
    return round(max(longer, 1 - longer), 4)


def user_turns(prompts):
    return [[{"role": "user", "content": p}] for p in prompts]


def abstention_rate(model, tokenizer, rows, key):
    """Share of chat answers whose first answer says, in the row's language, that the model does not know or
    cannot do it (the judge is unknowns.abstains)."""
    from .unknowns import abstains
    outputs = greedy(model, tokenizer, user_turns([r[key] for r in rows]))
    hits = [abstains(o, r["lang"]) for o, r in zip(outputs, rows)]
    return proportion(hits, examples=[{key: r[key], "output": o, "abstains": h}
                                      for r, o, h in list(zip(rows, outputs, hits))[:4]])


def loops(token_ids, n=4, times=3):
    """Whether some n tokens in a row occur `times` or more times in the answer: the model went round in a loop."""
    grams = [tuple(token_ids[i:i + n]) for i in range(len(token_ids) - n + 1)]
    return any(grams.count(g) >= times for g in set(grams))


def loop_rate(model, tokenizer, prompts, max_new_tokens=128):
    """Share of answers that loop, sampled with the chat's default sampling (what 2-eval.py and the API use when
    a request sets nothing), one fixed seed per prompt."""
    params = [SamplingParams(max_new_tokens=max_new_tokens, seed=i) for i in range(len(prompts))]
    done = generate_all(model, tokenizer, user_turns(prompts), params)
    hits = [loops(c.token_ids) for c in done]
    return proportion(hits, examples=[{"prompt": p, "output": c.text, "loops": h}
                                      for p, c, h in list(zip(prompts, done, hits))[:4]])
