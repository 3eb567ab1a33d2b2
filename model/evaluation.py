"""What the inference scripts share besides their flags (model/cli.py): prompt files, chat prompts within a token
budget, and C-Eval / CMMLU scoring."""
import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .files import atomic_write, first_line
from .dataset import format_mcq  # the MCQ layout the SFT data teaches; scoring must ask the same way

# ---------------------------------------------------------------------------------------------------------
# prompts and streamed generation


def read_prompts(path):
    """Prompts from a file: one per line, or JSONL lines with a "prompt" / "question" / "text" / "content" field."""
    if not Path(path).is_file():
        sys.exit(f"error: prompt file {path} not found")
    prompts = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                sys.exit(f"error: {path}:{lineno}: invalid UTF-8 at byte {e.start} of the line")
            if not line:
                continue
            if line.startswith("{"):
                try:
                    row = json.loads(line)
                    line = next(row[k] for k in ("prompt", "question", "text", "content", "q") if k in row)
                    str(line).encode("utf-8")  # a lone surrogate escape (\ud800) is half a character
                except (ValueError, StopIteration) as e:
                    what = "no prompt/question/text/content field" if isinstance(e, StopIteration) else e
                    sys.exit(f"error: {path}:{lineno}: bad JSON prompt line: {first_line(what)}")
            prompts.append(str(line))
    if not prompts:
        sys.exit(f"error: {path} holds no prompts")
    return prompts


def chat_input_ids(tokenizer, messages, budget):
    """Token ids of the chat prompt (ending in the assistant header); oldest turns dropped to fit `budget` tokens."""
    messages = list(messages)
    first = 1 if messages and messages[0]["role"] == "system" else 0  # the system text always stays
    while True:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) <= budget or len(messages) - first <= 1:
            return ids[-budget:]  # a single question still too long keeps its end (and the assistant header)
        messages = messages[:first] + messages[first + 2:]  # drop the oldest question and its answer


# ---------------------------------------------------------------------------------------------------------
# C-Eval (and CMMLU): multiple-choice questions scored by the next-token probability of A/B/C/D

LETTERS = ("A", "B", "C", "D")


@dataclass
class Question:
    subject: str
    id: str
    question: str
    options: tuple
    answer: str  # "A".."D", or "" when the file gives none (scored, written out, but not counted)
    benchmark: str = "C-Eval"  # the layout its file had: "C-Eval" or "CMMLU"


def subject_name(csv_path, taken):
    """accountant_val.csv -> accountant (the C-Eval file naming); the full stem when that name is taken."""
    stem = Path(csv_path).stem
    for suffix in ("_val", "_dev", "_test"):
        if stem.endswith(suffix) and stem[:-len(suffix)] and stem[:-len(suffix)] not in taken:
            return stem[:-len(suffix)]
    return stem


# the two layouts, told apart by the header: {field: column name}
LAYOUTS = {"C-Eval": {"id": "id", "question": "question", "answer": "answer"},    # id,question,A,B,C,D,answer
           "CMMLU": {"id": "", "question": "Question", "answer": "Answer"}}      # ,Question,A,B,C,D,Answer


def csv_layout(header, path):
    """(benchmark name, {field: column index}) of a header: C-Eval's (its test split has no answer column) or
    CMMLU's (an unnamed index column, capitalised Question and Answer)."""
    name = "CMMLU" if "Question" in header and "question" not in header else "C-Eval"
    fields = {**LAYOUTS[name], **{letter: letter for letter in LETTERS}}
    missing = [fields[f] for f in ("question", *LETTERS) if fields[f] not in header]
    if missing:
        raise ValueError(f"{path}:1: header lacks column(s) {', '.join(missing)} (need C-Eval's "
                         f"id,question,A,B,C,D,answer or CMMLU's ,Question,A,B,C,D,Answer)")
    return name, {f: header.index(column) for f, column in fields.items() if column in header}


def read_ceval_csv(path, subject):
    """Questions of one C-Eval or CMMLU CSV (layout from the header); cells stripped, bad rows named by line."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        benchmark, col = csv_layout(header, path)
        questions, start = [], reader.line_num + 1
        for row in reader:
            lineno, start = start, reader.line_num + 1
            if not any(cell.strip() for cell in row):
                continue  # a blank line
            if len(row) > len(header):
                raise ValueError(f"{path}:{lineno}: {len(row)} fields but the header has {len(header)}")
            cell = lambda name: row[col[name]].strip() if name in col and col[name] < len(row) else ""  # noqa: E731
            answer = cell("answer").upper()
            if answer and answer not in LETTERS:
                raise ValueError(f"{path}:{lineno}: answer {answer!r} is not one of A, B, C, D")
            questions.append(Question(subject, cell("id") or str(len(questions)), cell("question"),
                                      tuple(cell(letter) for letter in LETTERS), answer, benchmark))
    return questions


def read_ceval_dir(data_dir, limit=None):
    """{subject: [Question]} from every *.csv in data_dir (sorted by file name); at most `limit` per subject."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ValueError(f"C-Eval folder {data_dir} not found")
    files = sorted(data_dir.glob("*.csv"))
    if not files:
        subdirs = ", ".join(sorted(p.name for p in data_dir.iterdir() if p.is_dir()))
        raise ValueError(f"no *.csv files in {data_dir}" + (f" (it has folders: {subdirs})" if subdirs else ""))
    subjects = {}
    for path in files:
        name = subject_name(path, subjects)
        try:
            subjects[name] = read_ceval_csv(path, name)[:limit]
        except UnicodeDecodeError:
            with open(path, "rb") as f:
                bad = next((n for n, raw in enumerate(f, 1) if not is_utf8(raw)), "?")
            raise ValueError(f"{path}:{bad}: invalid UTF-8 (save the file as UTF-8)") from None
    return subjects


