"""The demo's report card: loads each stage's checkpoint, measures it on the held-out files with its trivial
baselines, judges the targets, and writes report.json, report.md and the plots."""
import json
from pathlib import Path

import torch

from . import measure as M
from ..checkpoint import load_model
from ..files import atomic_write

# (stage, key, target, how it must beat its baseline): "baseline" is a key of the same stage, None for none
TARGETS = [
    ("pretrain", "fact_accuracy", 0.90, ("fact_baseline", 0.40)),
    ("pretrain", "fact_accuracy_new_wording", 0.70, ("fact_baseline", 0.40)),
    ("sft", "heldout_accuracy", 0.60, ("heldout_baseline", 0.40)),
    ("sft", "retention", 0.80, ("retention_baseline", 0.40)),
    ("sft_multi", "followup_after", 0.60, ("followup_before", 0.30)),
    ("lora", "identity_after", 0.95, ("identity_before", 0.50)),
    ("lora", "leak_rate", -0.05, None),  # at most 0.05
    ("dpo", "pref_acc_after", 0.90, ("pref_acc_before", 0.30)),
    ("dpo", "rude_after", -0.05, None),
    ("ceval_demo", "accuracy", 0.60, ("baseline", 0.30)),
]
LIMITS = {  # one line each: what a measurement cannot show
    "demo_questions": "the seed's demo questions are paraphrases of SFT questions: a sanity check of the chat, "
                      "not a held-out measure",
    "sft": "held-out entities' facts occur in pretraining statements only; the questions' templates are SFT's own",
    "dpo": "rude/evasive is judged by style markers (some never shown to DPO) and by whether the answer names any "
           "value of the asked attribute; a polite wrong answer counts as not rude",
}


