"""A tiny trained chat model and its tokenizer for the serving tests: small enough to build in seconds,
trained so that its greedy answers are peaked (argmax does not flip under float rounding)."""
import json
import socket
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the tests import the project's `model` package
    sys.path.insert(0, str(ROOT))
SHIPPED_TOKENIZER = ROOT / "model" / "minimind_tokenizer"

from train_tokenizer import CHAT_TEMPLATE  # noqa: E402  (the shipped tokenizer's chat format)

CONVERSATIONS = [
    ("你好", "你好！我是MiniMind，一个很小的语言模型。😀"),
    ("长江有多长？", "长江全长约6300公里，是中国第一长河。"),
    ("世界上最高的山是什么？", "珠穆朗玛峰，海拔8848.86米。🏔️"),
    ("Hello", "Hi! I am a tiny model. Nice to meet you."),
    ("数一数", "一二三四五六七八九十，十九八七六五四三二一。"),
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tokenizer_dir(tmp_dir):
    """The shipped tokenizer when it exists, else a throwaway byte-level BPE with the same specials and template."""
    if (SHIPPED_TOKENIZER / "tokenizer.json").is_file():
        return SHIPPED_TOKENIZER
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    out = Path(tmp_dir) / "tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [q + " " + a for q, a in CONVERSATIONS] * 20 + ["The quick brown fox jumps over the lazy dog."] * 5
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "pad_token": "<unk>", "add_bos_token": False, "add_eos_token": False,
              "clean_up_tokenization_spaces": False, "model_max_length": 512, "chat_template": CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    return out


_built = {}


def build_once(tmp_path_factory):
    """build() once per pytest session, shared by the test files."""
    if "paths" not in _built:
        _built["paths"] = build(tmp_path_factory.mktemp("tiny_chat_model"))
    return _built["paths"]


def build(tmp_dir, max_seq_len=4096, steps=120):
    """Train the tiny model on CONVERSATIONS and save it; returns (model path, tokenizer dir)."""
    from transformers import AutoTokenizer

    from model.chat_format import render

    tok_dir = tokenizer_dir(tmp_dir)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    rows = []
    for q, a in CONVERSATIONS:
        text = render([{"role": "user", "content": q}, {"role": "assistant", "content": a}])  # the training text
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        rows.append((ids, ids))
    return train_tiny(rows, max_seq_len, steps, Path(tmp_dir) / "tiny.pth"), tok_dir


def train_tiny(rows, max_seq_len, steps, path):
    """A 64-wide, 2-layer model trained full-batch on rows of (input ids, labels), saved at path (returned)."""
    from model.chat_format import IGNORE
    from model.checkpoint import save_weights
    from model.LMConfig import PAD_ID, LMConfig
    from model.model import Transformer

    torch.manual_seed(0)
    model = Transformer(LMConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=max_seq_len))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([i + [PAD_ID] * (width - len(i)) for i, _ in rows])
    labels = torch.tensor([l + [IGNORE] * (width - len(l)) for _, l in rows])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is faster, and immune to busy neighbours
    for _ in range(steps):
        loss = model(ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    model.eval()
    save_weights(model, path)
    return path


# ---------------------------------------------------------------------------------------------------------
# a tiny model that has learned the chat format's tool calls and thinking, for the serving tests of tools

from model.demo.tools import TOOLS  # noqa: E402  (the demo's tools: the pages and clients offer these)
TOOL_FACTS = {"卡洛维": "卡洛维是一位画家。", "蒙莫城": "蒙莫城位于索伦国。"}


def tool_conversations():
    """(messages, tools, enable_thinking) the tool model learns: a lookup round trip, a calculation, a thought,
    the same question answered directly with thinking off, two tool calls it garbles on purpose, and a thought
    that leads to a tool call."""
    def call(function, **arguments):
        return {"role": "assistant", "content": "", "tool_calls": [{"name": function, "arguments": arguments}]}
    user = lambda text: {"role": "user", "content": text}  # noqa: E731
    said = lambda text, **kw: {"role": "assistant", "content": text, **kw}  # noqa: E731
    tool = lambda text: {"role": "tool", "content": text}  # noqa: E731
    return [
        ([user("卡洛维是做什么的？"), call("lookup", name="卡洛维"), tool(TOOL_FACTS["卡洛维"]),
          said("卡洛维是一位画家。")], TOOLS, None),
        ([user("12*7等于多少？"), call("calculate", expression="12*7"), tool("84"), said("12*7等于84。")], TOOLS, None),
        ([user("卡洛维出生在哪个国家？"), said("索伦国。", reasoning_content="卡洛维出生在蒙莫城，蒙莫城位于索伦国。")],
         None, None),
        ([user("卡洛维出生在哪个国家？"), said("蒙莫城。")], None, False),
        ([user("北京天气如何？"), said('<tool_call>{"name": "get_weather", "arguments": {"city": "北京"}}</tool_call>')],
         TOOLS, None),
        ([user("坏掉的调用"), said('<tool_call>{"name": "lookup", "arguments": {"name": </tool_call>')], TOOLS, None),
        ([user("先想一想：12*7等于多少？"), {**call("calculate", expression="12*7"), "reasoning_content": "这要用计算器。"},
          tool("84"), said("等于84。")], TOOLS, None),
    ]


def build_tool_once(tmp_path_factory):
    """build_tool_model() once per pytest session, shared by the test files."""
    if "tool_paths" not in _built:
        _built["tool_paths"] = build_tool_model(tmp_path_factory.mktemp("tool_model"))
    return _built["tool_paths"]


def build_tool_model(tmp_dir, steps=150):
    """Train a tiny model on tool_conversations() (targets as SFT sets them); returns (model path, tokenizer dir)."""
    from transformers import AutoTokenizer

    from model.chat_format import Encoder

    tok_dir = tokenizer_dir(tmp_dir)
    encoder = Encoder(AutoTokenizer.from_pretrained(tok_dir))
    rows = [encoder(m, tools=t, enable_thinking=e) for m, t, e in tool_conversations()]
    return train_tiny(rows, 512, steps, Path(tmp_dir) / "tool_tiny.pth"), tok_dir
