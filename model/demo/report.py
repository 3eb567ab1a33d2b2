"""The demo's report card: loads each stage's checkpoint, measures it on the held-out files with its trivial
baselines, judges the targets, and writes report.json, report.md and the plots."""
import json
from pathlib import Path

import torch

from . import measure as M
from ..checkpoint import load_model
from ..files import atomic_write
from ..train_log import read_metrics

# (stage, key, target, what it must also beat): a negative target is an upper bound (at most -target). Each
# comparison (reference, margin) asks value >= reference + margin (for an upper bound: value <= reference + margin);
# a reference is a key of the same stage or "stage.key". "final" is the chain's last checkpoint, the chat model.
TARGETS = [
    ("pretrain", "fact_accuracy", 0.90, [("fact_baseline", 0.40)]),
    ("pretrain", "fact_accuracy_new_wording", 0.70, [("fact_baseline", 0.40)]),
    ("sft", "heldout_accuracy", 0.60, [("heldout_baseline", 0.40)]),
    ("sft", "retention", 0.80, [("retention_baseline", 0.40)]),
    ("sft", "abstention", 0.80, []),
    ("sft", "wrong_abstention", -0.10, []),
    ("sft_multi", "followup", 0.60, [("sft.followup", 0.30)]),
    ("lora", "identity", 0.95, [("sft_multi.identity", 0.50)]),
    ("lora", "leak_rate", -0.05, []),
    ("dpo", "pref_acc_after", 0.90, [("pref_acc_before", 0.30)]),
    ("dpo", "rude_rate", -0.05, []),
    ("tools", "with_tools", 0.80, [("without_tools", 0.50)]),
    ("tools", "unneeded_calls", -0.20, []),
    ("thinking", "with_thinking", 0.60, [("direct", 0.30)]),
    ("grpo", "pass1_after", 0.0, [("pass1_before", 0.15)]),
    ("grpo", "pass1_after_over_pass8_before", 0.80, []),
    ("final", "heldout_accuracy", 0.60, [("heldout_baseline", 0.40), ("sft.heldout_accuracy", -0.05)]),
    ("final", "followup", 0.60, [("sft_multi.followup", -0.05)]),
    ("final", "identity", 0.95, [("lora.identity", -0.05)]),
    ("final", "leak_rate", -0.05, []),
    ("final", "rude_rate", -0.05, []),
    ("final", "abstention", 0.80, [("sft.abstention", -0.05)]),
    ("final", "wrong_abstention", -0.10, []),
    ("final", "loop_rate", -0.05, []),
    ("final", "with_tools", 0.80, [("tools.with_tools", -0.05)]),
    ("final", "unneeded_calls", -0.20, []),
    ("final", "with_thinking", 0.60, [("thinking.with_thinking", -0.05)]),
    ("ceval_demo", "cloze_accuracy", 0.60, [("baseline", 0.30)]),
]
CHAT_STAGES = ("sft", "sft_multi", "lora", "dpo", "tools", "grpo")  # the chain's chat checkpoints in order; the last is
# final. "tools" only with demo.py --tools_stage; its targets (and the final model's tool targets) are judged only then
STAGE_TITLES = {"sft": "SFT", "sft_multi": "multi-turn SFT", "lora": "LoRA (merged)", "dpo": "DPO",
                "tools": "tools and thinking", "grpo": "GRPO"}
CHAT_MEASURES = [  # (key, what it is) measured on every chat stage
    ("heldout_accuracy", "questions about held-out entities (facts only in pretraining)"),
    ("followup", "follow-ups naming the earlier turn's held-out entity by a pronoun"),
    ("identity", "identity answer to unseen wordings of 'who are you'"),
    ("leak_rate", "identity answer leaking into ordinary questions (lower is better)"),
    ("rude_rate", "rude or evasive answers to impatient questions (lower is better)"),
    ("abstention", "says it does not know / cannot do it, out-of-world questions and requests"),
    ("wrong_abstention", "says it does not know, in-world held-out questions (lower is better)"),
    ("loop_rate", "answers that loop, open prompts, default sampling (lower is better)"),
    ("demo_questions", "the seed's 7 demo questions answered (a sanity check, not held out)"),
]
LIMITS = {  # one line each: what a measurement cannot show
    "demo_questions": "the seed's demo questions are paraphrases of SFT questions: a sanity check of the chat, "
                      "not a held-out measure",
    "sft": "held-out entities' facts occur in pretraining statements only; the questions' templates are SFT's own",
    "dpo": "rude/evasive is judged by style markers (some never shown to DPO) and by whether the answer names any "
           "value of the asked attribute; a polite wrong answer counts as not rude",
    "abstention": "every name of the world is one token of the demo's tokenizer while made-up names are split into "
                  "pieces, so the model may tell a known name from an unknown one by its tokens",
    "loop_rate": "a loop is any 4 tokens in a row occurring 3 times within 128 sampled tokens; short answers that end "
                 "with </s> cannot loop",
}


