"""data_process.py converters on small fixtures in the real formats, including every kind of bad input."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import data_process
from model import convert as cv
from model.files import temp_path

ROOT = Path(__file__).resolve().parent.parent


def leftovers(folder):
    """Temporary files a writer left behind (model/files.py names them .NAME.PID.tmp)."""
    return [p.name for p in Path(folder).iterdir() if p.name.endswith(".tmp")]

ZH_Q = "请介绍一下中国古代的四大发明是什么"  # 17 CJK characters, no punctuation: passes the seed's ratio rule
ZH_A = "造纸术指南针火药和印刷术"
DEEPCTRL = [
    {"instruction": ZH_Q, "input": "", "output": ZH_A, "history": []},
    {"instruction": "长江流经哪些省份和直辖市", "input": "", "output": "青海西藏四川云南重庆湖北湖南江西安徽江苏上海",
     "history": [["你知道长江吗我想了解一下", "长江是中国最长的河流"]]},
    {"instruction": "太短", "input": "", "output": ZH_A, "history": []},                    # question < 10
    {"instruction": ZH_Q, "input": "", "output": "是的", "history": []},                     # answer < 5
    {"instruction": "What are the four great inventions", "input": "", "output": "Paper, compass, gunpowder, printing",
     "history": []},                                                                       # not Chinese
    {"instruction": ZH_Q * 20, "input": "", "output": ZH_A, "history": []},               # question > 256
]


def write_lines(path, lines, mode="w"):
    with open(path, "wb") as f:
        for line in lines:
            f.write((line if isinstance(line, bytes) else line.encode("utf-8")) + b"\n")
    return str(path)


def jl(obj):
    return json.dumps(obj, ensure_ascii=False)


def run(argv, capsys):
    """data_process.main in-process: (exit code, stdout, stderr)."""
    try:
        data_process.main(argv + ["--quiet"] if argv[0] != "demo" else argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


# ----------------------------------------------------------------------------------- pretrain


def test_pretrain_keeps_short_documents_whole(tmp_path, capsys):
    docs = ["短文档。" * 10, "长文档。" * 200, "", "Hello world, a short English document."]
    src = write_lines(tmp_path / "in.jsonl", [jl({"text": d, "id": i}) for i, d in enumerate(docs)])
    out = tmp_path / "out.jsonl"
    code, stdout, _ = run(["pretrain", "--input", src, "--output", str(out)], capsys)
    assert code == 0
    assert [r["text"] for r in read_jsonl(out)] == [docs[0], docs[3]]
    assert "read 4 records" in stdout and "kept 2" in stdout
    assert "longer_than_512_chars: 1" in stdout and "empty_text: 1" in stdout
    code, _, _ = run(["pretrain", "--input", src, "--output", str(out), "--max_chars", "0"], capsys)
    assert len(read_jsonl(out)) == 3  # no length limit: only the empty one goes


def test_bom_crlf_and_blank_lines_are_tolerated_and_counted(tmp_path, capsys):
    raw = cv.BOM + "\r\n".join([jl({"text": "第一篇"}), "", "   ", jl({"text": "第二篇"})]).encode() + b"\r\n\r\n"
    src = tmp_path / "in.jsonl"
    src.write_bytes(raw)
    out = tmp_path / "out.jsonl"
    code, stdout, _ = run(["pretrain", "--input", str(src), "--output", str(out)], capsys)
    assert code == 0
    assert [r["text"] for r in read_jsonl(out)] == ["第一篇", "第二篇"]
    assert "(3 blank lines skipped)" in stdout


BAD_PRETRAIN = [  # (line content, words the one-line message must contain)
    (b'{"text": "unterminated', "malformed JSON"),
    (b'{"txt": "wrong key"}', "missing field 'text'"),
    (b'{"text": 42}', "field 'text' must be str, got int"),
    (b'["a", "list"]', "expected a JSON object, got list"),
    (b'{"text": "bad \xff\xfe bytes"}', "invalid UTF-8"),
    (b'{"text": "' + b"x" * 5000 + b'"}', "longer than --max_line_bytes=1000"),
]


@pytest.mark.parametrize("bad,problem", BAD_PRETRAIN, ids=[p for _, p in BAD_PRETRAIN])
def test_bad_input_stops_with_file_and_line(tmp_path, capsys, bad, problem):
    src = write_lines(tmp_path / "in.jsonl", [jl({"text": "好"}), "", jl({"text": "也好"}), bad, jl({"text": "后面"})])
    out = tmp_path / "out.jsonl"
    code, _, err = run(["pretrain", "--input", src, "--output", str(out), "--max_line_bytes", "1000"], capsys)
    assert code == 1
    assert err.strip() == err.strip().splitlines()[0], "exactly one line"
    assert err.startswith(f"error: {src}:4: ") and problem in err
    assert "Traceback" not in err
    assert not out.exists() and not leftovers(tmp_path)


def test_skip_bad_goes_on_and_lists_line_numbers(tmp_path, capsys):
    lines = [jl({"text": "一"})] + [bad for bad, _ in BAD_PRETRAIN] + [jl({"text": "二"})]
    src = write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    code, stdout, _ = run(["pretrain", "--input", src, "--output", str(out), "--max_line_bytes", "1000",
                           "--skip-bad"], capsys)
    assert code == 0
    assert [r["text"] for r in read_jsonl(out)] == ["一", "二"]
    side = Path(f"{out}.bad_lines.txt").read_text(encoding="utf-8").splitlines()
    assert [int(s.split("\t")[0]) for s in side] == list(range(2, 2 + len(BAD_PRETRAIN)))
    assert f"malformed {len(BAD_PRETRAIN)}" in stdout
    # a clean run without --skip-bad removes the stale list
    write_lines(tmp_path / "in.jsonl", [jl({"text": "一"})])
    assert run(["pretrain", "--input", src, "--output", str(out)], capsys)[0] == 0
    assert not Path(f"{out}.bad_lines.txt").exists()


def test_missing_input_is_one_line_error(tmp_path, capsys):
    code, _, err = run(["pretrain", "--input", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "o")], capsys)
    assert code == 1 and "nope.jsonl: input file not found" in err


def test_cli_error_has_no_traceback(tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [jl({"text": "好"}), "{oops"])
    p = subprocess.run([sys.executable, str(ROOT / "data_process.py"), "pretrain", "--input", src,
                        "--output", str(tmp_path / "o.jsonl")], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and f"{src}:2: malformed JSON" in p.stderr


# ----------------------------------------------------------------------------------- sft


def test_sft_single_turn_seed_rules(tmp_path, capsys):
    src = write_lines(tmp_path / "sft.jsonl", [jl(r) for r in DEEPCTRL])
    out = tmp_path / "single.jsonl"
    code, stdout, _ = run(["sft", "--input", src, "--output", str(out)], capsys)
    assert code == 0
    rows = read_jsonl(out)
    assert [r["conversations"] for r in rows] == [
        [{"role": "user", "content": ZH_Q}, {"role": "assistant", "content": ZH_A}],
        [{"role": "user", "content": DEEPCTRL[1]["instruction"]}, {"role": "assistant", "content": DEEPCTRL[1]["output"]}],
    ]
    for reason in ("question_shorter_than_10: 1", "answer_shorter_than_5: 1", "chinese_ratio_not_above_0.9: 1",
                   "question_longer_than_256: 1"):
        assert reason in stdout


def test_sft_multi_turn_keeps_history_and_flags_change_rules(tmp_path, capsys):
    src = write_lines(tmp_path / "sft.jsonl", [jl(r) for r in DEEPCTRL])
    out = tmp_path / "multi.jsonl"
    code, _, _ = run(["sft", "--input", src, "--output", str(out), "--multi-turn", "--min_chinese_ratio", "0",
                      "--max_chars", "0"], capsys)
    assert code == 0
    rows = read_jsonl(out)
    assert len(rows) == 4  # the English one and the long one pass once their rules are off
    assert [m["content"] for m in rows[1]["conversations"]] == [
        "你知道长江吗我想了解一下", "长江是中国最长的河流", DEEPCTRL[1]["instruction"], DEEPCTRL[1]["output"]]


def test_sft_csv_output_is_the_seed_layout(tmp_path, capsys):
    src = write_lines(tmp_path / "sft.jsonl", [jl(r) for r in DEEPCTRL[:2]])
    out = tmp_path / "sft_data.csv"
    assert run(["sft", "--input", src, "--output", str(out), "--multi-turn"], capsys)[0] == 0
    rows = list(csv.DictReader(open(out, encoding="utf-8", newline="")))
    assert [r["q"] for r in rows] == [ZH_Q, DEEPCTRL[1]["instruction"]]
    assert json.loads(rows[1]["history"]) == DEEPCTRL[1]["history"] and json.loads(rows[0]["history"]) == []


def test_sft_accepts_conversations_rows(tmp_path, capsys):
    conv = {"conversations": [{"role": "system", "content": "你是助手"}, {"role": "user", "content": "你知道长江吗我想了解一下"},
                              {"role": "assistant", "content": "长江是中国最长的河流"},
                              {"role": "user", "content": ZH_Q}, {"role": "assistant", "content": ZH_A}]}
    src = write_lines(tmp_path / "c.jsonl", [jl(conv)])
    out = tmp_path / "o.jsonl"
    assert run(["sft", "--input", src, "--output", str(out), "--multi-turn"], capsys)[0] == 0
    assert read_jsonl(out)[0] == conv
    assert run(["sft", "--input", src, "--output", str(out)], capsys)[0] == 0
    assert [m["role"] for m in read_jsonl(out)[0]["conversations"]] == ["system", "user", "assistant"]


BAD_SFT = [
    ({"instruction": ZH_Q}, "missing field 'output'"),
    ({"instruction": ZH_Q, "output": 5}, "field 'output' must be str"),
    ({"instruction": ZH_Q, "output": ZH_A, "history": "no"}, "field 'history' must be list"),
    ({"instruction": ZH_Q, "output": ZH_A, "history": [["only one"]]}, "history[0] must be a [question, answer] pair"),
    ({"question": "?"}, "expected 'conversations'"),
    ({"conversations": [{"role": "user", "content": ZH_Q}]}, "the last message must be the assistant's"),
    ({"conversations": [{"role": "bot", "content": ZH_Q}]}, "role must be one of"),
    ({"conversations": [{"role": "user", "content": None}, {"role": "assistant", "content": ZH_A}]}, "content must be a string"),
    ({"conversations": "hi"}, "must be a non-empty list"),
]


@pytest.mark.parametrize("bad,problem", BAD_SFT, ids=[p for _, p in BAD_SFT])
def test_sft_bad_rows_name_the_line(tmp_path, capsys, bad, problem):
    src = write_lines(tmp_path / "sft.jsonl", [jl(DEEPCTRL[0]), jl(bad)])
    code, _, err = run(["sft", "--input", src, "--output", str(tmp_path / "o.jsonl")], capsys)
    assert code == 1 and err.startswith(f"error: {src}:2: ") and problem in err


# ----------------------------------------------------------------------------------- dpo

PAIR = {"chosen": [{"role": "user", "content": "泰山在哪里？"}, {"role": "assistant", "content": "泰山在山东省泰安市。"}],
        "rejected": [{"role": "user", "content": "泰山在哪里？"}, {"role": "assistant", "content": "泰山在广东。"}]}


def test_dpo_jsonl_and_string_form(tmp_path, capsys):
    strings = {"prompt": "长江有多长？", "chosen": "约6300公里。", "rejected": "不知道。"}
    src = write_lines(tmp_path / "dpo.jsonl", [jl(PAIR), jl(strings), jl({**PAIR, "rejected": PAIR["chosen"]})])
    out = tmp_path / "o.jsonl"
    code, stdout, _ = run(["dpo", "--input", src, "--output", str(out)], capsys)
    assert code == 0 and "identical_answers: 1" in stdout
    rows = read_jsonl(out)
    assert rows[0] == PAIR
    assert rows[1]["chosen"] == [{"role": "user", "content": "长江有多长？"}, {"role": "assistant", "content": "约6300公里。"}]


@pytest.mark.parametrize("indent", [None, 2])
def test_dpo_json_array_streams(tmp_path, capsys, indent):
    pairs = [PAIR] * 3
    src = tmp_path / "dpo.json"
    src.write_text(json.dumps(pairs, ensure_ascii=False, indent=indent), encoding="utf-8")
    out = tmp_path / "o.jsonl"
    assert run(["dpo", "--input", str(src), "--output", str(out)], capsys)[0] == 0
    assert read_jsonl(out) == pairs


def test_dpo_json_array_bad_element_named_and_skippable(tmp_path, capsys):
    good = json.dumps(PAIR, ensure_ascii=False)
    text = "[\n  " + good + ",\n  " + good.replace('"assistant", "content": "泰山在广东。"}', '"assistant"')  \
        + ",\n  " + json.dumps({"chosen": PAIR["chosen"]}, ensure_ascii=False) + ",\n  " + good + "\n]\n"
    src = tmp_path / "dpo.json"
    src.write_text(text, encoding="utf-8")
    out = tmp_path / "o.jsonl"
    code, _, err = run(["dpo", "--input", str(src), "--output", str(out)], capsys)
    assert code == 1 and err.startswith(f"error: {src}:3: malformed JSON")
    code, stdout, _ = run(["dpo", "--input", str(src), "--output", str(out), "--skip-bad"], capsys)
    assert code == 0 and read_jsonl(out) == [PAIR, PAIR]
    side = Path(f"{out}.bad_lines.txt").read_text().splitlines()
    assert [s.split("\t")[0] for s in side] == ["3", "4"] and "missing field 'rejected'" in side[1]


def test_dpo_json_array_invalid_utf8_and_bom(tmp_path, capsys):
    good = json.dumps(PAIR, ensure_ascii=False).encode()
    src = tmp_path / "dpo.json"
    src.write_bytes(cv.BOM + b"[\r\n" + good + b",\r\n" + good.replace("广东".encode(), b"\xff\xfe") + b"\r\n]")
    out = tmp_path / "o.jsonl"
    code, _, err = run(["dpo", "--input", str(src), "--output", str(out)], capsys)
    assert code == 1 and err.startswith(f"error: {src}:3: invalid UTF-8")
    assert run(["dpo", "--input", str(src), "--output", str(out), "--skip-bad"], capsys)[0] == 0
    assert read_jsonl(out) == [PAIR]


def test_dpo_prompts_must_match(tmp_path, capsys):
    other = {**PAIR, "rejected": [{"role": "user", "content": "别的问题"}, PAIR["rejected"][1]]}
    src = write_lines(tmp_path / "dpo.jsonl", [jl(other)])
    code, _, err = run(["dpo", "--input", src, "--output", str(tmp_path / "o.jsonl")], capsys)
    assert code == 1 and f"{src}:1: 'chosen' and 'rejected' must share the same prompt" in err


def test_json_array_reader_handles_chunk_boundaries(tmp_path):
    """Elements bigger than the 1 MiB read window, and literals cut by the window edge."""
    big = {"chosen": [{"role": "user", "content": "问" * 400_000}, {"role": "assistant", "content": "答" * 5}],
           "rejected": [{"role": "user", "content": "问" * 400_000}, {"role": "assistant", "content": "错误"}], "x": True}
    src = tmp_path / "a.json"
    src.write_text(json.dumps([big, PAIR, big], ensure_ascii=False, indent=1), encoding="utf-8")
    stats = cv.Counter()
    got = [obj for _, obj, problem in cv.iter_json_array(str(src), stats) if problem is None]
    assert got == [big, PAIR, big]


# ----------------------------------------------------------------------------------- interrupted writes


def test_interrupt_leaves_no_output(tmp_path, monkeypatch):
    src = write_lines(tmp_path / "in.jsonl", [jl({"text": f"第{i}篇"}) for i in range(100)])
    out = tmp_path / "out.jsonl"
    out.write_text("old complete output\n")
    calls = {"n": 0}

    def explode(obj):
        calls["n"] += 1
        if calls["n"] == 50:
            raise KeyboardInterrupt
        return cv.pretrain_record(obj)

    with pytest.raises(KeyboardInterrupt):
        cv.convert(src, str(out), explode, progress=False)
    assert out.read_text() == "old complete output\n", "the previous output is untouched"
    assert not leftovers(tmp_path)


# data_process.py that SIGKILLs itself while converting record KILL_AT: killed mid-write at a chosen record
KILLED_AT_RECORD = """
import os, runpy, signal, sys
from model import convert
real_record, seen = convert.pretrain_record, [0]
def record(obj, **kw):
    seen[0] += 1
    if seen[0] == int(os.environ["KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_record(obj, **kw)
convert.pretrain_record = record
sys.argv = ["data_process.py", *sys.argv[1:]]
runpy.run_path("data_process.py", run_name="__main__")
"""


def test_killed_converter_leaves_no_complete_looking_file(tmp_path):
    line = jl({"text": "一篇用来测试中断的文档。" * 10}) + "\n"
    src = tmp_path / "big.jsonl"
    src.write_text(line * 4000, encoding="utf-8")
    out = tmp_path / "out.jsonl"
    p = subprocess.Popen([sys.executable, "-c", KILLED_AT_RECORD, "pretrain", "--input", str(src), "--output",
                          str(out), "--quiet"], cwd=ROOT, env={**os.environ, "KILL_AT": "3000"}, stderr=subprocess.PIPE,
                         text=True)
    _, err = p.communicate()
    assert p.returncode == -signal.SIGKILL, err
    tmp = temp_path(out, pid=p.pid)
    assert tmp.stat().st_size > 1 << 19, "the converter was killed while writing"  # 2999 records, ~1 MB
    assert not out.exists()


# ----------------------------------------------------------------------------------- compressed and foreign-encoded input


def test_gzip_input_is_read_directly(tmp_path, capsys):
    import gzip
    docs = ["第一篇文档。", "第二篇文档。" * 3, "Third document."]
    src = tmp_path / "in.jsonl.gz"
    src.write_bytes(gzip.compress("".join(jl({"text": d}) + "\n" for d in docs).encode()))
    out = tmp_path / "out.jsonl"
    code, stdout, err = run(["pretrain", "--input", str(src), "--output", str(out)], capsys)
    assert code == 0, err
    assert [r["text"] for r in read_jsonl(out)] == docs and "read 3 records" in stdout
    arr = tmp_path / "pairs.json.gz"  # a JSON array, compressed: the DPO converter's input
    pair = {"chosen": [{"role": "user", "content": "问"}, {"role": "assistant", "content": "好的回答"}],
            "rejected": [{"role": "user", "content": "问"}, {"role": "assistant", "content": "坏的回答"}]}
    arr.write_bytes(gzip.compress(json.dumps([pair, pair], ensure_ascii=False, indent=1).encode()))
    code, _, err = run(["dpo", "--input", str(arr), "--output", str(tmp_path / "dpo.jsonl")], capsys)
    assert code == 0, err
    assert len(read_jsonl(tmp_path / "dpo.jsonl")) == 2


@pytest.mark.parametrize("encoding,name", [("utf-16", "UTF-16"), ("utf-16-le", "UTF-16"), ("gbk", "GBK")])
@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gzip"])
def test_utf16_and_gbk_input_is_named(tmp_path, capsys, encoding, name, compressed):
    import gzip
    raw = "".join(jl({"text": f"第{i}篇：长江是中国最长的河流。"}) + "\n" for i in range(20)).encode(encoding)
    src = tmp_path / ("in.jsonl.gz" if compressed else "in.jsonl")
    src.write_bytes(gzip.compress(raw) if compressed else raw)
    out = tmp_path / "out.jsonl"
    code, _, err = run(["pretrain", "--input", str(src), "--output", str(out)], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert f"{src}: the file is {name} text, not UTF-8" in err and f"iconv -f {name} -t UTF-8" in err
    assert "byte" not in err and not out.exists()
    if shutil.which("iconv") and shutil.which("gzip"):  # the suggested command makes a file the converter reads
        subprocess.run(err.split("e.g. ", 1)[1].strip(), shell=True, cwd=tmp_path, check=True)
        converted = tmp_path / ("in.utf8.jsonl.gz" if compressed else "in.utf8.jsonl")
        code, _, err = run(["pretrain", "--input", str(converted), "--output", str(out)], capsys)
        assert code == 0 and len(read_jsonl(out)) == 20, err
