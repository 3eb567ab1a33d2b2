"""What the inference scripts share besides their flags (model/cli.py): prompt files, chat prompts within a token
budget, C-Eval / CMMLU scoring (letter and cloze, as lm-evaluation-harness computes them) and bits per byte."""
import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from shlex import quote

import torch

from .convert import BOM, encoding_advice, is_utf8, sniff_encoding
from .files import atomic_write, first_line
from .chat_format import encoder_for, render
from .dataset import format_mcq  # the MCQ layout the SFT data teaches; scoring must ask the same way
from .errors import EvalError
from .LMConfig import PAD_ID

# ---------------------------------------------------------------------------------------------------------
# prompts and streamed generation


def read_prompts(path):
    """Prompts from a file: one per line, or JSONL lines with a "prompt" / "question" / "text" / "content" field."""
    if not Path(path).is_file():
        raise EvalError(f"prompt file {path} not found")
    prompts = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                raise EvalError(f"{path}:{lineno}: invalid UTF-8 at byte {e.start} of the line") from None
            if not line:
                continue
            if line.startswith("{"):
                try:
                    row = json.loads(line)
                    line = next(row[k] for k in ("prompt", "question", "text", "content", "q") if k in row)
                    str(line).encode("utf-8")  # a lone surrogate escape (\ud800) is half a character
                except (ValueError, StopIteration) as e:
                    what = "no prompt/question/text/content field" if isinstance(e, StopIteration) else e
                    raise EvalError(f"{path}:{lineno}: bad JSON prompt line: {first_line(what)}") from None
            prompts.append(str(line))
    if not prompts:
        raise EvalError(f"{path} holds no prompts")
    return prompts


def chat_input_ids(tokenizer, messages, budget, tools=None, enable_thinking=None):
    """Token ids of the chat prompt (ending in the assistant header); oldest exchanges (a question and all that
    answered it, tool results included) dropped to fit `budget` tokens. System texts always stay."""
    systems = [m for m in messages if m["role"] == "system"]
    rest = [m for m in messages if m["role"] != "system"]
    while True:
        ids = encoder_for(tokenizer).prompt(systems + rest, tools, enable_thinking)
        questions = [i for i, m in enumerate(rest) if m["role"] == "user"]
        if len(ids) <= budget or len(questions) <= 1:
            return ids[-budget:]  # a single question still too long keeps its end (and the assistant header)
        rest = rest[questions[1]:]


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
    CMMLU's (an unnamed index column, capitalised Question and Answer). A column spelled the other layout's way
    would be read as missing (every answer blank), so it is an error."""
    name = "CMMLU" if "Question" in header and "question" not in header else "C-Eval"
    other = LAYOUTS["CMMLU" if name == "C-Eval" else "C-Eval"]
    mixed = [h for h in header if h and h in (other["question"], other["answer"])]
    if mixed:
        raise ValueError(f"{path}:1: header has {', '.join(repr(h) for h in mixed)} in a {name} header "
                         f"(C-Eval's is id,question,A,B,C,D,answer; CMMLU's ,Question,A,B,C,D,Answer): fix its spelling")
    fields = {**LAYOUTS[name], **{letter: letter for letter in LETTERS}}
    missing = [fields[f] for f in ("question", *LETTERS) if fields[f] not in header]
    if missing:
        raise ValueError(f"{path}:1: header lacks column(s) {', '.join(missing)} (need C-Eval's "
                         f"id,question,A,B,C,D,answer or CMMLU's ,Question,A,B,C,D,Answer)")
    return name, {f: header.index(column) for f, column in fields.items() if column in header}


def read_csv_text(path):
    """A CSV file's text; ValueError naming an empty file, or an encoding that is not UTF-8 (with what to do)."""
    raw = Path(path).read_bytes()
    if not raw.removeprefix(BOM).strip():
        raise ValueError(f"{path}: empty file")
    encoding = sniff_encoding(raw)
    if encoding:
        raise ValueError(encoding_advice(path, encoding))
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        bad = next(n for n, line in enumerate(raw.splitlines(), 1) if not is_utf8(line))
        raise ValueError(f"{path}:{bad}: invalid UTF-8 (save the file as UTF-8)") from None