def train_stats(metrics_path):
    rows = read_metrics(metrics_path)
    out = {"steps": rows[-1]["step"], "tokens": rows[-1].get("tokens"), "first_loss": round(rows[0]["loss"], 4),
           "final_loss": round(rows[-1]["loss"], 4), "tokens_per_s": rows[-1].get("tokens_per_s"),
           "curve": [[r["step"], round(r["loss"], 4)] for r in rows]}
    if "reward" in rows[-1]:  # GRPO: what its rollouts scored, and how far the policy moved from its start
        out["reward_curve"] = [[r["step"], round(r["reward"], 4)] for r in rows]
        out["kl_curve"] = [[r["step"], round(r["kl"], 5)] for r in rows]
    return out


def put(stage, key, measured, baseline_key=None):
    """A measurement into a stage: its value under key, with key_n and key_ci95 beside it."""
    stage[key], stage[f"{key}_n"], stage[f"{key}_ci95"] = measured["value"], measured["n"], measured["ci95"]
    if baseline_key:
        stage[baseline_key] = measured["baseline"]
        stage[f"{baseline_key}s"] = measured["baselines"]
    return measured


def alias(stage, key, source, source_key):
    """stage[key] (with _n and _ci95) is source's measurement under source_key."""
    for suffix in ("", "_n", "_ci95"):
        stage[key + suffix] = source[source_key + suffix]


def chat_measures(model, tok, ev, manifest):
    """Every chat measure of one checkpoint (CHAT_MEASURES), each with _n and _ci95 beside it."""
    out = {}
    put(out, "heldout_accuracy", M.chat_answers(model, tok, ev["questions"], manifest), "heldout_baseline")
    put(out, "followup", M.chat_answers(model, tok, ev["follow"], manifest), "followup_baseline")
    put(out, "identity", M.keyword_rate(model, tok, ev["unseen"], manifest["identity_keyword"]))
    put(out, "leak_rate", M.keyword_rate(model, tok, ev["control"], manifest["identity_keyword"]))
    out["rude_by_cause"] = put(out, "rude_rate", M.style_rate(model, tok, ev["style"], manifest))["by_cause"]
    out["abstention_examples"] = put(out, "abstention", M.abstention_rate(model, tok, ev["abstain"], "prompt"))["examples"]
    put(out, "wrong_abstention", M.abstention_rate(model, tok, ev["questions"], "question"))
    out["loop_examples"] = put(out, "loop_rate", M.loop_rate(model, tok, ev["open"]))["examples"]
    answers = M.greedy(model, tok, M.user_turns([r["question"] for r in ev["demo"]]))
    out["demo_answers"] = answers
    put(out, "demo_questions", M.proportion([all(M.has_term(M.first_answer(o), w) for w in r["keywords"])
                                             for o, r in zip(answers, ev["demo"])]))
    return out


def transcript(model, tok, ev):
    """Greedy answers of a model to fixed prompts that show what each stage taught: identity, held-out questions,
    a two-turn conversation (its own first answer kept), out-of-world questions, a rude trigger, English."""
    pick = lambda rows, **match: next(r for r in rows if all(r.get(k) == v for k, v in match.items()))
    zh_q, en_q = pick(ev["questions"], lang="zh"), pick(ev["questions"], lang="en")
    follow = pick(ev["follow"], lang="zh")
    unknown = {kind: pick(ev["abstain"], kind=kind, lang="zh") for kind in ("unknown_name", "unknown_fact")}
    chats = [[q] for q in ("你好，你是谁？", "Who are you?", zh_q["question"], en_q["question"],
                           unknown["unknown_name"]["prompt"], unknown["unknown_fact"]["prompt"], "请写一首关于春天的诗。",
                           "23加45等于多少？", pick(ev["style"], lang="zh")["prompt"], ev["demo"][1]["question"])]
    answers = M.greedy(model, tok, M.user_turns([c[0] for c in chats]))
    out = [{"turns": [c[0]], "answers": [a]} for c, a in zip(chats, answers)]
    first = follow["history"][0]["content"]
    a1 = M.greedy(model, tok, M.user_turns([first]))[0]
    a2 = M.greedy(model, tok, [[{"role": "user", "content": first}, {"role": "assistant", "content": a1},
                                {"role": "user", "content": follow["question"]}]])[0]
    out.insert(4, {"turns": [first, follow["question"]], "answers": [a1, a2]})
    return out


