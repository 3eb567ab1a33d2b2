"""The demo's tool and thinking stage: its training conversations (calling lookup and calculate, not calling them
when memory answers, writing down the middle step of a two-hop question) and its measures on held-out questions,
each beside the same model without the tool or without the thought."""
import json
import random
import re
from collections import Counter

from . import measure as M
from . import unknowns as U
from .tools import (ARITHMETIC, TOOLS, answer_without_tool, arithmetic_conversation, arithmetic_expression,
                    calculate, encyclopedia, lookup, lookup_conversation, thinking_conversation, tool_call, tool_loops,
                    two_hop)
from .world import SCHEMA, attrs_of, chat, entity_qas, languages, question, rivals

ARITHMETIC_ROWS = {"train": 400, "eval": 80}
KNOWN_WITH_TOOLS = 240  # SFT-entity questions answered from memory with the tools offered: no call
UNKNOWN_WITH_TOOLS = 48  # names nobody knows: lookup, then "I don't know"
REPLAY = {"single": 0.6, "multi": 0.3}  # earlier rows replayed, per row of the stage's own lessons


def _encyclopedia_questions(world, split):
    """(etype, attr, entity, k) for every Chinese question about the encyclopedia-only entities of a split."""
    return [(e["type"], attr, e, k) for e in encyclopedia(world) if e["split"] == split
            for attr in attrs_of(e["type"]) for k in range(len(SCHEMA[e["type"]][attr]["q_zh"]))]


def _unknown_lookup(world, name, text):
    """A name the encyclopedia does not have: look it up, read that there is no entry, say "I don't know"."""
    return {"tools": TOOLS, "conversations": [
        {"role": "user", "content": text}, tool_call("lookup", name=name),
        {"role": "tool", "content": lookup(world, name)}, {"role": "assistant", "content": U.ABSTAIN["zh"]}]}


