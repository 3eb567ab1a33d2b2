"""Reading raw dataset files one record at a time: encoding and gzip sniffing, JSONL, streamed JSON arrays."""

import codecs
import gzip
import json
import os
import re

from .errors import DataError

BOM = b"\xef\xbb\xbf"
DEFAULT_MAX_LINE_BYTES = 4 << 20  # 4 MiB: far above any sane record, far below a memory problem


class BadRecord(Exception):
    """One input record is unusable; `line` is set once known (fatal unless --skip-bad)."""

    def __init__(self, problem, line=None):
        super().__init__(problem)
        self.problem, self.line = problem, line


# Readers yield (line, record, problem) triples, one record in memory at a time.
GZIP_MAGIC = b"\x1f\x8b"


def sniff_encoding(raw):
    """The encoding of bytes that are text but not UTF-8: "UTF-16" (a byte-order mark, or ASCII with every other
    byte zero) or "GBK" (Chinese Windows text, read as its superset GB18030); None when neither fits."""
    zeros = raw.count(0)  # text in UTF-8 has none; UTF-16 has one in every ASCII character, all at odd or even places
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff") or (zeros > len(raw) // 16 and
                                                  max(raw[0::2].count(0), raw[1::2].count(0)) > 0.9 * zeros):
        return "UTF-16"
    *whole, last = raw.split(b"\n")
    bad = [not is_utf8(line) for line in whole if not line.isascii()]
    if not last.isascii():  # a sample may end inside a character
        bad.append(not is_utf8(last, final=False))
    if sum(bad) * 2 <= len(bad):
        return None  # UTF-8 text, perhaps with a few bad lines: those are named one by one
    for end in (len(raw), len(raw) - 1):  # a sample may end inside a two-byte character
        try:
            text = raw[:end].decode("gb18030")
        except UnicodeDecodeError:
            continue
        return "GBK" if re.search("[\u4e00-\u9fff]", text) else None
    return None


def is_utf8(raw, final=True):
    try:
        codecs.getincrementaldecoder("utf-8")().decode(raw, final=final)
        return True
    except UnicodeDecodeError:
        return False


def encoding_advice(path, encoding, compressed=False):
    stem, dot, ext = os.path.basename(path).partition(".")
    convert = f"iconv -f {encoding} -t UTF-8 {path}"
    if compressed:  # iconv must see the text, not the gzip stream
        convert = f"gzip -dc {path} | iconv -f {encoding} -t UTF-8 | gzip"
    return f"{path}: the file is {encoding} text, not UTF-8; convert it first, e.g. {convert} > {stem}.utf8{dot}{ext}"


def is_gzip(path):
    with open(path, "rb") as f:
        return f.read(2) == GZIP_MAGIC


def open_input(path):
    """A raw input file for reading bytes: gzip-compressed files (large corpora ship as .jsonl.gz) are read
    through gzip whatever their name. A file in UTF-16 or GBK is a DataError naming the encoding."""
    compressed = is_gzip(path)
    f = gzip.open(path, "rb") if compressed else open(path, "rb")
    try:
        encoding = sniff_encoding(f.peek(1 << 16)[:1 << 16])
    except (OSError, EOFError) as e:  # a damaged or truncated gzip file
        f.close()
        raise DataError(f"{path}: cannot read it as gzip ({e})") from None
    if encoding:
        f.close()
        raise DataError(encoding_advice(path, encoding, compressed))
    return f


def iter_jsonl(path, stats, max_line_bytes=DEFAULT_MAX_LINE_BYTES, progress=None):
    """Yield (line_no, obj, problem) for each non-blank line; blank lines are only counted."""
    with open_input(path) as f:
        line_no = 0
        while True:
            raw = f.readline(max_line_bytes + 1)
            if not raw:
                return
            line_no += 1
            nbytes = len(raw)
            if nbytes > max_line_bytes and not raw.endswith(b"\n"):
                while raw and not raw.endswith(b"\n"):  # drain the monster line piece by piece
                    raw = f.readline(1 << 20)
                    nbytes += len(raw)
                if progress is not None:
                    progress.update(nbytes)
                yield line_no, None, f"line longer than --max_line_bytes={max_line_bytes}"
                continue
            if progress is not None:
                progress.update(nbytes)
            if line_no == 1 and raw.startswith(BOM):
                raw = raw[len(BOM):]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield line_no, None, f"invalid UTF-8 at byte {e.start}"
                continue
            if not text.strip():
                stats["empty_lines"] += 1
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                yield line_no, None, f"malformed JSON ({e.msg}, column {e.colno})"
                continue
            if not isinstance(obj, dict):
                yield line_no, None, f"expected a JSON object, got {type(obj).__name__}"
                continue
            yield line_no, obj, None


_DECODER = json.JSONDecoder()
_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of undecodable bytes
_WS = re.compile(r"[ \t\r\n]*")