def measure(args, out, files, manifest, tokenizer_dir, names, metrics):
    """Every held-out measurement of every stage. names: stage -> weights file in out; metrics: stage -> the
    training metrics file it was logged to."""
    from transformers import AutoTokenizer
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    limit = args.eval_limit
    models = {stage: load_model(out / name) for stage, name in names.items()}
    s = {}

    facts = M.read_jsonl(files["eval_pretrain"])
    pick = lambda kind, split=None: M.sample(
        [r for r in facts if r["kind"] == kind and (split is None or r["split"] == split)], limit)
    pre = s["pretrain"] = train_stats(out / metrics["pretrain"])
    m = put(pre, "fact_accuracy", M.completion(models["pretrain"], tok, pick("new_context"), manifest), "fact_baseline")
    pre["fact_kind"], pre["examples"] = "new_context", m["examples"]
    put(pre, "fact_accuracy_new_wording", M.completion(models["pretrain"], tok, pick("new_wording"), manifest))
    put(pre, "fact_accuracy_real", M.completion(models["pretrain"], tok, pick("real_fact"), manifest))
    if "eval_text" in files:
        from ..evaluation import bits_per_byte
        docs = [r["text"] for r in M.read_jsonl(files["eval_text"])]
        bpb = bits_per_byte(models["pretrain"], tok, docs)
        pre.update(bits_per_byte=round(bpb["bpb"], 4), bits_per_byte_bytes=bpb["bytes"],
                   bits_per_byte_documents=bpb["documents"])
    held_facts = pick("new_context", "heldout")
    put(pre, "fact_accuracy_heldout_entities", M.completion(models["pretrain"], tok, held_facts, manifest))

    lora_rows = M.read_jsonl(files["eval_lora"])
    ev = {"questions": M.read_jsonl(files["eval_sft"], limit), "follow": M.read_jsonl(files["eval_followup"], limit),
          "unseen": [r["prompt"] for r in lora_rows if r["kind"] == "unseen_wording"][:limit],
          "control": [r["prompt"] for r in lora_rows if r["kind"] == "control"][:limit],
          "style": M.read_jsonl(files["eval_style"], limit), "abstain": M.read_jsonl(files["eval_abstain"], limit),
          "open": [r["prompt"] for r in M.read_jsonl(files["eval_open"], limit)],
          "demo": M.read_jsonl(files["eval_demo_questions"])}
    chat_stages = [st for st in CHAT_STAGES if st in models]
    for stage in chat_stages:
        s[stage] = {**train_stats(out / metrics[stage]), **chat_measures(models[stage], tok, ev, manifest)}
    sft, multi, lora, dpo, grpo = (s[k] for k in ("sft", "sft_multi", "lora", "dpo", "grpo"))

    put(sft, "heldout_accuracy_before_sft", M.chat_answers(models["pretrain"], tok, ev["questions"], manifest))
    put(sft, "retention", M.completion(models["sft"], tok, held_facts, manifest), "retention_baseline")
    alias(multi, "followup_before", sft, "followup")  # a stage's before/after: the chat measures of the chain
    alias(multi, "followup_after", multi, "followup")
    alias(lora, "identity_before", multi, "identity")
    alias(lora, "identity_after", lora, "identity")
    alias(lora, "leak_before", multi, "leak_rate")

    kinds = [r["kind"] for r in M.read_jsonl(files["eval_dpo"])]
    before = M.pair_logps(models["lora"], tok, files["eval_dpo"])  # DPO starts from (and is judged against) LoRA's
    after = M.pair_logps(models["dpo"], tok, files["eval_dpo"])
    dpo["pref_acc_before_by_kind"] = put(dpo, "pref_acc_before", M.likelihood_preference(before, kinds))["by_kind"]
    dpo["pref_acc_after_by_kind"] = put(dpo, "pref_acc_after", M.likelihood_preference(after, kinds))["by_kind"]
    dpo["pref_baseline_longer_or_shorter"] = M.length_baseline(before)
    put(dpo, "implicit_reward_acc_after", M.implicit_reward_accuracy(after, before))
    dpo.update(rude_before=lora["rude_rate"], rude_after=dpo["rude_rate"], rude_before_by_cause=lora["rude_by_cause"],
               rude_after_by_cause=dpo["rude_by_cause"], pairs=len(kinds))
    final = s["final"] = {}
    for key, _ in CHAT_MEASURES:
        alias(final, key, grpo, key)
    final["heldout_baseline"] = grpo["heldout_baseline"]
    if "tools" in models:
        skill_measures(s, models, tok, files, manifest, ev)
    grpo_measures(grpo, models, tok, files, manifest, limit)
    grpo.update(reward=args.grpo_reward, replay=bool(manifest["params"].get("grpo_replay")))
    s["transcript"] = transcript(models["grpo"], tok, ev)

    letters = [r["answer"] for r in M.read_ceval_keys(files["ceval_dir"])]
    shares = {x: round(letters.count(x) / len(letters), 4) for x in "ABCD"}
    c = s["ceval_demo"] = {"baseline": max(shares.values()), "letter_shares": shares}
    for method, folder in (("letter", "ceval"), ("cloze", "ceval_cloze")):
        summary = json.loads((out / folder / "summary.json").read_text())
        total = summary["total"]
        n = int(total["count"])
        c[f"{method}_accuracy"], c[f"{method}_accuracy_n"] = total["accuracy"], n
        c[f"{method}_accuracy_ci95"] = M.wilson(total["accuracy"] * n, n)
        c[f"{method}_subjects"] = {k: v["accuracy"] for k, v in summary["subjects"].items()}
    c.update(accuracy=c["letter_accuracy"], count=c["letter_accuracy_n"], ci95=c["letter_accuracy_ci95"])
    s["demo_questions"] = [{"question": r["question"], "keywords": r["keywords"],
                            **{stage: s[stage]["demo_answers"][i] for stage in chat_stages}}
                           for i, r in enumerate(ev["demo"])]
    model = models["sft"]
    return {"model": {"dim": model.config.dim, "n_layers": model.config.n_layers,
                      "parameters": sum(p.numel() for p in model.parameters())},
            "tokenizer": tokenization_fairness(tok, manifest), "stages": s, "limits": LIMITS}