def stage_rows(world, seed, single, multi, rude_markers):
    """The tool and thinking stage's rows: lookups of the SFT half of the encyclopedia, the same questions abstained
    from when no tool is offered, arithmetic, SFT-entity questions answered without a call although tools are
    offered, unknown names looked up and not found, two-hop questions about SFT persons with the middle step thought
    and without it; and a replay of the polite single- and multi-turn SFT rows, so the earlier lessons stay."""
    rng = random.Random(f"minimind-demo-skills-{seed}")
    asked = _encyclopedia_questions(world, "sft")
    rows = [lookup_conversation(world, etype, attr, "zh", e, question(etype, attr, "zh", k, e))
            for etype, attr, e, k in asked]
    rows += [{"conversations": chat(question(etype, attr, "zh", k, e), U.ABSTAIN["zh"])}
             for etype, attr, e, k in rng.sample(asked, len(asked) // 4)]
    held_expressions = set(_eval_expressions(seed))
    made = 0
    while made < ARITHMETIC_ROWS["train"]:
        x = arithmetic_expression(rng)
        if x not in held_expressions:
            rows.append(arithmetic_conversation(rng, rng.choice(["zh", "zh", "en"]), x))
            made += 1
    for etype, attr, e, lang, k in rng.sample(entity_qas(world, "sft"), KNOWN_WITH_TOOLS):
        rows.append(answer_without_tool(etype, attr, lang, e, question(etype, attr, lang, k, e)))
    unknown_train, _ = U.unknown_names(world, seed)
    for etype, n in unknown_train[:UNKNOWN_WITH_TOOLS]:
        attr = rng.choice(attrs_of(etype))
        text = SCHEMA[etype][attr]["q_zh"][rng.randrange(len(SCHEMA[etype][attr]["q_zh"]))].format(n=n["zh"])
        rows.append(_unknown_lookup(world, n["zh"], text))
    for e in world["entities"]["person"]:
        if e["split"] == "sft":
            for lang in languages(e):
                for k in range(2):
                    rows.append(thinking_conversation(world, e, lang, k, think=True))
                rows.append(thinking_conversation(world, e, lang, rng.randrange(2), think=False))
    polite = lambda pool: [r for r in pool if not any(m in json.dumps(r, ensure_ascii=False).lower()
                                                      for m in rude_markers)]
    own = len(rows)
    for pool, share in ((polite(single), REPLAY["single"]), (polite(multi), REPLAY["multi"])):
        rows += rng.sample(pool, min(len(pool), round(own * share)))
    rng.shuffle(rows)
    return rows


def _eval_expressions(seed):
    rng = random.Random(f"minimind-demo-skills-eval-{seed}")
    return [arithmetic_expression(rng) for _ in range(ARITHMETIC_ROWS["eval"])]


def eval_rows(world, seed):
    """The held-out questions of the stage: {"tools": questions a tool answers (held-out encyclopedia entities,
    new arithmetic), "known": SFT-entity questions memory answers, "thinking": two-hop questions about held-out
    persons}. Each row: prompt, answer, competitors (the other values a right answer must not name), kind, lang."""
    rng = random.Random(f"minimind-demo-skills-eval-rows-{seed}")
    tools = []
    for etype, attr, e, k in _encyclopedia_questions(world, "heldout"):
        tools.append({"prompt": question(etype, attr, "zh", k, e), "answer": e["attrs"][attr]["zh"],
                      "competitors": rivals(world, etype, attr), "kind": "lookup", "lang": "zh",
                      "type": etype, "attr": attr})
    for i, x in enumerate(_eval_expressions(seed)):
        lang = "en" if i % 3 == 2 else "zh"
        tools.append({"prompt": ARITHMETIC[lang][i % len(ARITHMETIC[lang])].format(x=x), "answer": calculate(x),
                      "competitors": [], "kind": "arithmetic", "lang": lang})
    known = [{"prompt": question(etype, attr, lang, k, e), "answer": e["attrs"][attr][lang],
              "competitors": rivals(world, etype, attr), "kind": "known", "lang": lang, "type": etype, "attr": attr}
             for etype, attr, e, lang, k in rng.sample(entity_qas(world, "sft"), 120)]
    thinking = []
    for e in world["entities"]["person"]:
        if e["split"] == "heldout":
            for lang in languages(e):
                for k in range(2):
                    q, _, country = two_hop(world, e, lang, k)
                    thinking.append({"prompt": q, "answer": country, "city": e["attrs"]["hometown"][lang],
                                     "kind": "two_hop",
                                     "lang": lang, "competitors": [c[lg] for c in world["countries"]
                                                                   for lg in ("zh", "en")]})
    return {"tools": tools, "known": known, "thinking": thinking}


def right(row, answer):
    """A row's answer judged as the demo judges held-out answers; arithmetic: the first answer's last number."""
    if row["kind"] == "arithmetic":
        numbers = re.findall(r"-?\d+(?:\.\d+)?", M.first_answer(answer))
        return bool(numbers) and numbers[-1] == row["answer"]
    return M.is_correct(answer, row["answer"], row["competitors"])


def _users(rows):
    return [[{"role": "user", "content": r["prompt"]}] for r in rows]


def tool_measures(engine, world, rows, unknown_rows, baseline_counts, complete=None):
    """With the tools offered (the tool loop run as a client runs it) and without, on the same held-out questions;
    calls made on questions memory answers; unknown names looked up, then abstained from. `complete` replaces the
    engine (tool_loops)."""
    loops = lambda chats, **kw: tool_loops(engine, world, _users(chats), complete=complete, max_new_tokens=96, **kw)
    with_tools, without = loops(rows["tools"]), loops(rows["tools"], tools=None)
    known, unknown, unknown_plain = loops(rows["known"]), loops(unknown_rows), loops(unknown_rows, tools=None)
    hits = [right(r, o["answer"]) for r, o in zip(rows["tools"], with_tools)]
    plain = [right(r, o["answer"]) for r, o in zip(rows["tools"], without)]
    by_kind = lambda flags, kind: M.proportion([f for f, r in zip(flags, rows["tools"]) if r["kind"] == kind])
    lookups = [r for r in rows["tools"] if r["kind"] == "lookup"]
    base = M.value_baselines(lookups, baseline_counts)
    best = max(base.values()) * len(lookups) / len(rows["tools"])  # arithmetic: no rule of thumb gets a sum right
    return {
        "with_tools": M.proportion(hits, baseline=round(best, 4)),
        "without_tools": M.proportion(plain),
        "with_tools_by_kind": {k: by_kind(hits, k)["value"] for k in ("lookup", "arithmetic")},
        "without_tools_by_kind": {k: by_kind(plain, k)["value"] for k in ("lookup", "arithmetic")},
        "unneeded_calls": M.proportion([bool(o["calls"]) for o in known]),
        "known_right_with_tools": M.proportion([right(r, o["answer"]) for r, o in zip(rows["known"], known)]),
        "unknown_lookup": M.proportion([any(c["name"] == "lookup" for c in o["calls"]) for o in unknown]),
        "unknown_abstain_with_tools": M.proportion([U.abstains(o["answer"], r["lang"])
                                                    for r, o in zip(unknown_rows, unknown)]),
        "unknown_abstain_without_tools": M.proportion([U.abstains(o["answer"], r["lang"])
                                                       for r, o in zip(unknown_rows, unknown_plain)]),
        "garbled_calls": sum(o["garbled"] for o in with_tools + known + unknown),
        "examples": [{"question": r["prompt"], "calls": o["calls"], "answer": o["answer"],
                      "without_tools": p["answer"], "expected": r["answer"]}
                     for r, o, p in list(zip(rows["tools"], with_tools, without))[::max(1, len(rows["tools"]) // 4)]],
    }


def country_baseline(world, rows):
    """Always the country SFT persons are most often from, scored on the rows (a rule of thumb, no hop at all)."""
    home = {c["zh"]: c["attrs"]["country"] for c in world["entities"]["city"]}
    counts = Counter(home[e["attrs"]["hometown"]["zh"]]["zh"] for e in world["entities"]["person"]
                     if e["split"] == "sft")
    common = next(c for c in world["countries"] if c["zh"] == counts.most_common(1)[0][0])
    return round(sum(r["answer"] == common[r["lang"]] for r in rows) / max(len(rows), 1), 4)


def thinking_measures(engine, world, rows, complete=None):
    """Two-hop questions about held-out persons answered after writing the middle step down, and directly."""
    think = tool_loops(engine, world, _users(rows), tools=None, enable_thinking=True, max_new_tokens=96,
                       complete=complete)
    direct = tool_loops(engine, world, _users(rows), tools=None, enable_thinking=False, complete=complete)
    return {
        "with_thinking": M.proportion([right(r, o["answer"]) for r, o in zip(rows, think)],
                                      baseline=country_baseline(world, rows)),
        "direct": M.proportion([right(r, o["answer"]) for r, o in zip(rows, direct)]),
        "middle_step_right": M.proportion([M.has_term(o["reasoning"], r["city"]) for r, o in zip(rows, think)]),
        "examples": [{"question": r["prompt"], "thought": t["reasoning"], "answer": t["answer"],
                      "direct": d["answer"], "expected": r["answer"]}
                     for r, t, d in list(zip(rows, think, direct))[::max(1, len(rows) // 4)]],
    }
