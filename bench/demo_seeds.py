"""The demo's targets across world seeds: runs demo.py once per seed (finished stages are reused) and prints one
row per target with every seed's value, and the worst seed, so a default is judged by its worst world, not its best.

    python bench/demo_seeds.py --seeds 1-10 [--out out/demo_seeds] [-- extra demo.py flags]
"""
import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def seed_list(text):
    seeds = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        seeds += list(range(int(lo), int(hi or lo) + 1))
    return seeds


COMPARISON = re.compile(r"([\w.]+) (-?[\d.]+) ([+−]) ([\d.]+)")  # report.json's "versus": "pass1_before 0.214 + 0.15"


def bounds(t):
    """(is an upper bound, [the bounds one seed's value must clear]): the target and each comparison's base + margin."""
    upper = t["target"].startswith("≤")
    found = [float(t["target"][2:])]
    for name, base, sign, margin in COMPARISON.findall(t["versus"]):
        found.append(float(base) + (float(margin) if sign == "+" else -float(margin)))
    return upper, found


def slack(t):
    """How far one seed's value clears its tightest bound (negative: missed by that much)."""
    upper, found = bounds(t)
    return min(b - t["value"] for b in found) if upper else min(t["value"] - b for b in found)


def rule(t):
    """The target as a rule that holds for every seed: "≥ 0.60 and ≥ heldout_baseline + 0.40"."""
    parts = [] if t["target"] == "≥ 0.00" else [t["target"]]  # 0.00: only the comparison counts
    parts += [f"{t['target'][0]} {name} {sign} {margin}" for name, _, sign, margin in COMPARISON.findall(t["versus"])]
    return " and ".join(parts)


def table(reports):
    """Markdown: a row per target, a column per seed (value, ✓/✗), then the worst seed of that row."""
    seeds = list(reports)
    first = reports[seeds[0]]["targets"]
    lines = ["| target | " + " | ".join(f"seed {s}" for s in seeds) + " | worst |",
             "|---|" + "---|" * (len(seeds) + 1)]
    for i, t in enumerate(first):
        cells, worst = [], None
        for s in seeds:
            r = reports[s]["targets"][i]
            cells.append(f"{r['value']:.3f} {'✓' if r['met'] else '✗'}")
            if worst is None or slack(r) < worst[2]:
                worst = (s, r["value"], slack(r))
        met = sum(reports[s]["targets"][i]["met"] for s in seeds)
        lines.append(f"| {t['measure']} {rule(t)} | " + " | ".join(cells) +
                     f" | seed {worst[0]}: {worst[1]:.3f} ({met}/{len(seeds)} met) |")
    walls = [reports[s]["wall_seconds"] / 60 for s in seeds]
    lines.append(f"\nWall time per seed: {', '.join(f'{w:.1f}' for w in walls)} min ({reports[seeds[0]].get('cpu', '')}).")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=seed_list, default=seed_list("1-10"), help="e.g. 1-10 or 1,3,7")
    p.add_argument("--out", default="out/demo_seeds", help="one folder per seed below this one")
    p.add_argument("--report_only", action="store_true", help="only tabulate the reports already there")
    args, extra = p.parse_known_args()
    extra = [x for x in extra if x != "--"]
    reports = {}
    for seed in args.seeds:
        folder = Path(args.out) / f"seed{seed}"
        if not args.report_only:
            cmd = [sys.executable, "demo.py", "--seed", str(seed), "--out", str(folder), "--data", str(folder / "data"),
                   *extra]
            print(" ".join(cmd), flush=True)
            if subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL).returncode != 0:
                sys.exit(f"demo_seeds: the demo failed on seed {seed}; see the logs in {folder}")
        if (folder / "report.json").exists():
            reports[seed] = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    if reports:
        print(table(reports))


if __name__ == "__main__":
    main()