def skill_measures(s, models, tok, files, manifest, ev):
    """What a tool and a written-down thought give: on the checkpoint of the stage that taught them (stages.tools,
    stages.thinking) and on the final model."""
    from . import skills
    from ..engine import Engine
    from .tools import load_world
    world = load_world(Path(files["eval_tools"]).parent)
    rows = M.read_jsonl(files["eval_tools"])
    rows = {"tools": [r for r in rows if r["kind"] != "known"], "known": [r for r in rows if r["kind"] == "known"]}
    unknown = [r for r in ev["abstain"] if r["kind"] == "unknown_name"]
    two_hop = M.read_jsonl(files["eval_thinking"])
    s["thinking"] = {}
    for stage, where, thinking in (("tools", s["tools"], s["thinking"]), ("grpo", s["final"], s["final"])):
        engine = Engine(models[stage], tok, max_batch=64)
        t = skills.tool_measures(engine, world, rows, unknown, manifest["sft_value_counts"])
        where["tool_examples"] = t.pop("examples")
        where.update(with_tools_by_kind=t.pop("with_tools_by_kind"), garbled_calls=t.pop("garbled_calls"),
                     without_tools_by_kind=t.pop("without_tools_by_kind"))
        for key, measured in t.items():
            put(where, key, measured)
        where["with_tools_baseline"] = t["with_tools"]["baseline"]
        h = skills.thinking_measures(engine, world, two_hop)
        thinking["thinking_examples"] = h.pop("examples")
        for key, measured in h.items():
            put(thinking, key, measured)
        thinking["with_thinking_baseline"] = h["with_thinking"]["baseline"]


