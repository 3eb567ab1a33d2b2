"""Make the data every stage reads: the embedded demo world, or the real datasets converted to the same formats."""

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)
from model.errors import DataError, run  # noqa: E402 (after the path is set)


def demo(args):
    from model.demo.world import generate

    t0 = time.time()
    try:
        m = generate(args.out, seed=args.seed, n_entities=args.n_entities, heldout_frac=args.heldout_frac,
                     en_frac=args.en_frac, mcq_drills=args.mcq_drills, rounds=args.rounds,
                     followup_pages=args.followup_pages, grpo_replay=args.grpo_replay,
                     repo_root=ROOT)
    except ValueError as e:
        raise DataError(f"data_process.py demo: {e}") from None
    for name, size in m["sizes"].items():
        print(f"{name:32s} {size['rows']:7d} rows {size['chars']:9d} chars")
    print(f"English share of pretraining text: {m['english_share_of_pretrain']}")
    print(f"wrote {args.out} in {time.time() - t0:.1f}s (content sha256 {m['content_sha256'][:16]}...)")


def convert(args):
    from functools import partial

    from model import convert as cv

    if args.cmd in ("pretrain", "tokenizer"):
        make = partial(cv.pretrain_record, max_chars=args.max_chars)
        header = None
    elif args.cmd == "sft":
        as_csv = args.output.endswith(".csv")
        make = partial(cv.sft_record, multi_turn=args.multi_turn, min_q=args.min_q_chars, min_a=args.min_a_chars,
                       max_chars=args.max_chars, min_chinese=args.min_chinese_ratio, as_csv=as_csv)
        header = ["history", "q", "a"] if as_csv else None
    else:
        make, header = cv.dpo_record, None
    t0 = time.time()
    stats = cv.convert(args.input, args.output, make, skip_bad=args.skip_bad, max_line_bytes=args.max_line_bytes,
                       csv_header=header, progress=False if args.quiet else None, allow_empty=args.allow_empty)
    print(cv.summary(stats, args.output, args.skip_bad))
    print(f"done in {time.time() - t0:.1f}s")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="generate the deterministic demo world (all stages) into --out")
    d.add_argument("--seed", type=int, default=42)
    d.add_argument("--out", default="dataset/demo")
    d.add_argument("--n_entities", type=int, default=120,
                   help="made-up entities, split evenly over 4 types (pretraining cost grows linearly)")
    d.add_argument("--heldout_frac", type=float, default=0.25, help="entities whose facts only pretraining sees")
    d.add_argument("--en_frac", type=float, default=0.25, help="entities also described in English")
    d.add_argument("--rounds", type=int, default=1,
                   help="times the pretraining text states every fact, each time in a fresh order (demo.py: 30)")
    d.add_argument("--mcq_drills", type=int, default=4, help="multiple-choice SFT drills per SFT fact")
    d.add_argument("--followup_pages", type=float, default=0.0,
                   help="per round, the share of SFT entities that also get a pretraining page of questions in a row, "
                        "all but the first naming the entity by a pronoun")
    d.add_argument("--grpo_replay", action=argparse.BooleanOptionalAction, default=True,
                   help="mix a replay of the earlier lessons into grpo.jsonl (model/demo/grpo_task.py REPLAY; see the README)")

    def io_args(q, kind):
        q.add_argument("--input", required=True, help="raw file: JSONL, or a JSON array" if kind != "pretrain" else "raw JSONL")
        q.add_argument("--output", required=True)
        q.add_argument("--skip-bad", "--skip_bad", dest="skip_bad", action="store_true",
                       help="skip unusable records, listing their line numbers in OUTPUT.bad_lines.txt")
        q.add_argument("--max_line_bytes", type=int, default=4 << 20, help="longer records are bad input")
        q.add_argument("--quiet", action="store_true", help="no progress bar")
        q.add_argument("--allow-empty", "--allow_empty", dest="allow_empty", action="store_true",
                       help="write OUTPUT even if no record is kept (by default that is an error)")

    for name, max_chars, help_ in (("pretrain", 512, "keep {'text'} documents of at most --max_chars characters, whole"),
                                   ("tokenizer", 0, "tokenizer training text {'text'} (no length limit by default)")):
        q = sub.add_parser(name, help=help_)
        io_args(q, "pretrain")
        q.add_argument("--max_chars", type=int, default=max_chars, help="0: no limit")

    s = sub.add_parser("sft", help="deepctrl rows or {'conversations'} -> conversations JSONL (or history,q,a CSV)")
    io_args(s, "sft")
    s.add_argument("--multi-turn", "--multi_turn", dest="multi_turn", action="store_true",
                   help="keep the history turns (default: only the last question/answer)")
    s.add_argument("--min_q_chars", type=int, default=10)
    s.add_argument("--min_a_chars", type=int, default=5)
    s.add_argument("--max_chars", type=int, default=256, help="for question and answer; 0: no limit")
    s.add_argument("--min_chinese_ratio", type=float, default=0.9, help="keep if above; 0: no check")

    o = sub.add_parser("dpo", help="{'chosen','rejected'} message lists (or prompt/chosen/rejected strings) -> JSONL")
    io_args(o, "dpo")

    args = p.parse_args(argv)
    try:  # a bad file or an unwritable --out folder: one line, exit 1
        run(demo if args.cmd == "demo" else convert, args, exit_code=1)
    except KeyboardInterrupt:
        print("interrupted: no output was written", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
