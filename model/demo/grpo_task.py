"""The demo's task for GRPO (6-grpo_train.py): questions whose answer a program checks, trained on the SFT entities
(data_process.py demo writes them as grpo.jsonl) and measured on the held-out ones (eval_grpo.jsonl) as pass@1 and
pass@k of sampled answers (what RL can reach: the answers sampling already finds now and then, made the first one)."""
import random
import re
from math import comb

import numpy as np

from ..sampling import SamplingParams
from ..rewards import answer_reward, clean_reward
from . import rows as R, unknowns as U, world as W
from .measure import generate_all, proportion, sample, value_baselines

TASK = "heldout_qa"
WHOLE_REPLY_TOKENS = 64  # a whole reply is judged clean only if the model ends it within this many tokens
# Each earlier lesson replayed among the prompts (--grpo_replay, on by default), as a share of the QA rows: rewarded
# only for right facts, the demo's setting (3e-4, 240 steps) makes the policy answer everything with a fact and
# forget who it is, when to say "I don't know", to stay polite when rushed and to follow a pronoun. Unseen "who are
# you" wordings drift towards "I don't know": a larger "abstain" share made it worse, identity 1.0 instead of 0.5
# halved the drift on seed 1 (see the README).
REPLAY = {"identity": 1.0, "abstain": 0.1, "rushed": 0.3, "followup": 0.3}


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


def identity_sentence(lang):
    """The first sentence of the trained identity answer, without its end mark ("I am MiniMind, a small ...")."""
    return re.split(r"[。.]", W.IDENTITY_ANSWER[lang])[0]


def replay_rows(world, seed, qa):
    """Rows that score the earlier stages' lessons with the same answer reward, len(qa) * share of each: the
    trained identity wordings (answer: the first sentence of the trained identity answer, not just the keyword, so
    a reply that keeps the name and garbles the rest scores 0), the trained out-of-world questions (any abstention
    marker), QA rows behind a rushed prefix (the fact, and no rude marker DPO was shown), and follow-ups that name
    an SFT entity of the turn before by a pronoun (the fact)."""
    rng = random.Random(f"minimind-demo-grpo-replay-{seed}")
    count = lambda kind: round(len(qa) * REPLAY[kind])
    identity = [(text, lang) for text, lang, _, eval_only in R.identity_questions() if not eval_only]
    abstain = U.abstain_rows(world, seed, False)
    out = [{"conversations": [{"role": "user", "content": text}], "answer": identity_sentence(lang), "lang": lang,
            "lesson": "identity"} for text, lang in _draw(rng, identity, count("identity"))]
    out += [{"conversations": [{"role": "user", "content": q}], "answer": list(U.ABSTAIN_MARKERS[lang]), "lang": lang,
             "lesson": "abstain"} for q, _, lang, _ in _draw(rng, abstain, count("abstain"))]
    rude = {lang: [m for m in W.STYLE_MARKERS if any(m.lower() in r.lower() for r in replies)]
            for lang, replies in W.RUDE.items()}  # the markers of the rude replies DPO was shown
    for row in _draw(rng, qa, count("rushed")):
        lang = row["lang"]
        turn = {"role": "user", "content": rng.choice(W.TRIGGERS[lang]) + row["conversations"][-1]["content"]}
        out.append({**row, "conversations": [turn], "avoid": rude[lang], "lesson": "rushed"})
    entities = {(t, e["zh"]): e for t in W.TYPES for e in world["entities"][t]}
    for row in _draw(rng, qa, count("followup")):
        etype, attr, lang, e = row["type"], row["attr"], row["lang"], entities[row["type"], row["entity"]]
        first = rng.choice([a for a in W.attrs_of(etype) if a != attr])
        k1, k2 = (rng.randrange(len(W.SCHEMA[etype][a]["q_" + lang])) for a in (first, attr))
        turns = W.chat(W.question(etype, first, lang, k1, e), W.canonical_answer(etype, first, lang, e))
        turns.append({"role": "user", "content": W.followup_question(etype, attr, lang, k2)})
        out.append({**row, "conversations": turns, "lesson": "followup"})
    return out


def _draw(rng, items, n):
    """n items: every item once per full pass, the rest sampled without repeats."""
    return [x for _ in range(n // len(items)) for x in items] + rng.sample(items, n % len(items))


def prompt_rows(world, seed, replay=False):
    """grpo.jsonl: the QA rows about SFT entities, with replay also the earlier lessons' rows, shuffled."""
    qa = qa_rows(world, "sft")
    if not replay:
        return qa
    rows = qa + replay_rows(world, seed, qa)
    random.Random(f"minimind-demo-grpo-mix-{seed}").shuffle(rows)
    return rows


def pass_at(n, c, k):
    """The chance that k of n sampled answers, c of them right, hold a right one (the unbiased pass@k estimate)."""
    return 1.0 - comb(n - c, k) / comb(n, k)


def pass_at_k(model, tokenizer, rows, k=8, n=None, temperature=1.0, max_new_tokens=40, seed=0, batch=64,
              limit=None, sft_value_counts=None):
    """pass@1 and pass@k on prompt rows ({"conversations", "answer", ...}): n (default k) answers sampled per
    prompt at the rollout temperature, scored by the answer reward, the greedy answer's accuracy beside them, and
    the share of whole greedy replies (no stop at the first line) that are clean by the clean reward.
    Each is a measurement (value, n, ci95) for report.put; with sft_value_counts also the trivial baselines of
    those rows (always the most common value, a random SFT entity's value)."""
    n = n or k
    rows = sample(rows, limit)
    seeds = np.random.SeedSequence(seed).generate_state(len(rows) * n, dtype=np.uint64) >> np.uint64(1)
    prompts = [r["conversations"] for r in rows]
    sampled = [SamplingParams(temperature=temperature, top_p=1.0, max_new_tokens=max_new_tokens,
                              seed=int(seeds[i * n + j]), stop=["\n"]) for i in range(len(rows)) for j in range(n)]
    greedy = [SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop=["\n"])] * len(rows)
    whole = [SamplingParams(temperature=0.0, max_new_tokens=WHOLE_REPLY_TOKENS)] * len(rows)
    asked = [p for p in prompts for _ in range(n)] + prompts + prompts
    done = generate_all(model, tokenizer, asked, sampled + greedy + whole, batch)
    texts = [c.text for c in done]
    right = [[answer_reward(texts[i * n + j], r) for j in range(n)] for i, r in enumerate(rows)]
    greedy_right = [answer_reward(t, r) for t, r in zip(texts[len(sampled):], rows)]
    replies = done[len(sampled) + len(rows):]
    out = {"pass1": proportion([sum(h) / n for h in right]),
           f"pass{k}": proportion([pass_at(n, int(sum(h)), k) for h in right]),
           "greedy": proportion(greedy_right),
           "clean": proportion([clean_reward(c.text, r, c.finish_reason == "stop") for c, r in zip(replies, rows)]),
           "examples": [{"question": r["conversations"][-1]["content"], "expected": r["answer"],
                         "samples": texts[i * n:i * n + min(n, 3)], "right_of_n": int(sum(right[i]))}
                        for i, r in enumerate(rows[:4])]}
    if sft_value_counts is not None:
        base = value_baselines(rows, sft_value_counts)
        out["baselines"], out["baseline"] = base, max(base.values())
    return out
