"""Streaming converters from the real dataset formats to the processed files every stage reads."""

import csv
import json
import os
import re
from collections import Counter

from tqdm import tqdm

from .chat_format import FormatError, check_conversation
from .errors import DataError
from .files import atomic_open, temp_path
# the readers live in model/reading.py; callers may import them from here
from .reading import (BOM, DEFAULT_MAX_LINE_BYTES, BadRecord, encoding_advice, is_gzip, is_utf8,  # noqa: F401
                      iter_json_array, iter_jsonl, iter_records, looks_like_json_array, open_input, sniff_encoding)


# Which command writes which processed file: used by every 'file not found' message.
MAKE_COMMANDS = {
    "demo": "python data_process.py demo",
    "pretrain": "python data_process.py pretrain --input RAW.jsonl --output {path}",
    "tokenizer": "python data_process.py tokenizer --input RAW.jsonl --output {path}",
    "sft": "python data_process.py sft --input RAW.jsonl --output {path} [--multi-turn]",
    "dpo": "python data_process.py dpo --input RAW.json --output {path}",
    "grpo": "JSONL rows {{\"conversations\": [... ending with the user], \"answer\": ...}} written to {path}",
}


def missing_file_error(path, kind):
    """A DataError for a processed data file that does not exist, naming the command that creates it."""
    parts = os.path.normpath(str(path)).replace("\\", "/").split("/")
    if "demo" in parts:
        how = MAKE_COMMANDS["demo"]
    else:
        how = MAKE_COMMANDS[kind].format(path=path) + " (or make the demo data: python data_process.py demo)"
    return DataError(f"{path}: file not found; create it with: {how} -- see dataset/README.md")


# ---------------------------------------------------------------------------------------------
# Field checks and the three record transforms: (record) -> (output, None) or (None, drop_reason).


def field(obj, name, kind, required=True):
    """obj[name] checked against `kind`; raises BadRecord naming the field."""
    if name not in obj or obj[name] is None:
        if required:
            raise BadRecord(f"missing field '{name}'")
        return None
    value = obj[name]
    if not isinstance(value, kind):
        want = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise BadRecord(f"field '{name}' must be {want}, got {type(value).__name__}")
    return value


def check_messages(msgs, name, last="assistant"):
    """A chat as the format allows it (model/chat_format.py): system text anywhere, user and assistant turns
    alternating, tool results after a tool call, ending with `last` (a prompt for the model to answer ends with the
    user)."""
    try:
        return check_conversation(msgs, name, final=last)
    except FormatError as e:
        raise BadRecord(str(e)) from None


def pretrain_record(obj, max_chars=512):
    """Seed rule: a document is kept whole or not at all (no cutting into pieces)."""
    text = field(obj, "text", str)
    if not text.strip():
        return None, "empty_text"
    if max_chars and len(text) > max_chars:
        return None, f"longer_than_{max_chars}_chars"
    return {"text": text}, None


def chinese_ratio(text):
    """The seed's measure: CJK unified ideographs over all characters (punctuation counts against)."""
    if not text:
        return 0.0
    return sum("\u4e00" <= c <= "\u9fff" for c in text) / len(text)


def sft_turns(obj):
    """(system, history [(q, a)], q, a) from a deepctrl row or a {"conversations": [...]} row."""
    if "conversations" in obj:
        msgs = check_messages(obj["conversations"], "conversations")
        if any(m["role"] == "tool" or len(m) > 2 for m in msgs):
            raise BadRecord("tool calls and thinking are kept only in the JSONL chat form; this converter writes "
                            "plain question-answer chats")
        systems = [m["content"] for m in msgs if m["role"] == "system"]
        system = "\n".join(systems) if systems else None
        turns = [m for m in msgs if m["role"] != "system"]
        pairs = [(turns[i]["content"], turns[i + 1]["content"]) for i in range(0, len(turns), 2)]
        return system, pairs[:-1], pairs[-1][0], pairs[-1][1]
    if "instruction" not in obj and "output" not in obj:
        raise BadRecord("expected 'conversations', or deepctrl fields 'instruction'/'input'/'output'/'history'")
    q = field(obj, "instruction", str)
    extra = field(obj, "input", str, required=False)
    if extra:
        q = f"{q}\n{extra}" if q else extra
    a = field(obj, "output", str)
    history = field(obj, "history", list, required=False) or []
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise BadRecord(f"history[{i}] must be a [question, answer] pair of strings")
    return None, [tuple(p) for p in history], q, a