def read_ceval_csv(path, subject):
    """Questions of one C-Eval or CMMLU CSV (layout from the header); cells stripped, bad rows named by line."""
    with io.StringIO(read_csv_text(path), newline="") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        benchmark, col = csv_layout(header, path)
        questions, start = [], reader.line_num + 1
        for row in reader:
            lineno, start = start, reader.line_num + 1
            if not any(cell.strip() for cell in row):
                continue  # a blank line
            if len(row) != len(header):
                raise ValueError(f"{path}:{lineno}: {len(row)} fields but the header has {len(header)}"
                                 f"{' (a short row: a missing field or a comma too few)' if len(row) < len(header) else ''}")
            cell = lambda name: row[col[name]].strip() if name in col and col[name] < len(row) else ""  # noqa: E731
            answer = cell("answer").upper()
            if answer and answer not in LETTERS:
                raise ValueError(f"{path}:{lineno}: answer {answer!r} is not one of A, B, C, D")
            questions.append(Question(subject, cell("id") or str(len(questions)), cell("question"),
                                      tuple(cell(letter) for letter in LETTERS), answer, benchmark))
    return questions


def read_ceval_dir(data_dir, limit=None, problems=None):
    """{subject: [Question]} from every *.csv in data_dir (sorted by file name); at most `limit` per subject.
    A bad file raises ValueError, or with a `problems` list, is skipped and its one-line reason appended."""
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
        except (ValueError, OSError, csv.Error) as e:
            if problems is None:
                raise ValueError(first_line(e)) from None
            problems.append(first_line(e))
    return subjects


def mcq_prompt_ids(tokenizer, q: Question):
    return encoder_for(tokenizer).prompt([{"role": "user", "content": format_mcq(q.question, list(q.options))}])


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
def letter_probs(model, batch, letter_ids, pad_id=PAD_ID):
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
        probs, mass = letter_probs(model, [prompts[i] for i in idx], letter_ids, tokenizer.pad_token_id or PAD_ID)
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


# ---------------------------------------------------------------------------------------------------------
# the cloze form: each option's text scored after the bare question, as lm-evaluation-harness does

METHODS = ("letter", "cloze")


def cloze_context(tokenizer, q: Question):
    """The text each option follows: the chat prompt of the bare question, ending in the assistant header (as text:
    lm-evaluation-harness encodes the context and each option as text)."""
    return render([{"role": "user", "content": q.question}], add_generation_prompt=True)


def harness_pair(tokenizer, context, continuation):
    """(context ids, continuation ids) as lm-evaluation-harness splits a pair: whitespace ending the context
    moves to the continuation, then context + continuation is encoded whole and cut after the context's own
    tokens. (Chat contexts end in a newline, so that newline's token is scored with every option.)"""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    context_ids = encode(context)
    return context_ids, encode(context + continuation)[len(context_ids):]


@torch.inference_mode()
def continuation_logprobs(model, pairs, max_len, pad_id=PAD_ID):
    """Sum of the log-probabilities of each pair's continuation ids after its context ids, from one forward per
    right-padded batch; a sequence longer than max_len + 1 keeps its end (lm-evaluation-harness's rule)."""
    seqs = [(c + x)[-(max_len + 1):] for c, x in pairs]
    T = max(len(s) for s in seqs) - 1
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s) - 1] = torch.as_tensor(s[:-1])
    device = next(model.parameters()).device
    logp = model(input_ids=ids.to(device)).logits.float().log_softmax(-1).cpu()
    out = []
    for i, (s, (_, x)) in enumerate(zip(seqs, pairs)):
        n = min(len(x), len(s) - 1)
        targets = torch.as_tensor(s[-n:])
        out.append(logp[i, len(s) - 1 - n:len(s) - 1].gather(-1, targets[:, None]).sum().item())
    return out


