"""The demo's report card: loads each stage's checkpoint, measures it on the held-out files, and writes
report.json, report.md and the plots."""
import json
from pathlib import Path

import torch

from . import demo_eval as E
from .checkpoint import load_model


def train_stats(metrics_path):
    rows = [json.loads(l) for l in Path(metrics_path).read_text().splitlines() if l.strip()]
    return {"steps": rows[-1]["step"], "tokens": rows[-1].get("tokens"), "first_loss": round(rows[0]["loss"], 4),
            "final_loss": round(rows[-1]["loss"], 4), "curve": [[r["step"], round(r["loss"], 4)] for r in rows]}


def measure(args, out, files, manifest, tokenizer_dir):
    from transformers import AutoTokenizer
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    dim, limit = args.dim, args.eval_limit
    load = lambda name: load_model(out / f"{name}_{dim}.pth")
    pretrain, sft_single, sft, lora, rl = (load(n) for n in ("pretrain", "full_sft", "full_sft_multi", "lora", "rl"))
    stages = {}

    # the headline is the manifest's main kind; the harder kinds are measured and reported beside it
    all_facts = E.read_jsonl(files["eval_pretrain"])
    by_kind = {}
    for kind in manifest.get("eval_pretrain_kinds", {"new_context": ""}):
        rows = [r for r in all_facts if r.get("kind", "new_context") == kind]
        rows = E.sample_rows(rows, limit)
        if rows:
            by_kind[kind] = (rows, *E.fact_accuracy(pretrain, tok, rows))
    facts, acc, ex = by_kind["new_context"]
    stages["pretrain"] = {**train_stats(out / f"pretrain_{dim}.metrics.jsonl"), "fact_accuracy": acc,
                          "fact_rows": len(facts), "fact_kind": "new_context", "examples": ex,
                          "fact_accuracy_by_kind": {k: {"accuracy": a, "rows": len(r)}
                                                    for k, (r, a, _) in by_kind.items()}}

    questions = E.read_jsonl(files["eval_sft"], limit)
    before, _ = E.qa_accuracy(pretrain, tok, questions)
    single, _ = E.qa_accuracy(sft_single, tok, questions)
    acc, ex = E.qa_accuracy(sft, tok, questions)
    stages["sft"] = {**train_stats(out / f"full_sft_{dim}.metrics.jsonl"), "heldout_accuracy": acc,
                     "heldout_accuracy_single_turn_only": single, "heldout_accuracy_before_sft": before,
                     "heldout_rows": len(questions), "examples": ex}
    stages["sft_multi"] = train_stats(out / f"full_sft_multi_{dim}.metrics.jsonl")

    identity = [r["prompt"] for r in E.read_jsonl(files["eval_lora"], limit)]
    keyword = [manifest["identity_keyword"]]
    id_before, _ = E.keyword_rate(sft, tok, identity, keyword)
    id_after, ex = E.keyword_rate(lora, tok, identity, keyword)
    keep, _ = E.qa_accuracy(lora, tok, questions)
    stages["lora"] = {**train_stats(out / f"lora_sft_{dim}.metrics.jsonl"), "identity_before": id_before,
                      "identity_after": id_after, "identity_rows": len(identity),
                      "heldout_accuracy_after_lora": keep, "examples": ex}

    sft_logps = E.pair_logps(sft, tok, files["eval_dpo"])
    rl_logps = E.pair_logps(rl, tok, files["eval_dpo"])
    style = [r["prompt"] for r in E.read_jsonl(files["eval_style"], limit)]
    markers = manifest["style_markers"]
    rude_before, _ = E.keyword_rate(sft, tok, style, markers, any_of=True)
    rude_after, ex = E.keyword_rate(rl, tok, style, markers, any_of=True)
    acc_rl, _ = E.qa_accuracy(rl, tok, questions)
    stages["dpo"] = {**train_stats(out / f"rl_{dim}.metrics.jsonl"),
                     "pref_acc_before": E.preference_accuracy(sft_logps, sft_logps),
                     "pref_acc_after": E.preference_accuracy(rl_logps, sft_logps),
                     "likelihood_pref_before": E.likelihood_preference(sft_logps),
                     "likelihood_pref_after": E.likelihood_preference(rl_logps),
                     "rude_rate_before": rude_before, "rude_rate_after": rude_after, "style_rows": len(style),
                     "heldout_accuracy_after_dpo": acc_rl, "pairs": int(sft_logps[0].numel()), "examples": ex}

    summary = json.loads((out / "ceval" / "summary.json").read_text())
    stages["ceval_demo"] = {"accuracy": summary["total"]["accuracy"], "count": summary["total"]["count"],
                            "subjects": {k: v["accuracy"] for k, v in summary["subjects"].items()}}

    demo_q = E.read_jsonl(files["eval_demo_questions"])
    asked = [[{"role": "user", "content": r["question"]}] for r in demo_q]
    answers = {name: E.greedy(m, tok, asked, max_new_tokens=48)
               for name, m in (("before_sft", pretrain), ("after_sft", sft), ("after_dpo", rl))}
    stages["demo_questions"] = [{"question": r["question"], "keywords": r["keywords"],
                                 **{k: v[i] for k, v in answers.items()}} for i, r in enumerate(demo_q)]
    stages["demo_questions_correct"] = {k: sum(all(E.contains(o, w) for w in r["keywords"]) for o, r in zip(v, demo_q))
                                        / len(demo_q) for k, v in answers.items()}
    return {"model": {"dim": dim, "n_layers": args.n_layers, "parameters": sum(p.numel() for p in sft.parameters())},
            "stages": stages}