def train_stats(metrics_path):
    rows = []
    for line in Path(metrics_path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line of an interrupted run
    return {"steps": rows[-1]["step"], "tokens": rows[-1].get("tokens"), "first_loss": round(rows[0]["loss"], 4),
            "final_loss": round(rows[-1]["loss"], 4), "tokens_per_s": rows[-1].get("tokens_per_s"),
            "curve": [[r["step"], round(r["loss"], 4)] for r in rows]}


def put(stage, key, measured, baseline_key=None):
    """A measurement into a stage: its value under key, with key_n and key_ci95 beside it."""
    stage[key], stage[f"{key}_n"], stage[f"{key}_ci95"] = measured["value"], measured["n"], measured["ci95"]
    if baseline_key:
        stage[baseline_key] = measured["baseline"]
        stage[f"{baseline_key}s"] = measured["baselines"]
    return measured


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
    held_facts = pick("new_context", "heldout")
    put(pre, "fact_accuracy_heldout_entities", M.completion(models["pretrain"], tok, held_facts, manifest))

    questions = M.read_jsonl(files["eval_sft"], limit)
    sft = s["sft"] = train_stats(out / metrics["sft"])
    put(sft, "heldout_accuracy_before_sft", M.chat_answers(models["pretrain"], tok, questions, manifest))
    m = put(sft, "heldout_accuracy", M.chat_answers(models["sft"], tok, questions, manifest), "heldout_baseline")
    sft["examples"] = m["examples"]
    put(sft, "retention", M.completion(models["sft"], tok, held_facts, manifest), "retention_baseline")

    follow = M.read_jsonl(files["eval_followup"], limit)
    multi = s["sft_multi"] = train_stats(out / metrics["sft_multi"])
    put(multi, "followup_before", M.chat_answers(models["sft"], tok, follow, manifest))
    m = put(multi, "followup_after", M.chat_answers(models["sft_multi"], tok, follow, manifest), "followup_baseline")
    multi["examples"] = m["examples"]
    put(multi, "heldout_accuracy", M.chat_answers(models["sft_multi"], tok, questions, manifest))

    lora_rows = M.read_jsonl(files["eval_lora"])
    unseen = [r["prompt"] for r in lora_rows if r["kind"] == "unseen_wording"][:limit]
    control = [r["prompt"] for r in lora_rows if r["kind"] == "control"][:limit]
    keyword = manifest["identity_keyword"]
    lora = s["lora"] = train_stats(out / metrics["lora"])
    put(lora, "identity_before", M.keyword_rate(models["sft_multi"], tok, unseen, keyword))
    lora["examples"] = put(lora, "identity_after", M.keyword_rate(models["lora"], tok, unseen, keyword))["examples"]
    put(lora, "leak_before", M.keyword_rate(models["sft_multi"], tok, control, keyword))
    put(lora, "leak_rate", M.keyword_rate(models["lora"], tok, control, keyword))
    put(lora, "heldout_accuracy_after_lora", M.chat_answers(models["lora"], tok, questions, manifest))

    kinds = [r["kind"] for r in M.read_jsonl(files["eval_dpo"])]
    before = M.pair_logps(models["sft_multi"], tok, files["eval_dpo"])
    after = M.pair_logps(models["dpo"], tok, files["eval_dpo"])
    style = M.read_jsonl(files["eval_style"], limit)
    dpo = s["dpo"] = train_stats(out / metrics["dpo"])
    dpo["pref_acc_before_by_kind"] = put(dpo, "pref_acc_before", M.likelihood_preference(before, kinds))["by_kind"]
    dpo["pref_acc_after_by_kind"] = put(dpo, "pref_acc_after", M.likelihood_preference(after, kinds))["by_kind"]
    dpo["pref_baseline_longer_or_shorter"] = M.length_baseline(before)
    put(dpo, "implicit_reward_acc_after", M.implicit_reward_accuracy(after, before))
    m = put(dpo, "rude_before", M.style_rate(models["sft_multi"], tok, style, manifest))
    dpo["rude_before_by_cause"] = m["by_cause"]
    m = put(dpo, "rude_after", M.style_rate(models["dpo"], tok, style, manifest))
    dpo["rude_after_by_cause"], dpo["examples"] = m["by_cause"], m["examples"]
    dpo["rude_rate_before"], dpo["rude_rate_after"] = dpo["rude_before"], dpo["rude_after"]
    dpo["pairs"] = len(kinds)
    put(dpo, "heldout_accuracy_after_dpo", M.chat_answers(models["dpo"], tok, questions, manifest))

    summary = json.loads((out / "ceval" / "summary.json").read_text())
    total = summary["total"]
    letters = [r["answer"] for r in M.read_ceval_keys(files["ceval_dir"])]
    shares = {x: round(letters.count(x) / len(letters), 4) for x in "ABCD"}
    s["ceval_demo"] = {"accuracy": total["accuracy"], "count": int(total["count"]),
                       "ci95": M.wilson(total["accuracy"] * total["count"], total["count"]),
                       "baseline": max(shares.values()), "letter_shares": shares,
                       "subjects": {k: v["accuracy"] for k, v in summary["subjects"].items()}}
    s["ceval_demo"]["accuracy_n"], s["ceval_demo"]["accuracy_ci95"] = s["ceval_demo"]["count"], s["ceval_demo"]["ci95"]

    demo_q = M.read_jsonl(files["eval_demo_questions"])
    asked = [[{"role": "user", "content": r["question"]}] for r in demo_q]
    answers = {name: M.greedy(models[stage], tok, asked) for name, stage in
               (("before_sft", "pretrain"), ("after_sft", "sft_multi"), ("after_dpo", "dpo"))}
    s["demo_questions"] = [{"question": r["question"], "keywords": r["keywords"],
                            **{k: v[i] for k, v in answers.items()}} for i, r in enumerate(demo_q)]
    s["demo_questions_correct"] = {k: sum(all(M.has_term(M.first_answer(o), w) for w in r["keywords"])
                                          for o, r in zip(v, demo_q)) / len(demo_q) for k, v in answers.items()}
    model = models["sft"]
    return {"model": {"dim": model.config.dim, "n_layers": model.config.n_layers,
                      "parameters": sum(p.numel() for p in model.parameters())},
            "tokenizer": tokenization_fairness(tok, manifest), "stages": s, "limits": LIMITS}


def tokenization_fairness(tok, manifest):
    """Mean tokens per entity name, SFT vs held-out entities: a tokenizer must not favour one split."""
    out = {}
    for split, by_type in manifest["splits"].items():
        names = [n for pairs in by_type.values() for pair in pairs for n in pair]
        out[f"tokens_per_name_{split}"] = round(sum(len(tok.encode(n, add_special_tokens=False)) for n in names)
                                                / max(len(names), 1), 3)
    return out


def judge(stages):
    """Each target: (label, value, target text, baseline text, met)."""
    verdicts = []
    for stage, key, target, versus in TARGETS:
        value = stages[stage][key]
        met = value <= -target if target < 0 else value >= target
        base_text = ""
        if versus:
            bkey, margin = versus
            base = stages[stage][bkey]
            met = met and value >= base + margin
            base_text = f"{bkey} {base:.3f} + {margin:.2f}"
        verdicts.append((f"{stage}.{key}", value, f"≤ {-target:.2f}" if target < 0 else f"≥ {target:.2f}",
                         base_text, met))
    return verdicts


def _cell(stage, key):
    ci = stage.get(f"{key}_ci95")
    return f"{stage[key]:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


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
             f"({report.get('cpu', '')}). Tokens per entity name: SFT entities {tk['tokens_per_name_sft']}, "
             f"held-out entities {tk['tokens_per_name_heldout']}.",
             "", "| stage | seconds | steps | tokens seen | tokens/s | first → final loss |", "|---|---|---|---|---|---|"]
    for name in ("pretrain", "sft", "sft_multi", "lora", "dpo"):
        st = s[name]
        lines.append(f"| {name} | {report.get('stage_seconds', {}).get(name, '')} | {st['steps']} | {st['tokens']} | "
                     f"{st.get('tokens_per_s') or ''} | {st['first_loss']:.3f} → {st['final_loss']:.3f} |")
    p, f, m, l, d, c = (s[k] for k in ("pretrain", "sft", "sft_multi", "lora", "dpo", "ceval_demo"))
    rows = [
        ("pretrain: fact completion, trained wording in a new context", p, None, "fact_accuracy", "fact_baseline"),
        ("pretrain: fact completion, a wording never used for that fact", p, None, "fact_accuracy_new_wording",
         "fact_baseline"),
        ("pretrain: real facts, hand-written completions", p, None, "fact_accuracy_real", None),
        ("SFT: questions about entities SFT never asked about (before = pretrained model)", f,
         "heldout_accuracy_before_sft", "heldout_accuracy", "heldout_baseline"),
        ("SFT retention: fact completion on held-out entities (before = pretrained model)", p,
         None, "fact_accuracy_heldout_entities", None),
        ("", f, None, "retention", "retention_baseline"),
        ("multi-turn: follow-ups naming the earlier turn's entity by a pronoun (before = single-turn SFT)", m,
         "followup_before", "followup_after", "followup_baseline"),
        ("LoRA: identity answer to unseen wordings of 'who are you'", l, "identity_before", "identity_after", None),
        ("LoRA: identity answer leaking into ordinary questions", l, "leak_before", "leak_rate", None),
        ("DPO: chosen more likely than rejected per token (held-out pairs)", d, "pref_acc_before", "pref_acc_after",
         None),
        ("DPO: implicit reward accuracy (held-out pairs)", d, None, "implicit_reward_acc_after", None),
        ("DPO: rude or evasive answers to impatient questions about held-out entities", d, "rude_before",
         "rude_after", None),
        ("C-Eval format, questions about held-out entities", c, None, "accuracy", "baseline"),
    ]
    lines += ["", "Every row: held-out rows only, value [95% interval], n rows, and the strongest trivial baseline "
                  "on the same rows.", "",
              "| measurement | before | after | n | trivial baseline |", "|---|---|---|---|---|"]
    for label, st, before, key, base in rows:
        label = label or "SFT retention: the SFT checkpoint on the same prompts"
        lines.append(f"| {label} | {_cell(st, before) if before else '–'} | {_cell(st, key)} | "
                     f"{st.get(f'{key}_n', '')} | {f'{st[base]:.3f}' if base else '–'} |")
    lines += ["", f"DPO pairs by kind, before → after: " + ", ".join(
        f"{k} {d['pref_acc_before_by_kind'][k]:.2f} → {d['pref_acc_after_by_kind'].get(k, 0):.2f}"
        for k in d["pref_acc_before_by_kind"]) + f"; the best length rule scores {d['pref_baseline_longer_or_shorter']:.3f}.",
              "Rude or evasive answers by cause, before → after: " + ", ".join(
                  f"{k} {d['rude_before_by_cause'][k]:.3f} → {d['rude_after_by_cause'][k]:.3f}" for k in ("rude", "evasive"))
              + " (evasive: the first answer names no value of the asked attribute, e.g. it answers another question).",
              f"C-Eval answer key: {', '.join(f'{k} {v:.0%}' for k, v in c['letter_shares'].items())}; the best constant "
              f"letter scores {c['baseline']:.3f}.", "",
              "## Targets", "", "| measure | value | target | and beats | met |", "|---|---|---|---|---|"]
    for t in report["targets"]:
        lines.append(f"| {t['measure']} | {t['value']:.3f} | {t['target']} | {t['versus'] or '–'} | "
                     f"{'yes' if t['met'] else 'NO'} |")
    lines += ["", "## The seed's demo questions (a sanity check: they are paraphrases of SFT questions)", "",
              "| question | before SFT | after SFT | after DPO |", "|---|---|---|---|"]
    for q in s["demo_questions"]:
        cell = lambda t: t.replace("\n", " ").replace("|", "/")[:60]
        lines.append(f"| {q['question']} | {cell(q['before_sft'])} | {cell(q['after_sft'])} | {cell(q['after_dpo'])} |")
    right = s["demo_questions_correct"]
    lines += ["", "First answers holding every expected keyword: " +
              ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in right.items()), "", "## What these numbers cannot show", ""]
    lines += [f"- {k}: {v}" for k, v in report["limits"].items()]
    lines += ["", "![loss curves](report_losses.png)", "", "![effects](report_effects.png)", ""]
    md = "\n".join(lines)
    atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(md, encoding="utf-8"))