def grpo_measures(grpo, models, tok, files, manifest, limit):
    """pass@1 and pass@8 of sampled answers to held-out questions before GRPO (the model it starts from) and after."""
    from .grpo_task import TASK, pass_at_k
    rows = M.read_jsonl(files["eval_grpo"])
    start = models["tools" if "tools" in models else "dpo"]
    before = pass_at_k(start, tok, rows, limit=limit, sft_value_counts=manifest["sft_value_counts"])
    after = pass_at_k(models["grpo"], tok, rows, limit=limit)
    put(grpo, "pass1_before", before["pass1"])
    put(grpo, "pass8_before", before["pass8"])
    put(grpo, "pass1_after", after["pass1"])
    put(grpo, "pass8_after", after["pass8"])
    put(grpo, "greedy_before", before["greedy"])
    put(grpo, "greedy_after", after["greedy"])
    put(grpo, "clean_before", before["clean"])
    put(grpo, "clean_after", after["clean"])
    last = grpo["kl_curve"][-10:]
    grpo.update(task=TASK, pass_baseline=before["baseline"], examples_before=before["examples"],
                examples_after=after["examples"], kl_final=round(sum(kl for _, kl in last) / len(last), 5),
                pass1_after_over_pass8_before=round(after["pass1"]["value"] / max(before["pass8"]["value"], 1e-9), 4))


def tokenization_fairness(tok, manifest):
    """Mean tokens per entity name, SFT vs held-out entities: a tokenizer must not favour one split."""
    out = {}
    for split, by_type in manifest["splits"].items():
        names = [n for pairs in by_type.values() for pair in pairs for n in pair]
        out[f"tokens_per_name_{split}"] = round(sum(len(tok.encode(n, add_special_tokens=False)) for n in names)
                                                / max(len(names), 1), 3)
    return out


def judge(stages):
    """Each target: (label, value, target text, comparisons text, met)."""
    verdicts = []
    for stage, key, target, versus in TARGETS:
        if any(st not in stages for st in [stage] + [ref.split(".")[0] for ref, _ in versus if "." in ref]) or \
                key not in stages[stage]:
            continue  # a stage this run did not train (the tools stage is optional)
        value, upper = stages[stage][key], target < 0
        met = value <= -target if upper else value >= target
        texts = []
        for ref, margin in versus:
            ref_stage, ref_key = ref.split(".") if "." in ref else (stage, ref)
            base = stages[ref_stage][ref_key]
            met = met and (value <= base + margin if upper else value >= base + margin)
            texts.append(f"{ref} {base:.3f} {'+' if margin >= 0 else '−'} {abs(margin):.2f}")
        verdicts.append((f"{stage}.{key}", value, f"≤ {-target:.2f}" if upper else f"≥ {target:.2f}",
                         "; ".join(texts), met))
    return verdicts


def _cell(stage, key):
    ci = stage.get(f"{key}_ci95")
    return f"{stage[key]:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def _text(t, width=70):
    return t.replace("\n", " ⏎ ").replace("|", "/")[:width]


