"""How the demo's held-out accuracy grows with the size of its world and the passes over it: runs demo.py up to
SFT for a grid of (entities, rounds), measures each model beside its trivial baselines, and plots the curves."""
import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import demo  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--points", default="60x30,120x30,240x10,240x20,240x30",
                   help="ENTITIESxROUNDS, comma-separated; the demo's own default point reuses out/demo if it ran")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default="out/scaling")
    p.add_argument("--eval_limit", type=int, default=300)
    p.add_argument("--scale", type=float, default=1.0, help="passed to demo.py: multiply every stage's epochs")
    p.add_argument("--json", default="bench/demo_scaling.json")
    p.add_argument("--plot", default="images/demo_scaling.png")
    return p.parse_args()


def run_point(args, n_entities, rounds):
    """Train one point with demo.py (up to SFT) and return its folders, the SFT model's C-Eval run included."""
    default = demo.parse_args([])
    if (n_entities, rounds, args.seed) == (default.n_entities, default.rounds, default.seed):
        out, data = Path(default.out), Path(default.data)  # what `python demo.py` writes: reused if finished
    else:
        out = Path(args.out) / f"e{n_entities}_r{rounds}_s{args.seed}"
        data = out / "data"
    cmd = [sys.executable, "demo.py", "--out", out, "--data", data, "--seed", args.seed,
           "--n_entities", n_entities, "--rounds", rounds, "--scale", args.scale, "--until", "sft"]
    subprocess.run([str(c) for c in cmd], cwd=ROOT, check=True)
    manifest = json.loads((data / "manifest.json").read_text())
    files = {role: data / Path(path).name for role, path in manifest["files"].items()}
    return out, files, manifest


def measure_point(args, out, files, manifest):
    from transformers import AutoTokenizer

    from model.checkpoint import load_model, weights_name
    from model.demo import measure as M
    from model.LMConfig import LMConfig

    d = demo.parse_args([])
    config = LMConfig(dim=d.dim, n_layers=d.n_layers, n_heads=d.n_heads, n_kv_heads=d.n_kv_heads)
    tokenizer = out / "tokenizer"
    tok = AutoTokenizer.from_pretrained(tokenizer)
    pretrain, sft = (load_model(out / weights_name(p, config)) for p in ("pretrain", "full_sft"))
    held = M.sample([r for r in M.read_jsonl(files["eval_pretrain"])
                     if r["kind"] == "new_context" and r["split"] == "heldout"], args.eval_limit)
    questions = M.read_jsonl(files["eval_sft"], args.eval_limit)
    ceval_dir = out / "ceval_sft"
    subprocess.run([sys.executable, "eval_ceval.py", "--model", str(out / weights_name("full_sft", config)),
                    "--tokenizer", str(tokenizer), "--data_dir", str(files["ceval_dir"]), "--out_dir", str(ceval_dir),
                    "--batch_size", "16", "--device", "cpu"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    total = json.loads((ceval_dir / "summary.json").read_text())["total"]
    letters = [r["answer"] for r in M.read_ceval_keys(files["ceval_dir"])]
    stages = {p.stem: json.loads(p.read_text())["seconds"] for p in (out / "stages").glob("*.json")}
    keep = lambda m: {k: m[k] for k in ("value", "n", "ci95", "baseline") if k in m}
    return {"pretrain_heldout_completion": keep(M.completion(pretrain, tok, held, manifest)),
            "sft_heldout_qa": keep(M.chat_answers(sft, tok, questions, manifest)),
            "ceval_sft": {"value": total["accuracy"], "n": int(total["count"]),
                          "ci95": M.wilson(total["accuracy"] * total["count"], total["count"]),
                          "baseline": max(letters.count(x) for x in "ABCD") / len(letters)},
            "train_seconds": round(stages.get("pretrain", 0) + stages.get("sft", 0), 1)}


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    most_rounds = max(r["rounds"] for r in results)
    most_entities = max(r["n_entities"] for r in results)
    panels = [("entities in the world (rounds %d)" % most_rounds, "n_entities",
               [r for r in results if r["rounds"] == most_rounds]),
              ("rounds: times pretraining states each fact (%d entities)" % most_entities, "rounds",
               [r for r in results if r["n_entities"] == most_entities])]
    series = [("pretrain_heldout_completion", "pretrain: held-out fact completion", "tab:blue"),
              ("sft_heldout_qa", "SFT: answers about held-out entities", "tab:green"),
              ("ceval_sft", "SFT: multiple choice on held-out facts", "tab:red")]
    panels = [p for p in panels if len(p[2]) > 1] or panels[:1]  # a curve needs two points
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, (title, key, rows) in zip(axes, panels):
        rows = sorted(rows, key=lambda r: r[key])
        xs = [r[key] for r in rows]
        for name, label, color in series:
            ys = [r[name]["value"] for r in rows]
            err = [[y - r[name]["ci95"][0] for y, r in zip(ys, rows)], [r[name]["ci95"][1] - y for y, r in zip(ys, rows)]]
            ax.errorbar(xs, ys, yerr=err, marker="o", color=color, label=label, capsize=3)
            if rows and "baseline" in rows[0][name]:
                ax.plot(xs, [r[name]["baseline"] for r in rows], ls="--", color=color, alpha=0.6)
        ax.set_xlabel(title)
        ax.set_xticks(xs)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (dashed: its best trivial baseline)")
    axes[0].legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    args = parse_args()
    results = []
    for point in args.points.split(","):
        n_entities, rounds = (int(x) for x in point.lower().split("x"))
        out, files, manifest = run_point(args, n_entities, rounds)
        row = {"n_entities": n_entities, "rounds": rounds, "seed": args.seed, **measure_point(args, out, files, manifest)}
        results.append(row)
        print(json.dumps(row), flush=True)
    Path(args.json).write_text(json.dumps({"cpu": demo.cpu_kind(), "points": results}, indent=1) + "\n")
    plot(results, args.plot)
    print(f"wrote {args.json} and {args.plot}")


if __name__ == "__main__":
    main()
