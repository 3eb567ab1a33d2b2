"""model/dataset.py: lazy indexed reading, the chat format's loss masks, padding, and memory that does not grow with the file."""
import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from model.convert import DataError
from model.chat_format import render as render_chat
from model.chat_format import IGNORE as IGNORE_INDEX
from model.dataset import DPODataset, PretrainDataset, SFTDataset, collate_pad, format_mcq

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "model" / "minimind_tokenizer"


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """The shipped tokenizer; before it exists, a throwaway byte-level BPE with the same specials."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if (SHIPPED / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(SHIPPED))
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["长江全长约6300公里，是中国最长的河流。", "The Yangtze is about 6300 km long.", "泰山位于山东省。"] * 50
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<unk>")


def write_jsonl(path, rows, newline="\n"):
    with open(path, "w", encoding="utf-8", newline="") as f:
        for r in rows:
            f.write((json.dumps(r, ensure_ascii=False) if not isinstance(r, str) else r) + newline)
    return str(path)


def conv(*turns, system=None):
    msgs = [{"role": "system", "content": system}] if system else []
    for i, t in enumerate(turns):
        msgs.append({"role": ("user", "assistant")[i % 2], "content": t})
    return msgs


# ----------------------------------------------------------------------------------- pretraining


def test_pretrain_item_is_bos_text_eos_and_unshifted(tmp_path, tokenizer):
    texts = ["长江全长约6300公里。", "The Yangtze is long.", "泰山" * 300]
    ds = PretrainDataset(write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in texts]), tokenizer, max_length=64)
    assert len(ds) == 3
    item = ds[0]
    ids = item["input_ids"].tolist()
    assert ids[0] == 1 and ids[-1] == 2 and tokenizer.decode(ids[1:-1]) == texts[0]
    assert torch.equal(item["labels"], item["input_ids"]) and item["input_ids"].dtype == torch.long
    assert len(ds[2]["input_ids"]) == 64 and 0 not in ds[0]["input_ids"].tolist()


def test_index_skips_blank_lines_tolerates_bom_crlf_and_a_missing_final_newline(tmp_path, tokenizer):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"text": "a"}\r\n\r\n\n{"text": "b"}\r\n\n{"text": "c"}')
    ds = PretrainDataset(str(path), tokenizer)
    assert [tokenizer.decode(ds[i]["input_ids"][1:-1]) for i in range(len(ds))] == ["a", "b", "c"]


def test_index_is_cached_and_rebuilt_when_the_file_changes(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "一"}, {"text": "二"}])
    assert len(PretrainDataset(path, tokenizer)) == 2
    idx = Path(path + ".idx")
    assert idx.is_file()
    stamp = idx.stat().st_mtime_ns
    assert len(PretrainDataset(path, tokenizer)) == 2 and idx.stat().st_mtime_ns == stamp  # reused
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"text": "三"}, ensure_ascii=False) + "\n")
    ds = PretrainDataset(path, tokenizer)
    assert len(ds) == 3 and tokenizer.decode(ds[2]["input_ids"][1:-1]) == "三"


def test_read_only_folder_keeps_the_index_in_memory(tmp_path, tokenizer, monkeypatch):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "一"}, {"text": "二"}])
    real_open = open

    def no_idx_writes(p, mode="r", *a, **k):
        if str(p).endswith(".tmp") and "w" in mode:
            raise PermissionError(p)
        return real_open(p, mode, *a, **k)

    monkeypatch.setattr("builtins.open", no_idx_writes)
    with pytest.warns(UserWarning, match="keeping the offset index in memory"):
        ds = PretrainDataset(path, tokenizer)
    assert len(ds) == 2 and not Path(path + ".idx").exists()


def test_missing_file_names_the_command_that_makes_it(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"demo/pretrain.jsonl: file not found; create it with: "
                                        r"python data_process.py demo"):
        PretrainDataset(str(tmp_path / "demo" / "pretrain.jsonl"), tokenizer)
    with pytest.raises(DataError, match="python data_process.py sft --input RAW.jsonl --output"):
        SFTDataset(str(tmp_path / "sft.jsonl"), tokenizer)
    with pytest.raises(DataError, match="python data_process.py dpo"):
        DPODataset(str(tmp_path / "dpo.jsonl"), tokenizer)


def test_bad_record_names_file_and_line(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "一"}, "", "{broken", {"text": "二"}])
    ds = PretrainDataset(path, tokenizer)
    with pytest.raises(DataError, match=rf"{path}:3: unreadable record"):
        ds[1]
    sft = SFTDataset(write_jsonl(tmp_path / "s.jsonl", [{"conversations": conv("问")}]), tokenizer)
    with pytest.raises(DataError, match=r"s.jsonl:1: .*last message must be the assistant's"):
        sft[0]


# ----------------------------------------------------------------------------------- the chat format and loss masks


def masked_text(tokenizer, item, prefix=""):
    return tokenizer.decode([t for t, l in zip(item[prefix + "input_ids"].tolist(), item[prefix + "labels"].tolist())
                             if l != IGNORE_INDEX])


def test_render_matches_the_seed_template(tokenizer):
    msgs = conv("你好", "你好！", "1+1=?", "2", system="你是MiniMind。")
    assert render_chat(msgs) == ("你是MiniMind。<s>user\n你好</s>\n<s>assistant\n你好！</s>\n"
                                 "<s>user\n1+1=?</s>\n<s>assistant\n2</s>\n")
    if getattr(tokenizer, "chat_template", None):
        assert tokenizer.apply_chat_template(msgs, tokenize=False) == render_chat(msgs)
        assert tokenizer.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True) == render_chat(msgs[:2])


def test_sft_loss_only_on_assistant_tokens_multi_turn(tmp_path, tokenizer):
    msgs = conv("长江有多长？", "约6300公里。", "泰山在哪里？", "山东。", "And in English?", "Shandong, China.",
                system="你是一个助手。")
    ds = SFTDataset(write_jsonl(tmp_path / "s.jsonl", [{"conversations": msgs}]), tokenizer)
    item = ds[0]
    assert tokenizer.decode(item["input_ids"]) == render_chat(msgs)
    assert masked_text(tokenizer, item) == "约6300公里。</s>山东。</s>Shandong, China.</s>"
    labels, ids = item["labels"].tolist(), item["input_ids"].tolist()
    assert all(l in (IGNORE_INDEX, t) for l, t in zip(labels, ids)), "labels are unshifted copies of input_ids"
    # the newline after each </s> and every prompt token are not targets
    targets = [i for i, l in enumerate(labels) if l != IGNORE_INDEX]
    assert ids[targets[-1]] == 2 and labels[-1] == IGNORE_INDEX


def test_sft_csv_seed_format_with_history(tmp_path, tokenizer):
    path = tmp_path / "sft.csv"
    path.write_text('history,q,a\n"[[\'问一\', \'答一\']]",问二,"答二\n第二行"\n"[]",问三,答三\n', encoding="utf-8")
    ds = SFTDataset(str(path), tokenizer)
    assert len(ds) == 2
    assert masked_text(tokenizer, ds[0]) == "答一</s>答二\n第二行</s>"
    assert tokenizer.decode(ds[1]["input_ids"]) == render_chat(conv("问三", "答三"))


def test_sft_truncation_keeps_the_start(tmp_path, tokenizer):
    msgs = conv("问题", "答" * 400)
    item = SFTDataset(write_jsonl(tmp_path / "s.jsonl", [{"conversations": msgs}]), tokenizer, max_length=32)[0]
    assert len(item["input_ids"]) == 32 and tokenizer.decode(item["input_ids"]).startswith("<s>user\n问题</s>")


def test_dpo_labels_only_on_the_final_answer(tmp_path, tokenizer):
    prompt = conv("你好", "你好！", "泰山在哪里？")
    row = {"chosen": prompt + [{"role": "assistant", "content": "泰山在山东。"}],
           "rejected": prompt + [{"role": "assistant", "content": "自己去查。"}]}
    item = DPODataset(write_jsonl(tmp_path / "d.jsonl", [row]), tokenizer)[0]
    assert set(item) == {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"}
    assert masked_text(tokenizer, item, "chosen_") == "泰山在山东。</s>"
    assert masked_text(tokenizer, item, "rejected_") == "自己去查。</s>"
    assert tokenizer.decode(item["rejected_input_ids"]) == render_chat(row["rejected"])


def test_collate_pads_right_with_zero_and_ignore(tmp_path, tokenizer):
    rows = [{"conversations": conv("问", "答")}, {"conversations": conv("一个长一点的问题", "一个长一点的回答")}]
    ds = SFTDataset(write_jsonl(tmp_path / "s.jsonl", rows), tokenizer)
    a, b = ds[0], ds[1]
    batch = collate_pad([a, b])
    n = len(a["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, len(b["input_ids"]))
    assert batch["input_ids"][0, n:].eq(0).all() and batch["labels"][0, n:].eq(IGNORE_INDEX).all()
    assert batch["attention_mask"][0].sum() == n and batch["attention_mask"][1].all()
    assert torch.equal(batch["input_ids"][0, :n], a["input_ids"])
    pair = {"chosen": conv("问", "好答案"), "rejected": conv("问", "坏")}
    d = DPODataset(write_jsonl(tmp_path / "d.jsonl", [pair, pair]), tokenizer)
    db = collate_pad([d[0], d[1]])
    assert {"chosen_attention_mask", "rejected_attention_mask"} <= set(db)
    assert not (db["chosen_labels"] == 0).any(), "padding id 0 is never a target"


def test_format_mcq_layout():
    assert format_mcq(" 泰山在哪个省？", ["山东", "四川", "广东", "云南"]) == \
        "泰山在哪个省？\nA. 山东\nB. 四川\nC. 广东\nD. 云南\n请只回答选项字母。"


# ----------------------------------------------------------------------------------- workers and memory


def test_dataset_pickles_without_copying_the_index(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": str(i)} for i in range(1000)])
    ds = PretrainDataset(path, tokenizer)
    ds[5]
    clone = pickle.loads(pickle.dumps(ds.index))
    assert clone.read(5) == ds.index.read(5)
    assert len(pickle.dumps(ds.index)) < 2000  # offsets re-mapped on the other side, not copied


def test_dataloader_workers(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": f"文档{i}"} for i in range(64)])
    ds = PretrainDataset(path, tokenizer, max_length=16)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2, collate_fn=collate_pad)
    seen = sorted(tokenizer.decode(row[m.bool()][1:-1]) for b in loader for row, m in zip(b["input_ids"], b["attention_mask"]))
    assert seen == sorted(f"文档{i}" for i in range(64))


MEMORY_PROBE = textwrap.dedent("""
    import json, random, sys, tracemalloc
    tracemalloc.start()
    from model.dataset import RecordIndex
    index = RecordIndex(sys.argv[1], "pretrain")
    for i in random.Random(0).sample(range(len(index)), 2000):
        json.loads(index.read(i))
    print(len(index), tracemalloc.get_traced_memory()[1])
""")


@pytest.mark.slow  # writes and indexes 350 MB
def test_memory_does_not_grow_with_file_size(tmp_path):
    """Peak memory the Python heap and numpy allocate while indexing + random reads (counted by tracemalloc,
    the same on every run, unlike the process's RSS): a 50 MB and a 300 MB file cost the same."""
    line = (json.dumps({"text": "一段用来测量内存的预训练文本。" * 6}, ensure_ascii=False) + "\n").encode()
    peak = {}
    for mb in (50, 300):
        path = tmp_path / f"{mb}.jsonl"
        block = line * ((1 << 20) // len(line))
        with open(path, "wb") as f:
            for _ in range(mb):
                f.write(block)
        out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(path)], capture_output=True, text=True,
                             cwd=ROOT, check=True).stdout.split()
        peak[mb] = int(out[1]) / 2**20  # MiB
        path.unlink()
        Path(str(path) + ".idx").unlink()
    print(f"peak traced memory, MiB: {peak}")
    assert peak[300] < peak[50] + 1, peak  # the 6x larger file may not cost more (the offsets are memory-mapped)
