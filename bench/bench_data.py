"""Data loading against what training consumes: the pretraining loader must outrun the model (>= 20x) in flat
memory; and the engine's own loader (Trainer._loader's DataLoader and collate step) on SFT and DPO chats, in the
training process (--num_workers 0) against worker processes.

    python bench/bench_data.py                                # 2 GB pretraining corpus, then SFT and DPO loaders
    python bench/bench_data.py --engine_workers 0,2,4 --chats 20000"""
import argparse
import json
import os
import random
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one text per call: no pool, and no fork warning

from common import describe_machine, load_average, make_step  # noqa: E402
from model.LMConfig import LMConfig  # noqa: E402
from model.model import Transformer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TARGET_RATIO, TARGET_RSS_MB = 20, 300


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=2.0, help="size of the synthetic corpus in GB (1e9 bytes)")
    p.add_argument("--corpus", default=None, help="reuse this JSONL {'text': ...} file instead of generating one")
    p.add_argument("--fresh_index", action="store_true", help="delete CORPUS.idx first, so the index build is timed")
    p.add_argument("--keep", action="store_true", help="keep the generated corpus (and its .idx) and print its path")
    p.add_argument("--tmpdir", default=None, help="where the generated corpus goes (default: the system temp dir)")
    p.add_argument("--tokenizer", default=str(ROOT / "model" / "minimind_tokenizer"))
    p.add_argument("--max_seq_len", type=int, default=512)
    p.add_argument("--batch", type=int, default=8, help="loader batch size (training's micro-batch)")
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--tokens", type=int, default=20_000_000, help="stop loading after this many tokens ...")
    p.add_argument("--seconds", type=float, default=30.0, help="... or after this many seconds")
    p.add_argument("--train_batch", type=int, default=8)
    p.add_argument("--train_seq", type=int, default=512)
    p.add_argument("--train_steps", type=int, default=3, help="timed training steps (after one warmup step)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--chats", type=int, default=4000, help="synthetic SFT chats and DPO pairs for the engine loader")
    p.add_argument("--engine_workers", default="0,2", help="comma list of --num_workers for the engine loader")
    p.add_argument("--engine_batch", type=int, default=32, help="micro-batch of the engine loader (SFT's default)")
    p.add_argument("--engine_seconds", type=float, default=4.0, help="time per engine loader measurement")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- the corpus

ZH_SUBJECTS = ["长江", "黄河", "泰山", "珠穆朗玛峰", "大熊猫", "这座古城", "那位科学家", "小明的老师", "图书馆", "一群学生",
               "这家工厂", "古代诗人", "天文台", "村里的老人", "新建的铁路"]
ZH_VERBS = ["位于", "孕育了", "吸引了", "研究了", "记录了", "改变了", "连接着", "见证了", "保护着", "描写了"]
ZH_OBJECTS = ["千年的文明", "无数的游客", "万有引力的规律", "山林里的竹子", "东海之滨的港口", "一本厚厚的日记",
              "城市的交通", "季节的变化", "古老的传说", "清晨的薄雾", "夜空中的星星", "田野和河流"]
ZH_TAILS = ["，人们至今仍在讨论", "，这一点写进了课本", "，每年都有新的发现", "，吸引了各地的研究者", "，故事一代代流传下来", ""]
EN_SUBJECTS = ["The river", "A young engineer", "The old library", "Every student", "The mountain village",
               "A small robot", "The research team", "Her grandfather", "The night train", "This tiny model"]
EN_VERBS = ["carries", "remembers", "measures", "describes", "connects", "protects", "studies", "changes"]
EN_OBJECTS = ["the history of the valley", "a map of the stars", "the sound of the rain", "twelve kinds of tea",
              "the first snow of winter", "a bridge across the bay", "the rules of gravity", "a letter from 1923"]


def sentence_pool(rng, n=4096):
    """Chinese (about 3 in 4) and English sentences with numbers, so documents differ and tokenize like real text."""
    pool = []
    for _ in range(n):
        if rng.random() < 0.75:
            pool.append(f"{rng.choice(ZH_SUBJECTS)}{rng.choice(ZH_VERBS)}{rng.choice(ZH_OBJECTS)}"
                        f"{rng.choice(ZH_TAILS)}，约有{rng.randint(2, 9999)}年。")
        else:
            pool.append(f"{rng.choice(EN_SUBJECTS)} {rng.choice(EN_VERBS)} {rng.choice(EN_OBJECTS)} "
                        f"in {rng.randint(1800, 2030)}. ")
    return pool


def write_corpus(path, n_bytes, seed=0):
    """Stream a deterministic JSONL corpus of documents of 64-512 characters (the seed's filter) until n_bytes."""
    rng = random.Random(seed)
    pool = sentence_pool(rng)
    written, n_docs, lines = 0, 0, []
    with open(path, "wb") as f:
        while written < n_bytes:
            for _ in range(4096):
                target, parts, length = rng.randint(64, 512), [f"第{n_docs}篇。"], 0
                while length < target:
                    s = rng.choice(pool)
                    parts.append(s)
                    length += len(s)
                text = "".join(parts)[:512]
                lines.append(json.dumps({"text": text}, ensure_ascii=False))
                n_docs += 1
            chunk = ("\n".join(lines) + "\n").encode()
            f.write(chunk)
            written += len(chunk)
            lines.clear()
    return n_docs, written