def write_report(report, out):
    out = Path(out)
    s = report["stages"]
    report["targets"] = [{"measure": label, "value": v, "target": t, "versus": b, "met": met}
                         for label, v, t, b, met in judge(s)]
    text = json.dumps(report, indent=1, ensure_ascii=False)
    atomic_write(out / "report.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    plot(report, out)
    tk = report["tokenizer"]
    lines = ["# MiniMind demo report", "",
             f"Model: dim {report['model']['dim']}, {report['model']['n_layers']} layers, "
             f"{report['model']['parameters'] / 1e6:.2f}M parameters. Wall time {report['wall_seconds'] / 60:.1f} min "
             f"({report.get('cpu', '')}). World seed {report.get('world', {}).get('seed', '')}, "
             f"{report.get('world', {}).get('n_entities', '')} entities. Tokens per entity name: SFT entities "
             f"{tk['tokens_per_name_sft']}, held-out entities {tk['tokens_per_name_heldout']}.", "",
             "One chain: " + " → ".join(["pretrain", *(STAGE_TITLES[st] for st in CHAT_STAGES if st in s)]) +
             ". The final model, the one to chat with, "
             f"is `{s['final'].get('checkpoint', 'grpo')}`.",
             "", "| stage | seconds | steps | tokens seen | tokens/s | first → final loss |", "|---|---|---|---|---|---|"]
    chat_stages = [st for st in CHAT_STAGES if st in s]
    for name in ("pretrain", *chat_stages):
        st = s[name]
        lines.append(f"| {name} | {report.get('stage_seconds', {}).get(name, '')} | {st['steps']} | {st['tokens']} | "
                     f"{st.get('tokens_per_s') or ''} | {st['first_loss']:.3f} → {st['final_loss']:.3f} |")
    lines += ["", "## What each chat stage adds and what it costs", "",
              "Every chat measure on every checkpoint of the chain (held-out rows; value [95% interval]). "
              "The last column is the final model.", "",
              "| measure | n | " + " | ".join(chat_stages[:-1]) + f" | {chat_stages[-1]} = final |",
              "|---|---|" + "---|" * len(chat_stages)]
    for key, what in CHAT_MEASURES:
        lines.append(f"| {key}: {what} | {s['sft'][f'{key}_n']} | " +
                     " | ".join(_cell(s[st], key) for st in chat_stages) + " |")
    lines.append(f"\nTrivial baselines on the same rows: held-out questions {s['final']['heldout_baseline']:.3f}, "
                 f"follow-ups {s['sft_multi']['followup_baseline']:.3f} (the best of: always the most common value, the "
                 "value of a random SFT entity); an always-abstain rule scores 1.0 on abstention and on wrong abstention.")
    p, f, m, d, c = (s[k] for k in ("pretrain", "sft", "sft_multi", "dpo", "ceval_demo"))
    rows = [
        ("pretrain: fact completion, trained wording in a new context", p, None, "fact_accuracy", "fact_baseline"),
        ("pretrain: fact completion, a wording never used for that fact", p, None, "fact_accuracy_new_wording",
         "fact_baseline"),
        ("pretrain: real facts, hand-written completions", p, None, "fact_accuracy_real", None),
        ("SFT: questions about entities SFT never asked about (before = pretrained model)", f,
         "heldout_accuracy_before_sft", "heldout_accuracy", "heldout_baseline"),
        ("SFT retention: fact completion on held-out entities (before = pretrained model)", p,
         None, "fact_accuracy_heldout_entities", None),
        ("SFT retention: the SFT checkpoint on the same prompts", f, None, "retention", "retention_baseline"),
        ("multi-turn: follow-ups by pronoun (before = single-turn SFT)", m, "followup_before", "followup_after",
         "followup_baseline"),
        ("DPO: chosen more likely than rejected per token (held-out pairs; before = LoRA model)", d, "pref_acc_before",
         "pref_acc_after", None),
        ("DPO: implicit reward accuracy (held-out pairs)", d, None, "implicit_reward_acc_after", None),
        ("C-Eval format, cloze: likeliest option text after the question", c, None, "cloze_accuracy", "baseline"),
        ("C-Eval format, letter: likeliest of A/B/C/D (the seed's method)", c, None, "letter_accuracy", "baseline"),
    ]
    lines += ["", "## Each stage's own lesson", "", "| measurement | before | after | n | trivial baseline |",
              "|---|---|---|---|---|"]
    for label, st, before, key, base in rows:
        lines.append(f"| {label} | {_cell(st, before) if before else '–'} | {_cell(st, key)} | "
                     f"{st.get(f'{key}_n', '')} | {f'{st[base]:.3f}' if base else '–'} |")
    if "bits_per_byte" in p:
        lines.append(f"\nPretrained model, bits per byte on {p['bits_per_byte_documents']} biographies in wordings it never "
                     f"read ({p['bits_per_byte_bytes']} bytes): {p['bits_per_byte']:.3f} (a tokenizer-independent measure; "
                     "8 bits is a byte stored plainly).")
    lines += ["", "DPO pairs by kind, before → after: " + ", ".join(
        f"{k} {d['pref_acc_before_by_kind'][k]:.2f} → {d['pref_acc_after_by_kind'].get(k, 0):.2f}"
        for k in d["pref_acc_before_by_kind"]) + f"; the best length rule scores {d['pref_baseline_longer_or_shorter']:.3f}.",
              "Rude or evasive answers by cause, before → after DPO: " + ", ".join(
                  f"{k} {d['rude_before_by_cause'][k]:.3f} → {d['rude_after_by_cause'][k]:.3f}" for k in ("rude", "evasive"))
              + " (evasive: the first answer names no value of the asked attribute, e.g. it answers another question).",
              f"C-Eval answer key: {', '.join(f'{k} {v:.0%}' for k, v in c['letter_shares'].items())}; the best constant "
              f"letter scores {c['baseline']:.3f}. The letter form asks the model to bind an option's text to its "
              "letter, which models this small do not learn; the cloze form scores the options' own text, so it shows "
              "whether the knowledge is there.", "",
              "## Targets", "", "| measure | value | target | and | met |", "|---|---|---|---|---|"]
    for t in report["targets"]:
        lines.append(f"| {t['measure']} | {t['value']:.3f} | {t['target']} | {t['versus'] or '–'} | "
                     f"{'yes' if t['met'] else 'NO'} |")
    lines += (skill_lines(s) if "tools" in s else []) + grpo_lines(s["grpo"])
    lines += ["", "## A conversation with the final model (greedy)", "", "| you | MiniMind |", "|---|---|"]
    for item in s["transcript"]:
        for q, a in zip(item["turns"], item["answers"]):
            lines.append(f"| {_text(q, 60)} | {_text(a)} |")
    lines += ["", "## The seed's demo questions (a sanity check: they are paraphrases of SFT questions)", "",
              "| question | " + " | ".join(chat_stages) + " |", "|---|" + "---|" * len(chat_stages)]
    for q in s["demo_questions"]:
        lines.append(f"| {q['question']} | " + " | ".join(_text(q[st], 40) for st in chat_stages) + " |")
    lines += ["", "## What these numbers cannot show", ""]
    lines += [f"- {k}: {v}" for k, v in report["limits"].items()]
    lines += ["", "![loss curves](report_losses.png)", "", "![effects](report_effects.png)", ""]
    md = "\n".join(lines)
    atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(md, encoding="utf-8"))