def score_cloze(model, tokenizer, questions, batch_size=8, max_len=512, progress=None):
    """score_questions' results for the cloze form: logprob_X is the log-likelihood of option X's text after
    cloze_context, score_X that divided by the option's length in characters (lm-evaluation-harness's acc_norm),
    and the prediction the first option with the highest score. An empty option scores -inf (never chosen)."""
    results, truncated = [], 0
    for start in range(0, len(questions), batch_size):
        chunk = questions[start:start + batch_size]
        pairs = [harness_pair(tokenizer, cloze_context(tokenizer, q), opt) for q in chunk for opt in q.options]
        truncated += sum(any(len(c) + len(x) > max_len + 1 for c, x in pairs[4 * k:4 * k + 4])
                         for k in range(len(chunk)))
        lls = continuation_logprobs(model, pairs, max_len, tokenizer.pad_token_id or PAD_ID)
        for k, q in enumerate(chunk):
            ll = lls[4 * k:4 * k + 4]
            score = [v / len(opt) if opt else -math.inf for v, opt in zip(ll, q.options)]
            pred = LETTERS[max(range(4), key=lambda j: score[j])]
            results.append(dict(id=q.id, answer=q.answer, prediction=pred,
                                correct="" if not q.answer else int(pred == q.answer),
                                **{f"logprob_{x}": round(v, 6) for x, v in zip(LETTERS, ll)},
                                **{f"score_{x}": round(v, 6) for x, v in zip(LETTERS, score)}))
        if progress is not None:
            progress.update(len(chunk))
    return results, {"truncated_prompts": truncated}


def ceval_accuracy(model, tokenizer, questions, method="letter", batch_size=8, max_len=None, progress=None):
    """Multiple-choice accuracy of a model on Questions (read_ceval_dir / read_ceval_csv, or built by hand), by
    the letter form (score_questions) or the cloze form (score_cloze). Returns {"method", "accuracy" (None when
    no question has an answer), "correct", "count", "unanswerable", "choices" (the predicted letter of each
    question, in order), "results" (one dict per question), "info"}."""
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {', '.join(METHODS)}")
    score = score_questions if method == "letter" else score_cloze
    results, info = score(model, tokenizer, list(questions), batch_size, max_len or model.config.max_seq_len,
                          progress)
    return {"method": method, **tally(results), "choices": [r["prediction"] for r in results], "results": results,
            "info": info}


HARNESS_TASKS = Path(__file__).resolve().parent / "harness"  # the shipped lm-evaluation-harness task YAMLs
HARNESS_METRIC = {"letter": "acc", "cloze": "acc_norm"}  # the harness's metric that equals each method's accuracy