def is_utf8(raw):
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def mcq_prompt_ids(tokenizer, q: Question):
    text = tokenizer.apply_chat_template([{"role": "user", "content": format_mcq(q.question, list(q.options))}],
                                         tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def letter_token_ids(tokenizer, prompt_ids):
    """Ids of "A".."D" as the tokenizer encodes each letter right after the prompt (one token each)."""
    text = tokenizer.decode(prompt_ids)
    ids = []
    for letter in LETTERS:
        full = tokenizer.encode(text + letter, add_special_tokens=False)
        alone = tokenizer.encode(letter, add_special_tokens=False)
        if full[:len(prompt_ids)] == list(prompt_ids) and len(full) == len(prompt_ids) + 1:
            ids.append(full[-1])
        elif len(alone) == 1:
            ids.append(alone[0])
        else:
            raise ValueError(f"the tokenizer has no single token for {letter!r} (it gives {alone})")
    return ids


@torch.inference_mode()
def letter_probs(model, batch, letter_ids, pad_id=0):
    """Next-token probabilities of the letters after each prompt of a left-padded batch.

    Returns (B, 4) probabilities renormalised over the four letters, and (B,) the mass the letters hold
    among all tokens (how much the model "thinks" the answer is a letter at all)."""
    T = max(len(seq) for seq in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), T), dtype=torch.long)
    for i, seq in enumerate(batch):
        ids[i, T - len(seq):] = torch.as_tensor(seq)
        mask[i, T - len(seq):] = 1
    device = next(model.parameters()).device
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=1).logits[:, -1]
    logp = logits.float().log_softmax(-1)[:, letter_ids]
    return logp.softmax(-1).cpu(), logp.exp().sum(-1).cpu()


def score_questions(model, tokenizer, questions, batch_size=8, max_len=512, progress=None):
    """One result dict per question (same order): prediction, correctness and the letter probabilities.

    Prompts longer than max_len keep their last max_len tokens (the options and the assistant header);
    batches are formed from prompts of similar length, so results do not depend on padding order."""
    prompts = [mcq_prompt_ids(tokenizer, q) for q in questions]
    truncated = sum(len(p) > max_len for p in prompts)
    prompts = [p[-max_len:] for p in prompts]
    letter_ids = letter_token_ids(tokenizer, prompts[0]) if prompts else []
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    results = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        probs, mass = letter_probs(model, [prompts[i] for i in idx], letter_ids, tokenizer.pad_token_id or 0)
        for row, i in enumerate(idx):
            q, p = questions[i], probs[row].tolist()
            pred = LETTERS[max(range(4), key=lambda k: p[k])]
            results[i] = dict(id=q.id, answer=q.answer, prediction=pred,
                              correct="" if not q.answer else int(pred == q.answer),
                              **{f"prob_{letter}": round(v, 6) for letter, v in zip(LETTERS, p)},
                              letter_mass=round(mass[row].item(), 6))
        if progress is not None:
            progress.update(len(idx))
    return results, {"letter_token_ids": dict(zip(LETTERS, letter_ids)), "truncated_prompts": truncated}


def tally(results):
    answered = [r for r in results if r["answer"]]
    correct = sum(r["correct"] for r in answered)
    return {"correct": correct, "count": len(answered), "accuracy": correct / len(answered) if answered else None,
            "unanswerable": len(results) - len(answered)}


def summarize(results_by_subject):
    """summary.json content: per-subject and total correct/count/accuracy (rows without an answer listed apart)."""
    subjects = {name: tally(rows) for name, rows in results_by_subject.items()}
    everything = [r for rows in results_by_subject.values() for r in rows]
    return {"total": tally(everything), "subjects": subjects}


def write_results(out_dir, results_by_subject, summary):
    """One {subject}.csv of per-question results per subject, and summary.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = ["id", "answer", "prediction", "correct", *[f"prob_{x}" for x in LETTERS], "letter_mass"]
    for name, rows in results_by_subject.items():
        def write(tmp, rows=rows):
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=columns)
                writer.writeheader()
                writer.writerows(rows)
        atomic_write(out_dir / f"{name}.csv", write)
    text = json.dumps(summary, indent=2, ensure_ascii=False)
    atomic_write(out_dir / "summary.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def format_table(summary):
    """Per-subject rows then the total, as a fixed-width text table."""
    def pct(s):
        return "-" if s["accuracy"] is None else f"{100 * s['accuracy']:.2f}%"
    width = max([len(n) for n in summary["subjects"]] + [7])
    lines = [f"{'subject':<{width}}  {'correct':>7}  {'count':>5}  {'accuracy':>8}"]
    for name, s in summary["subjects"].items():
        lines.append(f"{name:<{width}}  {s['correct']:>7}  {s['count']:>5}  {pct(s):>8}")
    t = summary["total"]
    lines.append(f"{'TOTAL':<{width}}  {t['correct']:>7}  {t['count']:>5}  {pct(t):>8}")
    if t["unanswerable"]:
        where = ", ".join(f"{n}: {s['unanswerable']}" for n, s in summary["subjects"].items() if s["unanswerable"])
        lines.append(f"{t['unanswerable']} row(s) have no answer: scored and written to the result CSVs, "
                     f"not counted ({where})")
    return "\n".join(lines)