def sft_record(obj, multi_turn=False, min_q=10, min_a=5, max_chars=256, min_chinese=0.9, as_csv=False):
    """Seed cleaning on the final question/answer; single-turn keeps only that last pair."""
    system, history, q, a = sft_turns(obj)
    if len(q) < min_q:
        return None, f"question_shorter_than_{min_q}"
    if len(a) < min_a:
        return None, f"answer_shorter_than_{min_a}"
    if max_chars and len(q) > max_chars:
        return None, f"question_longer_than_{max_chars}"
    if max_chars and len(a) > max_chars:
        return None, f"answer_longer_than_{max_chars}"
    if min_chinese and (chinese_ratio(q) <= min_chinese or chinese_ratio(a) <= min_chinese):
        return None, f"chinese_ratio_not_above_{min_chinese}"
    if not multi_turn:
        history = []
    if as_csv:
        return [json.dumps([list(p) for p in history], ensure_ascii=False), q, a], None
    msgs = [{"role": "system", "content": system}] if system is not None else []
    for hq, ha in history + [(q, a)]:
        msgs += [{"role": "user", "content": hq}, {"role": "assistant", "content": ha}]
    return {"conversations": msgs}, None


def _as_messages(value, name, prompt):
    if isinstance(value, str):
        return prompt + [{"role": "assistant", "content": value}]
    if isinstance(value, list) and prompt and all(isinstance(m, dict) and m.get("role") == "assistant" for m in value):
        return prompt + value  # {"prompt": [...], "chosen": [assistant message]}
    if isinstance(value, list):
        return value
    raise BadRecord(f"field '{name}' must be a list of messages or a string, got {type(value).__name__}")


def dpo_record(obj):
    """Rows {"chosen": [msgs], "rejected": [msgs]}, or {"prompt", "chosen", "rejected"} with strings."""
    for name in ("chosen", "rejected"):
        field(obj, name, (list, str))
    prompt = obj.get("prompt")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    elif prompt is not None and not isinstance(prompt, list):
        raise BadRecord(f"field 'prompt' must be a string or a list of messages, got {type(prompt).__name__}")
    prompt = prompt or []
    chosen = check_messages(_as_messages(obj["chosen"], "chosen", prompt), "chosen")
    rejected = check_messages(_as_messages(obj["rejected"], "rejected", prompt), "rejected")
    if chosen[:-1] != rejected[:-1]:
        raise BadRecord("'chosen' and 'rejected' must share the same prompt (all messages but the last)")
    if not chosen[-1]["content"].strip() or not rejected[-1]["content"].strip():
        return None, "empty_answer"
    if chosen[-1]["content"] == rejected[-1]["content"]:
        return None, "identical_answers"
    return {"chosen": chosen, "rejected": rejected}, None


# ---------------------------------------------------------------------------------------------
# Writing: atomic (model/files.py), with a summary of everything read.


def check_paths(in_path, out_path, *also_written):
    """Refuse a run that could not work or would destroy raw data: the input must be a file, and no file
    written (the output, its bad-lines list) may be the input itself, whatever links lead there."""
    if os.path.isdir(in_path):
        raise DataError(f"{in_path}: is a folder; --input must be a data file")
    if not os.path.isfile(in_path):
        raise DataError(f"{in_path}: input file not found")
    if os.path.isdir(out_path):
        raise DataError(f"{out_path}: is a folder; --output must be a file path (e.g. {out_path}/out.jsonl)")
    for target in (out_path, *also_written):
        if os.path.realpath(target) == os.path.realpath(in_path) or (
                os.path.exists(target) and os.path.samefile(target, in_path)):
            raise DataError(f"{target}: is the input file {in_path}; writing it would destroy the raw data, "
                            "choose another --output")


def surrogate_field(obj, path=""):
    """Which field of a record holds a lone UTF-16 surrogate (a JSON escape such as \\ud800, half of a
    character, which no file can hold as text): 'text', 'conversations[1].content', ...; None if none does."""
    if isinstance(obj, str):
        return path or "the record" if re.search("[\ud800-\udfff]", obj) else None
    children = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in children:
        found = surrogate_field(value, f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else key)
        if found:
            return found
    return None