def write_harness_task(folder, questions, method):
    """An lm-evaluation-harness task over exactly the questions that count (those with an answer), as the
    shipped task for `method` reads them: questions_{method}.jsonl (C-Eval's columns, cells as scored) and a YAML
    that includes model/harness/minimind_mcq_{method}.yaml; both methods' tasks can share a folder (one lm_eval run
    with --tasks minimind_ceval_letter,minimind_ceval_cloze). Returns the task's name."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"minimind_ceval_{method}"
    rows = [json.dumps({"id": q.id, "question": q.question, **dict(zip(LETTERS, q.options)), "answer": q.answer},
                       ensure_ascii=False) for q in questions if q.answer]
    data = folder / f"questions_{method}.jsonl"
    atomic_write(data, lambda tmp: Path(tmp).write_text("\n".join(rows) + "\n", encoding="utf-8"))
    yaml = (f"include: {json.dumps(str(HARNESS_TASKS / f'minimind_mcq_{method}.yaml'))}\n"
            f"task: {name}\ndataset_path: json\n"  # JSON keeps every cell a string, as scored
            f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data.resolve()))}\n")
    atomic_write(folder / f"{name}.yaml", lambda tmp: Path(tmp).write_text(yaml, encoding="utf-8"))
    return name


def harness_commands(model_path, tokenizer_dir, task_folder, task, max_len, export_dir):
    """The shell commands that get the same number through lm-evaluation-harness: {"export" (when the model is
    a checkpoint file, not an export folder), "hf" (the export, in-process), "server" (a running
    my_openai_api.py of the same model, through /v1/completions)}."""
    model_path = Path(model_path)
    folder = quote(str(model_path if model_path.is_dir() else Path(export_dir)))
    tokenizer_dir, offline = quote(str(tokenizer_dir)), "HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 lm_eval"
    common = f"--tasks {task} --include_path {quote(str(task_folder))}"
    commands = {}
    if not model_path.is_dir():
        commands["export"] = (f"python export_model.py --model {quote(str(model_path))} --tokenizer {tokenizer_dir} "
                              f"--out {folder}")
    commands["hf"] = (f"{offline} --model hf --model_args pretrained={folder},trust_remote_code=True,"
                      f"dtype=float32,max_length={max_len} {common} --batch_size 8")
    commands["server"] = (f"{offline} --model local-completions --model_args model=minimind,"
                          f"base_url=http://127.0.0.1:8998/v1/completions,tokenizer={tokenizer_dir},"
                          f"tokenizer_backend=huggingface,max_length={max_len} {common} --batch_size 16")
    return commands


# ---------------------------------------------------------------------------------------------------------
# bits per byte: a language model's loss in a unit every tokenizer shares


def read_documents(path, tokenizer):
    """The documents of a bits-per-byte file: a .jsonl of {"text": ...} records (the pretraining format; a bad
    record is named by file and line), or any other file as one document."""
    from .dataset import DataError, PretrainDataset
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} not found")
    if path.suffix == ".jsonl":
        docs = PretrainDataset(path, tokenizer)
        try:
            return [docs.text(i) for i in range(len(docs))]
        except DataError as e:
            raise ValueError(str(e)) from None
    try:
        return [path.read_text(encoding="utf-8")]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: invalid UTF-8 at byte {e.start}") from None


@torch.inference_mode()
def bits_per_byte(model, tokenizer, documents, max_len=None):
    """Bits per byte over whole documents, each encoded as pretraining encodes it (<s> + text): every token after
    <s> is predicted, a document longer than the context in windows of max_len tokens (each window starts from
    the last token of the one before), and the summed loss in bits is divided by the UTF-8 bytes those tokens
    spell. Special tokens spell no bytes and are not counted, so the number does not depend on a vocabulary's
    own markers: models with different tokenizers compare. Returns {"bpb", "bytes", "tokens", "documents",
    "nats"}."""
    from .dataset import special_ids
    from .sampling import token_bytes_table
    max_len = max_len or model.config.max_seq_len
    spelled = [len(b) for b in token_bytes_table(tokenizer, model.config.vocab_size)]
    bos = special_ids(tokenizer)[0]
    device = next(model.parameters()).device
    nats, n_bytes, n_tokens = 0.0, 0, 0
    for text in documents:
        ids = [bos] + tokenizer.encode(text, add_special_tokens=False)
        for start in range(0, len(ids) - 1, max_len):
            window = ids[start:start + max_len + 1]
            logits = model(input_ids=torch.tensor([window[:-1]], device=device)).logits[0].float()
            targets = torch.tensor(window[1:], device=device)
            losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
            counted = torch.tensor([spelled[t] > 0 for t in window[1:]], device=device)
            nats += losses[counted].sum().item()
            n_tokens += int(counted.sum())
            n_bytes += sum(spelled[t] for t in window[1:])
    return {"bpb": nats / math.log(2) / n_bytes if n_bytes else None, "bytes": n_bytes, "tokens": n_tokens,
            "documents": len(documents), "nats": nats}


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
    for name, rows in results_by_subject.items():
        columns = list(rows[0]) if rows else ["id", "answer", "prediction", "correct"]  # the method's columns
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
