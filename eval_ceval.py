"""C-Eval and CMMLU: the letter A-D the model finds most likely after the chat-formatted question (the seed's
method), or the option whose text it finds most likely after the bare question (cloze); and the lm-evaluation-harness
command that gets the same number."""

import argparse
import os
import sys

from tqdm import tqdm

from model.cli import add_model_args, checked, load_from_flags, script
from model.device import DTYPES
from model.errors import EvalError
from model.evaluation import (HARNESS_METRIC, METHODS, ceval_accuracy, format_table, harness_commands, read_ceval_dir,
                              summarize, write_harness_task, write_results)

DETAILS = """\
Data: a folder of per-subject CSVs, C-Eval's (columns id,question,A,B,C,D,answer; `{subject}_val.csv` or any
*.csv) or CMMLU's (columns ,Question,A,B,C,D,Answer: an unnamed index first), each file's layout told by its
header. The default, dataset/ceval/val, is where the real C-Eval `val` split goes (unzip the ceval-exam
archive into dataset/ceval/: 52 subjects, 1346 questions); for CMMLU unzip its archive into dataset/cmmlu/ and
pass --data_dir dataset/cmmlu/test (67 subjects, answers included). The demo world writes its MCQ
files to dataset/demo/ceval. Cells are stripped of stray whitespace and an empty option stays empty. A row
without an answer is still scored and written to the result CSV, but not counted in the accuracy; the
tables and summary.json report how many there were ("unanswerable"). A file that cannot be read (empty, not
UTF-8, a header of neither layout, a row with too few or too many fields, an answer other than A-D) is
listed with its reason, one line each, the other files are scored, and the exit status is 1.
Scoring, --method letter (the default, the seed's): the user message is model.dataset.format_mcq(question,
[A, B, C, D]) in the chat template, followed by the assistant header; prob_A..prob_D are the next-token
probabilities of the four letters renormalised over them, letter_mass their share of all tokens, and the
prediction the most likely letter. --method cloze: the user message is the bare question; logprob_A..logprob_D
are the log-likelihoods of each option's text after the assistant header, split into tokens as
lm-evaluation-harness splits them (its acc_norm), score_A..score_D those divided by the option's length in
characters, and the prediction the highest score (an empty option is never chosen). The cloze form is what small
models are measured with: binding an answer to its letter emerges only at larger scale. A prompt longer than the
model's max_seq_len keeps its end; the count is reported. No sampling: runs repeat.
Writes {out_dir}/{subject}.csv (id, answer, prediction, correct and the method's columns), {out_dir}/summary.json
(with "method"), and {out_dir}/lm_eval_task/ (the questions with an answer and a task YAML including
model/harness/minimind_mcq_{method}.yaml); prints per-subject and total tables, then the lm_eval commands that
reproduce the total (metric acc for letter, acc_norm for cloze), also kept in summary.json under "lm_eval".
"""


@script
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=DETAILS,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, default_model="out/full_sft_512.pth")
    p.add_argument("--data_dir", default="dataset/ceval/val",
                   help="folder of C-Eval or CMMLU CSVs (default: %(default)s)")
    p.add_argument("--out_dir", default="out/ceval", help="where result CSVs and summary.json go")
    p.add_argument("--batch_size", type=checked(int, lambda v: v >= 1, ">= 1"), default=8)
    p.add_argument("--limit", type=checked(int, lambda v: v >= 1, ">= 1"), default=None,
                   help="at most N questions per subject (quick runs)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--method", choices=METHODS, default="letter",
                   help="letter: next-token probability of A-D (default); cloze: each option's text, length-normalised")
    args = p.parse_args(argv)

    failed = []  # one line per file that cannot be scored; the others are scored all the same
    try:
        subjects = read_ceval_dir(args.data_dir, args.limit, problems=failed)
    except ValueError as e:
        hint = ("" if os.path.isdir(args.data_dir) else
                " (put the C-Eval val CSVs there, or try --data_dir dataset/demo/ceval after the demo data is made)")
        raise EvalError(f"{e}{hint}") from None
    if not subjects:
        if len(failed) == 1:
            raise EvalError(failed[0])
        report_failed(failed)
        raise EvalError(f"none of the {len(failed)} files in {args.data_dir} can be scored")
    model, tokenizer = load_from_flags(args)
    model.to(DTYPES[args.dtype])

    questions = [q for qs in subjects.values() for q in qs]
    layouts = {name: qs[0].benchmark for name, qs in subjects.items() if qs}
    counts = {b: sum(1 for x in layouts.values() if x == b) for b in sorted(set(layouts.values()))}
    print(f"{len(questions)} questions in {len(subjects)} subject files: "
          + ", ".join(f"{n} {b}" for b, n in counts.items()))
    with tqdm(total=len(questions), desc="/".join(counts) or "MCQ", unit="q", file=sys.stderr) as bar:
        scored = ceval_accuracy(model, tokenizer, questions, args.method, args.batch_size, progress=bar)
    results, info = scored["results"], scored["info"]
    by_subject, i = {}, 0
    for name, qs in subjects.items():
        by_subject[name], i = results[i:i + len(qs)], i + len(qs)

    summary = summarize(by_subject)
    summary.update(method=args.method, model=str(args.model), data_dir=str(args.data_dir), layouts=layouts,
                   failed_files=failed, **info)
    task_folder = os.path.join(args.out_dir, "lm_eval_task")
    task = write_harness_task(task_folder, questions, args.method)  # (an OSError names the file: cli.run says it)
    commands = harness_commands(args.model, args.tokenizer, task_folder, task, model.config.max_seq_len,
                                os.path.join(args.out_dir, "hf_model"))
    summary["lm_eval"] = {"task": task, "metric": HARNESS_METRIC[args.method], **commands}
    write_results(args.out_dir, by_subject, summary)
    print(format_table(summary))
    if info["truncated_prompts"]:
        print(f"{info['truncated_prompts']} prompt(s) longer than {model.config.max_seq_len} tokens kept their end")
    print(f"results in {args.out_dir}/ (summary.json and one CSV per subject)")
    harness = summary["lm_eval"]
    print(f"the same number through lm-evaluation-harness ({harness['metric']} of task {task}"
          + (", after exporting the model" if "export" in harness else "") + "):")
    for key in ("export", "hf"):
        if key in harness:
            print(f"  {harness[key]}")
    print(f"or against a running `python my_openai_api.py --model {args.model}`:\n  {harness['server']}")
    if failed:
        report_failed(failed)
        sys.exit(1)
    return summary


def report_failed(failed):
    """Every file that could not be scored, one line each on stderr, after a count."""
    if failed:
        print(f"error: {len(failed)} file(s) not scored:", file=sys.stderr)
        for line in failed:
            print(f"  {line}", file=sys.stderr)


if __name__ == "__main__":
    main()