def convert(in_path, out_path, make_record, *, skip_bad=False, max_line_bytes=DEFAULT_MAX_LINE_BYTES,
            csv_header=None, progress=None, allow_empty=False):
    """Stream in_path through make_record into out_path; returns the counts (a Counter).

    Bad records stop the run with DataError('IN:LINE: problem') unless skip_bad, in which case
    their line numbers go to OUT.bad_lines.txt. make_record returns (record, None) or
    (None, drop_reason); a BadRecord it raises is a bad record. An output with no records is an
    error (nothing is written) unless allow_empty.
    """
    bad_path = f"{out_path}.bad_lines.txt"
    check_paths(in_path, out_path, temp_path(out_path), *([bad_path] if skip_bad else []))
    stats = Counter()
    # progress=None: a bar only on a terminal; False: never
    bar = tqdm(total=None if is_gzip(in_path) else os.path.getsize(in_path), unit="B", unit_scale=True,
               desc=os.path.basename(in_path),
               disable=True if progress is False else None, mininterval=1.0)
    bad_lines = []
    try:
        with atomic_open(out_path) as out:
            writer = csv.writer(out, lineterminator="\n") if csv_header else None
            if writer:
                writer.writerow(csv_header)
            for line, obj, problem in iter_records(in_path, stats, max_line_bytes, bar, skip_bad):
                stats["read"] += 1
                if problem is None:
                    try:
                        record, dropped = make_record(obj)
                    except BadRecord as e:
                        problem = e.problem
                if problem is None and not dropped:
                    try:  # a failed encode writes nothing: the text layer encodes a whole write at once
                        if writer:
                            writer.writerow(record)
                        else:
                            out.write(json.dumps(record, ensure_ascii=False) + "\n")
                    except UnicodeEncodeError:
                        problem = (f"invalid Unicode in field '{surrogate_field(obj) or '(a key)'}': a lone "
                                   "surrogate, i.e. a JSON escape such as \\ud800 that is half of a character")
                if problem is not None:
                    if not skip_bad:
                        raise DataError(f"{in_path}:{line}: {problem}")
                    stats["malformed"] += 1
                    bad_lines.append(f"{line}\t{problem}\n")
                    continue
                if dropped:
                    stats[f"dropped:{dropped}"] += 1
                    continue
                stats["kept"] += 1
                if stats["read"] % 4096 == 0:
                    bar.set_postfix(kept=stats["kept"], dropped=stats["read"] - stats["kept"], refresh=False)
            if not stats["kept"] and not allow_empty:
                raise DataError(f"{in_path}: no record kept ({describe_counts(stats)}); nothing was written. "
                                f"Pass --allow-empty to write an empty {out_path} anyway")
    except BadRecord as e:  # a fatal problem in the file's structure (JSON arrays)
        raise DataError(f"{in_path}:{e.line}: {e.problem}") from None
    except OSError as e:  # the output folder is unwritable or full
        raise DataError(f"{out_path}: cannot write: {e.strerror or e}") from None
    finally:
        bar.close()
    if skip_bad:
        with atomic_open(bad_path) as f:
            f.writelines(bad_lines)
    elif os.path.exists(bad_path):
        os.remove(bad_path)  # a stale list from an earlier run would describe another output
    return stats


def dropped_counts(stats):
    return {k.split(":", 1)[1]: v for k, v in sorted(stats.items()) if k.startswith("dropped:")}


def describe_counts(stats):
    """'read 3 records, 3 dropped (longer_than_512_chars: 3)' in one line."""
    dropped = dropped_counts(stats)
    parts = [f"read {stats['read']} records"]
    if dropped:
        parts.append(f"{sum(dropped.values())} dropped ({', '.join(f'{k}: {v}' for k, v in dropped.items())})")
    if stats["malformed"]:
        parts.append(f"{stats['malformed']} malformed")
    return ", ".join(parts)


def summary(stats, out_path, skip_bad):
    """The human-readable end-of-run report: nothing read is left unaccounted for."""
    dropped = dropped_counts(stats)
    lines = [f"read {stats['read']} records ({stats['empty_lines']} blank lines skipped)",
             f"kept {stats['kept']} -> {out_path}",
             f"dropped {sum(dropped.values())}" + "".join(f"\n  {k}: {v}" for k, v in dropped.items())]
    if skip_bad:
        lines.append(f"malformed {stats['malformed']} (line numbers in {out_path}.bad_lines.txt)")
    return "\n".join(lines)