def plot(report, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s = report["stages"]
    names = ["pretrain", "sft", "sft_multi", "lora", "dpo"]
    fig, axes = plt.subplots(1, len(names), figsize=(15, 3))
    for ax, name in zip(axes, names):
        steps, losses = zip(*s[name]["curve"])
        ax.plot(steps, losses)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss")
    fig.tight_layout()
    atomic_write(out / "report_losses.png", lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)

    p, f, m, l, d, c = (s[k] for k in ("pretrain", "sft", "sft_multi", "lora", "dpo", "ceval_demo"))
    # (label, before, after, the trivial baseline of that bar)
    bars = [("fact completion", None, p["fact_accuracy"], p["fact_baseline"]),
            ("new wording", None, p["fact_accuracy_new_wording"], p["fact_baseline"]),
            ("SFT held-out QA", f["heldout_accuracy_before_sft"], f["heldout_accuracy"], f["heldout_baseline"]),
            ("retention", p["fact_accuracy_heldout_entities"], f["retention"], f["retention_baseline"]),
            ("follow-ups", m["followup_before"], m["followup_after"], m["followup_baseline"]),
            ("LoRA identity", l["identity_before"], l["identity_after"], None),
            ("DPO preference", d["pref_acc_before"], d["pref_acc_after"], d["pref_baseline_longer_or_shorter"]),
            ("rude/evasive", d["rude_before"], d["rude_after"], None),
            ("demo C-Eval", None, c["accuracy"], c["baseline"])]
    fig, ax = plt.subplots(figsize=(12, 3.6))
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
