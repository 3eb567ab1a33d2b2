"""Datasets for pretraining, SFT and DPO that read lazily through an offset index, so memory never grows with the corpus."""

import ast
import csv
import io
import json
import os
import warnings

import numpy as np
import torch
from torch.utils.data import Dataset

from .files import WriteError, atomic_open, atomic_write
from .chat_format import IGNORE, Encoder, FormatError, check_tools
from .convert import BOM, DataError, check_messages, BadRecord, missing_file_error
from .LMConfig import PAD_ID


def format_mcq(question, options):
    """The user message of a multiple-choice question (SFT data and C-Eval scoring use the same)."""
    lines = [question.strip()] + [f"{letter}. {str(opt).strip()}" for letter, opt in zip("ABCD", options)]
    return "\n".join(lines + ["请只回答选项字母。"])


def special_ids(tokenizer):
    """The ids of <s> and </s>, which every format here is built from."""
    vocab = tokenizer.get_vocab()
    if "<s>" not in vocab or "</s>" not in vocab:
        raise ValueError("the tokenizer needs the special tokens <s> and </s>")
    return vocab["<s>"], vocab["</s>"]


class ChatEncoder(Encoder):
    """Token ids and loss labels of a chat (the format and its targets: model/chat_format.py)."""

    def __call__(self, messages, max_length, last_only=False, **options):
        """(ids, labels) cut at max_length; last_only: earlier answers count as prompt (DPO)."""
        return super().__call__(messages, max_length, last_only=last_only, **options)


# ---------------------------------------------------------------------------------------------
# The offset index: record boundaries of a JSONL or CSV file, cached next to it as FILE.idx.

_MAGIC = 0x3130584449444D4D  # b"MMDIDX01" read as a little-endian int64
_HEADER = 8  # int64 fields: magic, data size, data mtime_ns, records, csv flag, data inode, 2 spare


def _scan_jsonl(f, size, emit):
    """Emit the start offset of every non-blank line, reading 16 MiB at a time (vectorised)."""
    start = len(BOM) if f.read(3) == BOM else 0
    f.seek(start)
    base, cur, last_byte = start, start, b""
    while True:
        chunk = f.read(16 << 20)
        if not chunk:
            break
        arr = np.frombuffer(chunk, dtype=np.uint8)
        nl = np.flatnonzero(arr == 10)
        if len(nl):
            starts = np.concatenate(([cur], nl[:-1] + base + 1))
            ends = nl + base
            before = np.where(nl > 0, arr[np.maximum(nl - 1, 0)], last_byte[0] if last_byte else 0)
            blank = (ends == starts) | ((ends - starts == 1) & (before == 13))
            emit(starts[~blank])
            cur = int(ends[-1]) + 1
        base += len(chunk)
        last_byte = chunk[-1:]
    if cur < size:  # a last line without a final newline, unless it is blank
        f.seek(cur)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            if chunk.strip():
                emit(np.array([cur]))
                break


def _scan_csv(f, size, emit):
    """Emit the start offset of every CSV record after the header; quoted fields may hold newlines."""
    start = len(BOM) if f.read(3) == BOM else 0
    f.seek(start)
    pos, quotes, rec_start, header_done, batch = start, 0, start, False, []
    for line in iter(f.readline, b""):
        quotes += line.count(b'"')
        pos += len(line)
        if quotes % 2:  # inside a quoted field: the record continues on the next line
            continue
        if header_done and line.strip(b"\r\n"):
            batch.append(rec_start)
            if len(batch) >= 65536:
                emit(np.array(batch))
                batch = []
        header_done, quotes, rec_start = True, 0, pos
    if batch:
        emit(np.array(batch))