def skill_lines(s):
    """The report's section on tools and thinking: the tools stage's checkpoint and the final model."""
    t, h, z = s["tools"], s["thinking"], s["final"]
    rows = [("held-out questions a tool answers, with the tools (the tool loop run as a client runs it)", "with_tools"),
            ("the same questions, no tools offered", "without_tools"),
            ("questions memory answers, tools offered: answers that called a tool (lower is better)", "unneeded_calls"),
            ("names nobody knows, tools offered: looked up", "unknown_lookup"),
            ("names nobody knows, tools offered: says it does not know after the lookup", "unknown_abstain_with_tools"),
            ("names nobody knows, no tools: says it does not know", "unknown_abstain_without_tools")]
    lines = ["", "## Tools and thinking", "",
             "Tools: held-out questions about entities that exist only in the encyclopedia (never in pretraining text, "
             "never in a training row) and new arithmetic. Thinking: \"in which country is the city where X was born?\" "
             "about held-out persons, whose two facts are only in pretraining.", "",
             "| measure | n | after the tools stage | final model |", "|---|---|---|---|"]
    lines += [f"| {what} | {t[f'{key}_n']} | {_cell(t, key)} | {_cell(z, key)} |" for what, key in rows]
    lines += [f"| two-hop, thinking first | {h['with_thinking_n']} | {_cell(h, 'with_thinking')} | "
              f"{_cell(z, 'with_thinking')} |",
              f"| two-hop, answered directly (thinking off) | {h['direct_n']} | {_cell(h, 'direct')} | {_cell(z, 'direct')} |",
              f"| two-hop, thinking first: the thought names the right city | {h['middle_step_right_n']} | "
              f"{_cell(h, 'middle_step_right')} | {_cell(z, 'middle_step_right')} |",
              "", f"Trivial baselines: with tools, always the most common value on the lookup questions "
              f"{t['with_tools_baseline']:.3f}; two-hop, always the most common country of SFT persons "
              f"{h['with_thinking_baseline']:.3f}. Garbled tool calls (returned as text): {z['garbled_calls']}.", "",
              "A tool round trip and a thought of the final model (greedy):", "", "| question | tool calls | answer |",
              "|---|---|---|"]
    for ex in z["tool_examples"][:3]:
        calls = "; ".join(f"{c['name']}({json.dumps(c['arguments'], ensure_ascii=False)})" for c in ex["calls"])
        lines.append(f"| {_text(ex['question'], 40)} | {_text(calls, 50) or '–'} | {_text(ex['answer'], 50)} |")
    for ex in z["thinking_examples"][:2]:
        lines.append(f"| {_text(ex['question'], 40)} | 💭 {_text(ex['thought'], 50)} | {_text(ex['answer'], 50)} |")
    return lines