# ---------------------------------------------------------------------------------------------- memory

def status_mb(field):
    """VmRSS (now) or VmHWM (peak since start or since reset_peak) of this process, in MB."""
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
        return int(m.group(1)) / 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB; only a peak


def reset_peak():
    """Reset VmHWM to the current RSS (Linux >= 4.0), so corpus generation and imports do not hide the growth."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------- the two rates

def load_rate(args, tokenizer, corpus):
    """Build PretrainDataset (index) and iterate it through a shuffled DataLoader; return the numbers."""
    from model.dataset import PretrainDataset, collate_pad
    idx_path = Path(str(corpus) + ".idx")
    if args.fresh_index and idx_path.exists():
        idx_path.unlink()
    had_index = idx_path.exists()
    can_reset = reset_peak()
    base = status_mb("VmRSS")
    t = time.perf_counter()
    ds = PretrainDataset(corpus, tokenizer, max_length=args.max_seq_len)
    index_s = time.perf_counter() - t
    index_peak = status_mb("VmHWM") - base
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch, shuffle=True, num_workers=args.num_workers,
                                         collate_fn=collate_pad, generator=torch.Generator().manual_seed(0))
    tokens = positions = samples = 0
    first = None
    t = time.perf_counter()
    for batch in loader:
        first = first or time.perf_counter() - t
        tokens += int(batch["attention_mask"].sum())
        positions += batch["input_ids"].numel()
        samples += len(batch["input_ids"])
        if tokens >= args.tokens or time.perf_counter() - t >= args.seconds:
            break
    took = time.perf_counter() - t
    del loader  # joins the workers, so RUSAGE_CHILDREN has their peaks
    return dict(records=len(ds), size_gb=Path(corpus).stat().st_size / 1e9, had_index=had_index, index_s=index_s,
                index_peak=index_peak, can_reset=can_reset, base=base, peak=status_mb("VmHWM") - base,
                now=status_mb("VmRSS") - base, tokens=tokens, positions=positions, samples=samples, seconds=took,
                first=first or 0.0,
                worker_peak=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)


def train_rate(args):
    """Tokens/s of full fp32 training steps of LMConfig() (forward, loss, backward, AdamW): the best step."""
    torch.manual_seed(0)
    config = LMConfig()
    model = Transformer(config).train()
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(3, config.vocab_size, (args.train_batch, args.train_seq))
    step = make_step(model, "fp32", ids)
    step()  # warmup
    times = []
    for _ in range(args.train_steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return n_params, args.train_batch * args.train_seq / min(times), times


# ---------------------------------------------------------------------------------------------- SFT and DPO

def write_chats(folder, n, seed=0):
    """n SFT chats (one to three turns) and n DPO pairs (a shared question, two answers) from the sentence pool."""
    rng = random.Random(seed)
    pool = sentence_pool(rng)

    def turn():
        return ({"role": "user", "content": "".join(rng.choices(pool, k=rng.randint(1, 2)))},
                {"role": "assistant", "content": "".join(rng.choices(pool, k=rng.randint(1, 6)))})
    sft, dpo = Path(folder) / "sft.jsonl", Path(folder) / "dpo.jsonl"
    with open(sft, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"conversations": [m for _ in range(rng.randint(1, 3)) for m in turn()]},
                               ensure_ascii=False) + "\n")
    with open(dpo, "w") as f:
        for _ in range(n):
            question, answer = turn()
            other = {"role": "assistant", "content": "".join(rng.choices(pool, k=rng.randint(1, 6)))}
            f.write(json.dumps({"chosen": [question, answer], "rejected": [question, other]}, ensure_ascii=False)
                    + "\n")
    return sft, dpo


def engine_loader_rate(dataset, count_fn, workers, args):
    """Real tokens/s of the engine's loader: the epoch order's micro-batches through its collate step (padding,
    the counts the step needs), from the first batch on (worker start-up is timed separately)."""
    from model import batching
    from model.dataset import collate_pad
    order = batching.epoch_order(len(dataset), 1337, 0)
    batches = (order[i:i + args.engine_batch].tolist() for i in range(0, len(order), args.engine_batch))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                         collate_fn=batching.HostBatch(collate_pad, count_fn),
                                         prefetch_factor=4 if workers else None)
    t = time.perf_counter()
    it = iter(loader)
    next(it)
    first, tokens, n = time.perf_counter() - t, 0, 0
    t = time.perf_counter()
    for batch in it:
        tokens, n = tokens + batch[batching.HOST_COUNTS][1], n + 1
        if time.perf_counter() - t >= args.engine_seconds:
            break
    took = time.perf_counter() - t
    del it, loader
    return tokens / took, n / took, first


def pair_count(batch):
    """DPO's count: preference pairs (5-dpo_train.py's count_fn)."""
    return batch["chosen_input_ids"].shape[0]


def engine_loaders(args, tokenizer):
    from model import batching
    from model.dataset import DPODataset, SFTDataset
    workers = [int(w) for w in args.engine_workers.split(",")]
    with tempfile.TemporaryDirectory(dir=args.tmpdir) as folder:
        sft, dpo = write_chats(folder, args.chats)
        print(f"\nengine loader: {args.chats:,} synthetic chats each, micro-batch {args.engine_batch}, max_seq_len "
              f"{args.max_seq_len}; about {args.engine_seconds:.0f} s per row ({os.cpu_count()} CPUs here)")
        for name, ds, count_fn in (("sft", SFTDataset(sft, tokenizer, args.max_seq_len), batching.token_count),
                                   ("dpo", DPODataset(dpo, tokenizer, args.max_seq_len), pair_count)):
            rates = {}
            for w in workers:
                tok_s, batch_s, first = engine_loader_rate(ds, count_fn, w, args)
                rates[w] = tok_s
                print(f"  {name} num_workers {w}: {tok_s:12,.0f} real tokens/s, {batch_s:8,.1f} batches/s "
                      f"(first batch after {first:.3f} s)")
            base = rates[workers[0]]
            print(f"  ratio {name} workers/in-process: " + ", ".join(
                f"{w} -> {rates[w] / base:.2f}x" for w in workers[1:]))


def main():
    args = parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    describe_machine()
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)

    tmp = None
    if args.corpus:
        corpus = Path(args.corpus)
        print(f"corpus  : {corpus} ({corpus.stat().st_size / 1e9:.3f} GB)")
    else:
        fd, tmp = tempfile.mkstemp(prefix="bench_data_", suffix=".jsonl", dir=args.tmpdir)
        os.close(fd)
        corpus = Path(tmp)
        t = time.perf_counter()
        n_docs, n_bytes = write_corpus(corpus, int(args.gb * 1e9))
        print(f"corpus  : generated {n_bytes / 1e9:.3f} GB, {n_docs:,} documents of 64-512 characters in "
              f"{time.perf_counter() - t:.1f} s -> {corpus}")
    try:
        r = load_rate(args, tokenizer, corpus)
    finally:
        if tmp and not args.keep:
            for p in (corpus, Path(tmp + ".idx")):
                p.unlink(missing_ok=True)
    if tmp and args.keep:
        print(f"kept    : {corpus} (reuse with --corpus {corpus})")

    print(f"\nindex   : {r['records']:,} records; {'loaded the existing' if r['had_index'] else 'built the'} "
          f"offset index in {r['index_s']:.2f} s, peak RSS +{r['index_peak']:.0f} MB while doing it")
    tok_s = r["tokens"] / r["seconds"]
    print(f"loader  : PretrainDataset(max_length {args.max_seq_len}) + DataLoader(batch {args.batch}, shuffle, "
          f"num_workers {args.num_workers}): {r['samples']:,} samples, {r['tokens']:,} tokens "
          f"in {r['seconds']:.2f} s (first batch after {r['first']:.3f} s)")
    print(f"          {tok_s:,.0f} tokens/s, {r['samples'] / r['seconds']:,.0f} samples/s "
          f"({r['tokens'] / max(r['samples'], 1):.0f} tokens per document, "
          f"{r['positions'] / r['seconds']:,.0f} padded positions/s)")
    reset_note = "" if r["can_reset"] else " (could not reset the peak: it may include earlier work)"
    print(f"memory  : baseline RSS {r['base']:.0f} MB before the dataset; peak growth +{r['peak']:.0f} MB "
          f"(index + loading), +{r['now']:.0f} MB at the end{reset_note}")
    if args.num_workers:
        print(f"          largest worker peak RSS {r['worker_peak']:.0f} MB (forked: counts pages shared "
              f"with the {r['base']:.0f} MB parent)")

    n_params, train_tok_s, times = train_rate(args)
    print(f"\ntraining: LMConfig() {n_params:,} parameters, fp32, batch {args.train_batch} x seq {args.train_seq}, "
          f"AdamW full step; best of {len(times)} steps {min(times):.3f} s -> {train_tok_s:,.0f} tokens/s "
          f"(every step: {' '.join(f'{t:.3f}' for t in times)} s)")

    ratio = tok_s / train_tok_s
    print(f"\nratio loader/training: {ratio:,.1f}x tokens/s (target >= {TARGET_RATIO}x: "
          f"{'met' if ratio >= TARGET_RATIO else 'MISSED'}); a step then waits {100 / ratio:.1f}% "
          f"of its time for data if loading is not overlapped")
    print(f"RSS growth: +{r['peak']:.0f} MB on a {r['size_gb']:.3f} GB corpus (target < {TARGET_RSS_MB} MB: "
          f"{'met' if r['peak'] < TARGET_RSS_MB else 'MISSED'})")
    if args.chats:
        engine_loaders(args, tokenizer)
    print(f"load at end: {load_average()}")


if __name__ == "__main__":
    main()