class RecordIndex:
    """Byte offsets of the records of one file, memory-mapped from a sidecar FILE.idx.

    The sidecar is rebuilt when the data file's size, mtime or inode changes; if it cannot be written
    (read-only data directory) the offsets are kept in memory instead (8 bytes per record).
    """

    def __init__(self, path, kind):
        if not os.path.isfile(path):
            raise missing_file_error(path, kind)
        self.path, self.is_csv = path, path.endswith(".csv")
        self.idx_path = path + ".idx"
        st = os.stat(path)
        self.stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
        self.offsets = self._load() if os.path.exists(self.idx_path) else None
        if self.offsets is None:
            self.offsets = self._build()
        self._f, self._pid = None, None

    def _load(self):
        head = np.fromfile(self.idx_path, dtype="<i8", count=_HEADER)
        if len(head) < _HEADER or head[0] != _MAGIC or tuple(head[[1, 2, 5]]) != self.stamp or head[4] != self.is_csv:
            return None
        if os.path.getsize(self.idx_path) != (_HEADER + int(head[3]) + 1) * 8:
            return None  # cut short: rebuild
        return np.memmap(self.idx_path, dtype="<i8", mode="r", offset=_HEADER * 8, shape=(int(head[3]) + 1,))

    def _build(self):
        size = self.stamp[0]
        n = 0

        def emit(starts):
            nonlocal n
            out.write(np.asarray(starts, dtype="<i8").tobytes())
            n += len(starts)

        try:
            with atomic_open(self.idx_path, "wb") as out:
                out.write(np.zeros(_HEADER, dtype="<i8").tobytes())
                with open(self.path, "rb") as f:
                    (_scan_csv if self.is_csv else _scan_jsonl)(f, size, emit)
                out.write(np.array([size], dtype="<i8").tobytes())  # end sentinel: record i is [o[i], o[i+1])
                out.seek(0)
                size, mtime, inode = self.stamp
                out.write(np.array([_MAGIC, size, mtime, n, self.is_csv, inode, 0, 0], dtype="<i8").tobytes())
        except WriteError:
            warnings.warn(f"cannot write {self.idx_path}; keeping the offset index in memory")
            parts = []
            with open(self.path, "rb") as f:
                (_scan_csv if self.is_csv else _scan_jsonl)(f, size, parts.append)
            return np.concatenate(parts + [np.array([size])]).astype("<i8")
        return self._load()

    def __len__(self):
        return len(self.offsets) - 1

    def read(self, i):
        """The raw bytes of record i (DataLoader workers each open their own file handle)."""
        if self._pid != os.getpid():
            self._f, self._pid = open(self.path, "rb"), os.getpid()
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        self._f.seek(start)
        return self._f.read(end - start)

    def line_of(self, i):
        """1-based line number of record i, for error messages (counts newlines: slow, rare)."""
        target, count, pos = int(self.offsets[i]), 1, 0
        with open(self.path, "rb") as f:
            while pos < target:
                chunk = f.read(min(16 << 20, target - pos))
                count += chunk.count(b"\n")
                pos += len(chunk)
        return count

    def header(self):
        """The CSV header row (column names)."""
        with open(self.path, "rb") as f:
            first = f.readline().removeprefix(BOM)
        return next(csv.reader(io.StringIO(first.decode("utf-8"))))

    def __getstate__(self):  # pickled into spawned workers: re-map, don't copy the offsets
        state = dict(self.__dict__, _f=None, _pid=None)
        if isinstance(self.offsets, np.memmap):
            state["offsets"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.offsets is None:
            self.offsets = self._load()
            if self.offsets is None:
                raise DataError(f"{self.path}: changed while in use; restart to re-index it")


class _JsonlDataset(Dataset):
    """Shared lazy reading: record i is parsed only when item i is asked for."""

    kind = "pretrain"

    def __init__(self, path, tokenizer, max_length=512):
        self.path, self.tokenizer, self.max_length = str(path), tokenizer, max_length
        self.index = RecordIndex(self.path, self.kind)

    def __len__(self):
        return len(self.index)

    def error(self, i, problem):
        return DataError(f"{self.path}:{self.index.line_of(i)}: {problem}")

    def record(self, i):
        raw = self.index.read(i)
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self.error(i, f"unreadable record ({e.__class__.__name__}: {e})") from None
        if not isinstance(obj, dict):
            raise self.error(i, "expected a JSON object")
        if b"\\u" in raw:  # an escape may be half a character (a lone surrogate), which no tokenizer takes
            try:
                json.dumps(obj, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                raise self.error(i, "invalid Unicode: a lone surrogate escape such as \\ud800 "
                                    "(half of a character)") from None
        return obj

    def chat(self, i, messages, name, last="assistant"):
        """The chat of record i, checked (see convert.check_messages); a problem names the file and line."""
        try:
            return check_messages(messages, name, last)
        except BadRecord as e:
            raise self.error(i, e.problem) from None


def _tensors(**lists):
    return {k: torch.tensor(v, dtype=torch.long) for k, v in lists.items()}


class PretrainDataset(_JsonlDataset):
    """JSONL {"text": ...}; item = <s> text </s>, cut only at max_length; labels = input_ids (unshifted)."""

    kind = "pretrain"

    def __init__(self, path, tokenizer, max_length=512):
        super().__init__(path, tokenizer, max_length)
        self.bos, self.eos = special_ids(tokenizer)

    def text(self, i):
        text = self.record(i).get("text")
        if not isinstance(text, str):
            raise self.error(i, "missing or non-string field 'text'")
        return text

    def __getitem__(self, i):
        ids = [self.bos] + self.tokenizer.encode(self.text(i), add_special_tokens=False) + [self.eos]
        return _tensors(input_ids=ids[:self.max_length], labels=ids[:self.max_length])


class PackedPretrainDataset(Dataset):
    """Whole documents packed into rows of max_length tokens, <s>doc</s><s>doc</s>... then padding, so a step
    carries real tokens instead of padding. A document is never split across rows; one longer than a row is cut
    at max_length (as the unpacked dataset cuts it). Documents are tokenized once into a memory-mapped cache
    beside the file (FILE.tok, rebuilt when the file or the tokenizer changes), so a step reads token ids
    instead of tokenizing text, and memory does not grow with the corpus."""

    def __init__(self, path, tokenizer, max_length=512):
        self.docs = PretrainDataset(path, tokenizer, max_length)
        self.path, self.max_length = self.docs.path, max_length
        self.ids, self.offsets = document_tokens(self.docs)
        lengths = np.minimum(np.diff(self.offsets), max_length)
        self.row_starts, self.row_docs = pack_rows(lengths, max_length)

    def __len__(self):
        return len(self.row_starts) - 1

    def documents(self, i):
        """The document indices of row i."""
        return self.row_docs[self.row_starts[i]:self.row_starts[i + 1]].tolist()

    def __getitem__(self, i):
        parts = [self.ids[self.offsets[d]:self.offsets[d + 1]][:self.max_length] for d in self.documents(i)]
        ids = torch.from_numpy(np.concatenate(parts).astype(np.int64))
        return {"input_ids": ids, "labels": ids}


def pack_rows(lengths, max_length, window=8192):
    """Best-fit-decreasing packing of each window of documents (file order kept between windows): rows as
    (start of each row in row_docs, row_docs), the end sentinel included."""
    import bisect
    row_starts, row_docs = [0], []
    for w in range(0, len(lengths), window):
        rows, free = [], []  # free: sorted (room left, row number)
        for d in sorted(range(w, min(w + window, len(lengths))), key=lambda d: (-lengths[d], d)):
            n = int(lengths[d])
            at = bisect.bisect_left(free, (n, -1))
            if at < len(free):
                room, r = free.pop(at)
            else:
                room, r = max_length, len(rows)
                rows.append([])
            rows[r].append(d)
            if room - n > 0:
                bisect.insort(free, (room - n, r))
        for docs in rows:
            row_docs += sorted(docs)
            row_starts.append(len(row_docs))
    return np.asarray(row_starts, dtype=np.int64), np.asarray(row_docs, dtype=np.int64)


_TOK_MAGIC = 0x31304B4F54444D4D  # b"MMDTOK01" read as a little-endian int64


def document_tokens(docs):
    """Token ids of every document, <s> and </s> included: (ids, offsets), memory-mapped from FILE.tok, whose
    header records the data file's size, mtime and inode and a hash of the tokenizer's vocabulary."""
    import hashlib
    vocab = json.dumps(sorted(docs.tokenizer.get_vocab().items()), ensure_ascii=False).encode("utf-8")
    wide = len(docs.tokenizer) > 65535
    stamp = [*docs.index.stamp, int.from_bytes(hashlib.sha256(vocab).digest()[:7], "little"), int(wide)]
    cache = docs.path + ".tok"
    dtype = np.uint32 if wide else np.uint16
    loaded = _load_tokens(cache, stamp, len(docs), dtype)
    if loaded is not None:
        return loaded

    def write(tmp):
        offsets = [0]
        with open(tmp, "wb") as f:
            f.write(np.zeros(8, dtype="<i8").tobytes())
            for ids in _encoded(docs):
                f.write(np.asarray(ids, dtype=dtype).tobytes())
                offsets.append(offsets[-1] + len(ids))
            f.write(np.asarray(offsets, dtype="<i8").tobytes())
            f.seek(0)
            f.write(np.asarray([_TOK_MAGIC, *stamp, len(docs), 0], dtype="<i8").tobytes())
    try:
        atomic_write(cache, write)
    except OSError:
        warnings.warn(f"cannot write {cache}; documents are tokenized into memory on every start")
        encoded = list(_encoded(docs))
        offsets = np.cumsum([0] + [len(e) for e in encoded])
        return np.asarray([t for e in encoded for t in e], dtype=dtype), offsets
    return _load_tokens(cache, stamp, len(docs), dtype)


def _encoded(docs, chunk=4096):
    """Each document's token ids with <s> and </s>, tokenized a chunk of documents at a time."""
    for start in range(0, len(docs), chunk):
        texts = [docs.text(i) for i in range(start, min(start + chunk, len(docs)))]
        for ids in docs.tokenizer(texts, add_special_tokens=False)["input_ids"]:
            yield [docs.bos, *ids, docs.eos]


def _load_tokens(cache, stamp, n_docs, dtype):
    if not os.path.exists(cache) or os.path.getsize(cache) < 64:
        return None
    head = np.fromfile(cache, dtype="<i8", count=8)
    if head[0] != _TOK_MAGIC or head[1:6].tolist() != stamp or head[6] != n_docs:
        return None
    size = os.path.getsize(cache)
    offsets = np.memmap(cache, dtype="<i8", mode="r", offset=size - 8 * (n_docs + 1), shape=(n_docs + 1,))
    n_tokens = int(offsets[-1])
    if 64 + n_tokens * np.dtype(dtype).itemsize + 8 * (n_docs + 1) != size:
        return None  # cut short: rebuild
    return np.memmap(cache, dtype=dtype, mode="r", offset=64, shape=(n_tokens,)), offsets


def _parse_history(text):
    """The CSV history column: JSON, or the Python repr the seed's pandas export wrote."""
    if not text.strip():
        return []
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return ast.literal_eval(text)


class _ChatDataset(_JsonlDataset):
    """A dataset of chats, encoded in the chat format."""

    def __init__(self, path, tokenizer, max_length=512):
        super().__init__(path, tokenizer, max_length)
        self.encoder = ChatEncoder(tokenizer)


class SFTDataset(_ChatDataset):
    """Chats from JSONL {"conversations": [...], optional "tools": [...], "enable_thinking": bool} or CSV (history, q,
    a); loss on assistant tokens only (tool calls and thoughts included)."""

    kind = "sft"

    def __init__(self, path, tokenizer, max_length=512):
        super().__init__(path, tokenizer, max_length)
        if self.index.is_csv:
            self.columns = self.index.header()
            missing = {"q", "a"} - set(self.columns)
            if missing:
                raise DataError(f"{self.path}:1: CSV header lacks column(s) {', '.join(sorted(missing))}")

    def messages(self, i):
        if self.index.is_csv:
            try:
                row = dict(zip(self.columns, next(csv.reader(io.StringIO(self.index.read(i).decode("utf-8"))))))
                pairs = _parse_history(row.get("history") or "")
                msgs = []
                for q, a in list(pairs) + [(row["q"], row["a"])]:
                    msgs += [{"role": "user", "content": str(q)}, {"role": "assistant", "content": str(a)}]
                return msgs
            except (UnicodeDecodeError, ValueError, SyntaxError, KeyError, TypeError, StopIteration) as e:
                raise self.error(i, f"unreadable CSV record ({e.__class__.__name__}: {e})") from None
        return self.chat(i, self.record(i).get("conversations"), "conversations")

    def options(self, i):
        """A JSONL row's chat options: the tools it offers and its thinking switch (model/chat_format.py)."""
        if self.index.is_csv:
            return {}
        row = self.record(i)
        try:
            tools = check_tools(row.get("tools"), "tools")
        except FormatError as e:
            raise self.error(i, str(e)) from None
        thinking = row.get("enable_thinking")
        if thinking is not None and not isinstance(thinking, bool):
            raise self.error(i, "field 'enable_thinking' must be true, false or null")
        return {"tools": tools, "enable_thinking": thinking}

    def __getitem__(self, i):
        ids, labels = self.encoder(self.messages(i), self.max_length, **self.options(i))
        return _tensors(input_ids=ids, labels=labels)


class DPODataset(_ChatDataset):
    """JSONL {"chosen": [msgs], "rejected": [msgs]} sharing a prompt; labels only on the final answer."""

    kind = "dpo"

    def __getitem__(self, i):
        obj = self.record(i)
        item = {}
        for side in ("chosen", "rejected"):
            msgs = self.chat(i, obj.get(side), side)
            ids, labels = self.encoder(msgs, self.max_length, last_only=True)
            item.update(_tensors(**{f"{side}_input_ids": ids, f"{side}_labels": labels}))
        return item


class PromptDataset(_ChatDataset):
    """JSONL {"conversations": [..., user], "answer": ...} for RL: item = the prompt's token ids (ending with the
    assistant header) and the row itself, which the reward checks the model's answers against."""

    kind = "grpo"

    def __getitem__(self, i):
        row = self.record(i)
        msgs = self.chat(i, row.get("conversations"), "conversations", last="user")
        if "answer" not in row:
            raise self.error(i, "missing field 'answer' (what the reward checks the model's answer against)")
        ids, _ = self.encoder(msgs, self.max_length)
        if len(ids) >= self.max_length:
            raise self.error(i, f"the prompt fills all {self.max_length} tokens of --max_seq_len: no room to answer")
        return {"prompt_ids": ids, "row": row}


def collate_pad(batch):
    """Right-pad every *input_ids (with PAD_ID) and *labels (with IGNORE) to the batch's longest; add masks."""
    out = {}
    for key in batch[0]:
        values = [item[key] for item in batch]
        if key.endswith("input_ids") or key.endswith("labels"):
            pad = PAD_ID if key.endswith("input_ids") else IGNORE
            width = max(len(v) for v in values)
            padded = torch.full((len(values), width), pad, dtype=torch.long)
            for row, v in enumerate(values):
                padded[row, :len(v)] = v
            out[key] = padded
            if key.endswith("input_ids"):
                mask = torch.zeros((len(values), width), dtype=torch.long)
                for row, v in enumerate(values):
                    mask[row, :len(v)] = 1
                out[key[:-len("input_ids")] + "attention_mask"] = mask
        elif isinstance(values[0], torch.Tensor) and all(v.shape == values[0].shape for v in values):
            out[key] = torch.stack(values)
        else:
            out[key] = values
    return out