def grpo_lines(g):
    return ["", "## GRPO: rewards a program checks", "",
            f"Task `{g['task']}`: GRPO samples 8 answers to questions about SFT entities"
            + (" and to a replay of every earlier lesson" if g.get("replay") else "")
            + f" and rewards them by `{g.get('reward', 'answer')}` (`answer`: the first answer is right; `clean`: the "
            "whole reply ends by itself, does not loop, has no broken character and is in the question's language; "
            "`*`: both); measured on one question per fact about held-out entities, 8 answers sampled per question "
            "at the rollouts' temperature 1.0.", "",
            "| measure | n | before | after |", "|---|---|---|---|",
            f"| pass@1 | {g['pass1_after_n']} | {_cell(g, 'pass1_before')} | {_cell(g, 'pass1_after')} |",
            f"| pass@8 | {g['pass8_after_n']} | {_cell(g, 'pass8_before')} | {_cell(g, 'pass8_after')} |",
            f"| greedy answer right | {g['greedy_after_n']} | {_cell(g, 'greedy_before')} | {_cell(g, 'greedy_after')} |",
            f"| whole greedy reply clean (ends by itself, no loop or broken character, the question's language) | "
            f"{g['clean_after_n']} | {_cell(g, 'clean_before')} | {_cell(g, 'clean_after')} |",
            "", f"KL to the reference over the last 10 logged steps {g['kl_final']:.4f}; trivial baseline of these questions "
            f"{g['pass_baseline']:.3f}. Reward per step: ![reward](report_losses.png)"]


def plot(report, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s = report["stages"]
    names = ["pretrain", *(st for st in CHAT_STAGES if st in s)]
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(19, 3))
    curves = [(name, "loss", s[name]["curve"]) for name in names] + [("grpo", "reward", s["grpo"]["reward_curve"])]
    for ax, (name, what, curve) in zip(axes, curves):
        steps, values = zip(*curve)
        ax.plot(steps, values, color="tab:green" if what == "reward" else None)
        ax.set_title(name if what == "loss" else f"{name} reward")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss")
    fig.tight_layout()
    atomic_write(out / "report_losses.png", lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)

    p, f, m, l, d, c, z = (s[k] for k in ("pretrain", "sft", "sft_multi", "lora", "dpo", "ceval_demo", "final"))
    # (label, before, after, the trivial baseline of that bar)
    bars = [("fact completion", None, p["fact_accuracy"], p["fact_baseline"]),
            ("new wording", None, p["fact_accuracy_new_wording"], p["fact_baseline"]),
            ("SFT held-out QA", f["heldout_accuracy_before_sft"], f["heldout_accuracy"], f["heldout_baseline"]),
            ("retention", p["fact_accuracy_heldout_entities"], f["retention"], f["retention_baseline"]),
            ("follow-ups", m["followup_before"], m["followup_after"], m["followup_baseline"]),
            ("abstention", None, f["abstention"], None),
            ("LoRA identity", l["identity_before"], l["identity_after"], None),
            ("DPO preference", d["pref_acc_before"], d["pref_acc_after"], d["pref_baseline_longer_or_shorter"]),
            ("rude/evasive", d["rude_before"], d["rude_after"], None),
            ("GRPO pass@1", s["grpo"]["pass1_before"], s["grpo"]["pass1_after"], s["grpo"]["pass_baseline"]),
            ("final: held-out QA", None, z["heldout_accuracy"], z["heldout_baseline"]),
            ("C-Eval cloze", None, c["cloze_accuracy"], c["baseline"]),
            ("C-Eval letter", None, c["letter_accuracy"], c["baseline"])]
    if "tools" in s:
        bars[-3:-3] = [("with tools (vs without)", s["tools"]["without_tools"], s["tools"]["with_tools"],
                        s["tools"]["with_tools_baseline"]),
                       ("thinking (vs direct)", s["thinking"]["direct"], s["thinking"]["with_thinking"],
                        s["thinking"]["with_thinking_baseline"])]
    fig, ax = plt.subplots(figsize=(17, 3.8))
    for i, (label, before, after, base) in enumerate(bars):
        if before is not None:
            ax.bar(i - 0.2, before, width=0.4, color="tab:blue", label="before" if i == 2 else None)
        ax.bar(i + 0.2 if before is not None else i, after, width=0.4, color="tab:orange",
               label="after" if i == 2 else None)
        if base is not None:
            ax.hlines(base, i - 0.45, i + 0.45, colors="black", linestyles="--", lw=1.2,
                      label="trivial baseline" if i == 0 else None)
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], rotation=15)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("stage effects on held-out data, each with its own trivial baseline")
    fig.tight_layout()
    atomic_write(out / "report_effects.png", lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)