class _ArrayReader:
    """A window over a JSON text that knows the line number of its read position."""

    def __init__(self, f, progress):
        self.f, self.progress = f, progress
        self.dec = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
        self.buf, self.pos, self.line, self.eof = "", 0, 1, False

    def more(self):
        if self.eof:
            return False
        chunk = self.f.read(1 << 20)
        if self.progress is not None:
            self.progress.update(len(chunk))
        self.eof = not chunk
        self.buf = self.buf[self.pos:] + self.dec.decode(chunk, final=self.eof)
        self.pos = 0
        return not self.eof

    def advance(self, new_pos):
        self.line += self.buf.count("\n", self.pos, new_pos)
        self.pos = new_pos

    def peek(self):
        """The next non-blank character ('' at the end of the file)."""
        while True:
            self.advance(_WS.match(self.buf, self.pos).end())
            if self.pos < len(self.buf) or not self.more():
                return self.buf[self.pos:self.pos + 1]

    def value(self, max_bytes):
        """Decode the JSON value at the position: (obj, None) or (None, problem)."""
        while True:
            try:
                obj, end = _DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                # near the end of the window the value may just be cut by the chunk boundary
                truncated = e.msg.startswith("Unterminated") or len(self.buf) - e.pos < 16
                if len(self.buf) - self.pos > max_bytes:
                    return None, f"record longer than --max_line_bytes={max_bytes}, or malformed JSON"
                if truncated and self.more():
                    continue
                return None, f"malformed JSON ({e.msg}, line {self.line + self.buf.count(chr(10), self.pos, e.pos)})"
            bad_bytes = _NOT_UTF8.search(self.buf, self.pos, end)
            self.advance(end)
            return (None, "invalid UTF-8 inside this record") if bad_bytes else (obj, None)

    def resync(self, indent):
        """Move to the next line that opens an element at `indent`; False if there is none."""
        pattern = re.compile("\n" + re.escape(indent) + r"\{")
        start = self.pos + 1
        while True:
            m = pattern.search(self.buf, start)
            if m:
                self.advance(m.start() + 1 + len(indent))
                return True
            if self.eof:
                self.advance(len(self.buf))
                return False
            keep = len(indent) + 2  # a match may straddle the chunk boundary
            self.advance(max(self.pos, len(self.buf) - keep))
            self.more()
            start = self.pos


def iter_json_array(path, stats, max_line_bytes=DEFAULT_MAX_LINE_BYTES, progress=None, skip_bad=False):
    """Yield (line_no, obj, problem) for each element of a top-level JSON array, read incrementally.

    A syntax error can be skipped only in a pretty-printed array (one element per indented block):
    reading resumes at the next line opening an element at the first element's indentation.
    In a one-line array it is always fatal (raised as BadRecord).
    """
    with open_input(path) as f:
        r = _ArrayReader(f, progress)
        r.more()
        if r.buf.startswith("\ufeff"):
            r.pos = 1
        if r.peek() != "[":
            raise BadRecord("expected a JSON array starting with '['", r.line)
        r.advance(r.pos + 1)
        indent, expect_comma, first = None, False, True
        while True:
            ch = r.peek()
            if ch == "]":
                r.advance(r.pos + 1)
                if r.peek():
                    raise BadRecord("unexpected data after the end of the JSON array", r.line)
                return
            if ch == "":
                raise BadRecord("the file ends inside the JSON array (missing ']')", r.line)
            if expect_comma:
                if ch != ",":
                    raise BadRecord(f"malformed JSON (expected ',' or ']' between elements, found {ch!r})", r.line)
                r.advance(r.pos + 1)
                if r.peek() in ("", "]"):
                    raise BadRecord("malformed JSON (trailing comma or missing element)", r.line)
            if first:  # elements on lines of their own make a syntax error skippable
                first = False
                line_start = r.buf.rfind("\n", 0, r.pos) + 1
                head = r.buf[line_start:r.pos]
                indent = head if r.line > 1 and not head.strip() else None
            line = r.line
            obj, problem = r.value(max_line_bytes)
            expect_comma = True
            if problem is None and not isinstance(obj, dict):
                problem = f"expected a JSON object, got {type(obj).__name__}"
            if problem is None:
                yield line, obj, None
                continue
            if problem.startswith(("malformed", "record longer")):
                if not skip_bad or indent is None:
                    raise BadRecord(problem, line)
                yield line, None, problem
                if not r.resync(indent):
                    return
                expect_comma = False
                continue
            yield line, None, problem


def looks_like_json_array(path):
    """True when the file's first non-blank character is '[' (a .json dump rather than JSONL)."""
    if str(path).removesuffix(".gz").endswith(".jsonl"):
        return False
    with open_input(path) as f:
        head = f.read(1 << 16)
    return head.removeprefix(BOM).lstrip()[:1] == b"["


def iter_records(path, stats, max_line_bytes=DEFAULT_MAX_LINE_BYTES, progress=None, skip_bad=False):
    """Records of a JSONL file or of a JSON array file, whichever `path` is."""
    if looks_like_json_array(path):
        return iter_json_array(path, stats, max_line_bytes, progress, skip_bad)
    return iter_jsonl(path, stats, max_line_bytes, progress)