TARGETS = [("pretrain", "fact_accuracy", 0.8), ("sft", "heldout_accuracy", 0.6), ("lora", "identity_after", 0.9),
           ("dpo", "pref_acc_after", 0.9), ("ceval_demo", "accuracy", 0.6)]


def write_report(report, out):
    out = Path(out)
    (out / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    plot(report, out)
    s = report["stages"]
    lines = [f"# MiniMind demo report", "",
             f"Model: dim {report['model']['dim']}, {report['model']['n_layers']} layers, "
             f"{report['model']['parameters'] / 1e6:.2f}M parameters. Wall time {report['wall_seconds'] / 60:.1f} min.",
             "", "| stage | seconds | steps | tokens seen | first → final loss |", "|---|---|---|---|---|"]
    for name in ("pretrain", "sft", "sft_multi", "lora", "dpo"):
        st = s[name]
        lines.append(f"| {name} | {report.get('stage_seconds', {}).get(name, '')} | {st['steps']} | {st['tokens']} | "
                     f"{st['first_loss']:.3f} → {st['final_loss']:.3f} |")
    lines += ["", "| measurement (held-out) | before | after | target |", "|---|---|---|---|",
              f"| pretrain: fact completion, trained wording in a new context ({s['pretrain']['fact_rows']} prompts) "
              f"| – | {s['pretrain']['fact_accuracy']:.3f} | ≥ 0.8 |",
              *[f"| pretrain: fact completion, {kind.replace('_', ' ')} ({v['rows']} prompts) | – | "
                f"{v['accuracy']:.3f} | – |" for kind, v in s["pretrain"].get("fact_accuracy_by_kind", {}).items()
                if kind != "new_context"],
              f"| SFT: questions about entities never asked in SFT ({s['sft']['heldout_rows']}) | "
              f"{s['sft']['heldout_accuracy_before_sft']:.3f} | {s['sft']['heldout_accuracy']:.3f} | ≥ 0.6 |",
              f"| LoRA: identity answers on unseen paraphrases ({s['lora']['identity_rows']}) | "
              f"{s['lora']['identity_before']:.3f} | {s['lora']['identity_after']:.3f} | ≥ 0.9 (before ≤ 0.1) |",
              f"| DPO: preference accuracy, implicit reward ({s['dpo']['pairs']} pairs) | "
              f"{s['dpo']['pref_acc_before']:.3f} | {s['dpo']['pref_acc_after']:.3f} | ≥ 0.9 |",
              f"| DPO: chosen more likely than rejected | {s['dpo']['likelihood_pref_before']:.3f} | "
              f"{s['dpo']['likelihood_pref_after']:.3f} | – |",
              f"| DPO: rude or evasive answers ({s['dpo']['style_rows']} prompts) | {s['dpo']['rude_rate_before']:.3f} | "
              f"{s['dpo']['rude_rate_after']:.3f} | lower |",
              f"| C-Eval format, demo subjects ({s['ceval_demo']['count']} questions, chance 0.25) | – | "
              f"{s['ceval_demo']['accuracy']:.3f} | ≥ 0.6 |", "",
              "Targets met: " + ", ".join(f"{st}.{k} {'yes' if s[st][k] >= t else 'NO'}" for st, k, t in TARGETS),
              "", "## The seed's demo questions", "", "| question | before SFT | after SFT | after DPO |",
              "|---|---|---|---|"]
    for q in s["demo_questions"]:
        cell = lambda t: t.replace("\n", " ").replace("|", "/")[:60]
        lines.append(f"| {q['question']} | {cell(q['before_sft'])} | {cell(q['after_sft'])} | {cell(q['after_dpo'])} |")
    right = s["demo_questions_correct"]
    lines += ["", "Answers holding every expected keyword: " + ", ".join(f"{k.replace('_', ' ')} {v:.2f}"
                                                                     for k, v in right.items())]
    lines += ["", "![loss curves](report_losses.png)", "", "![effects](report_effects.png)", ""]
    (out / "report.md").write_text("\n".join(lines))


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
    fig.savefig(out / "report_losses.png", dpi=90)
    plt.close(fig)

    bars = [("SFT held-out QA", s["sft"]["heldout_accuracy_before_sft"], s["sft"]["heldout_accuracy"]),
            ("LoRA identity", s["lora"]["identity_before"], s["lora"]["identity_after"]),
            ("DPO pref. acc.", s["dpo"]["pref_acc_before"], s["dpo"]["pref_acc_after"]),
            ("rude/evasive rate", s["dpo"]["rude_rate_before"], s["dpo"]["rude_rate_after"])]
    fig, ax = plt.subplots(figsize=(8, 3.2))
    x = range(len(bars))
    ax.bar([i - 0.2 for i in x], [b[1] for b in bars], width=0.4, label="before")
    ax.bar([i + 0.2 for i in x], [b[2] for b in bars], width=0.4, label="after")
    ax.axhline(0.25, color="grey", lw=0.8, ls=":")
    ax.set_xticks(list(x), [b[0] for b in bars])
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title(f"stage effects on held-out data (fact completion {s['pretrain']['fact_accuracy']:.2f}, "
                 f"demo C-Eval {s['ceval_demo']['accuracy']:.2f})")
    fig.tight_layout()
    fig.savefig(out / "report_effects.png", dpi=90)
    plt.close(fig)
