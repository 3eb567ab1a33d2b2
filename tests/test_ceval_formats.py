"""eval_ceval.py reads C-Eval and CMMLU CSVs, each file's layout told by its header; fixtures written here."""
import json

import pytest

from model.checkpoint import save_weights
from model.evaluation import read_ceval_dir
from test_eval_export import letter_model, load_script, tokenizer, tokenizer_dir  # noqa: F401  (fixtures)

# the same three questions in both layouts (CMMLU's as pandas writes it: an unnamed index column first)
CEVAL = ("id,question,A,B,C,D,answer\n"
         "0,长江有多长？,约6300公里,约100公里,约5公里,约1公里,A\n"
         '1,"多行\n的问题",x,y,z,w,B\n'
         "2,  泰山在哪里？ ,山东,河南,广东,云南, b \n")
CMMLU = ("\ufeff,Question,A,B,C,D,Answer\n"  # a byte-order mark, as Excel-made copies have
         "0,长江有多长？,约6300公里,约100公里,约5公里,约1公里,A\n"
         '1,"多行\n的问题",x,y,z,w,B\n'
         "\n"
         "2,  泰山在哪里？ ,山东,河南,广东,云南, b \n")


def write(folder, files):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def test_both_layouts_read_the_same_questions(tmp_path):
    subjects = read_ceval_dir(write(tmp_path / "mixed", {"geo_val.csv": CEVAL, "agronomy.csv": CMMLU}))
    assert list(subjects) == ["agronomy", "geo"]
    ceval, cmmlu = subjects["geo"], subjects["agronomy"]
    assert [q.benchmark for q in ceval] == ["C-Eval"] * 3 and [q.benchmark for q in cmmlu] == ["CMMLU"] * 3
    strip = lambda qs: [(q.id, q.question, q.options, q.answer) for q in qs]  # noqa: E731
    assert strip(cmmlu) == strip(ceval)
    assert strip(cmmlu) == [("0", "长江有多长？", ("约6300公里", "约100公里", "约5公里", "约1公里"), "A"),
                            ("1", "多行\n的问题", ("x", "y", "z", "w"), "B"),
                            ("2", "泰山在哪里？", ("山东", "河南", "广东", "云南"), "B")]


def test_cmmlu_end_to_end(tmp_path, tokenizer, tokenizer_dir):
    """A model that always answers B: per-subject counts from both layouts, the layouts named in summary.json."""
    path = tmp_path / "full_sft_64.pth"
    save_weights(letter_model(tokenizer, [0.0, 2.0, 0.5, 1.0]), path)
    data = write(tmp_path / "data", {"geo_val.csv": CEVAL, "agronomy.csv": CMMLU,
                                     "law.csv": ",Question,A,B,C,D,Answer\n0,q1,a,b,c,d,B\n1,q2,a,b,c,d,\n"})
    out = tmp_path / "res"
    summary = load_script("eval_ceval.py").main(["--model", str(path), "--tokenizer", str(tokenizer_dir),
                                                 "--data_dir", str(data), "--out_dir", str(out), "--device", "cpu"])
    saved = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert saved["layouts"] == {"agronomy": "CMMLU", "geo": "C-Eval", "law": "CMMLU"}
    assert saved["subjects"]["agronomy"] == saved["subjects"]["geo"] == {
        "correct": 2, "count": 3, "accuracy": 2 / 3, "unanswerable": 0}
    assert saved["subjects"]["law"] == {"correct": 1, "count": 1, "accuracy": 1.0, "unanswerable": 1}
    assert saved["total"] == {"correct": 5, "count": 7, "accuracy": 5 / 7, "unanswerable": 1}
    assert summary["total"] == saved["total"]


@pytest.mark.parametrize("text,where,what", [
    ("foo,bar\n1,2\n", "x.csv:1", "need C-Eval's id,question,A,B,C,D,answer or CMMLU's ,Question,A,B,C,D,Answer"),
    (",Question,A,B,C,Answer\n0,q,a,b,c,A\n", "x.csv:1", "lacks column(s) D"),
    (",Question,A,B,C,D,Answer\n0,q,a,b,c,d,A\n1,q,a,b,c,d,E\n", "x.csv:3", "answer 'E' is not one of A, B, C, D"),
    (",Question,A,B,C,D,Answer\n0,q,a,b,c,d,A,extra\n", "x.csv:2", "8 fields but the header has 7"),
])
def test_bad_cmmlu_file_names_file_and_line(tmp_path, text, where, what):
    with pytest.raises(ValueError) as e:
        read_ceval_dir(write(tmp_path / "bad", {"x.csv": text}))
    assert where in str(e.value) and what in str(e.value) and "\n" not in str(e.value)


def test_a_folder_with_bad_files_scores_the_good_ones_and_lists_every_bad_one(tmp_path, tokenizer, tokenizer_dir,
                                                                             capsys):
    """Good files are scored and written; each bad one is one line saying why; the exit status is 1."""
    path = tmp_path / "full_sft_64.pth"
    save_weights(letter_model(tokenizer, [0.0, 2.0, 0.5, 1.0]), path)
    data = write(tmp_path / "data", {"geo_val.csv": CEVAL, "agronomy.csv": CMMLU,
                                     "misspelt_val.csv": "id,question,A,B,C,D,Answer\n0,q,a,b,c,d,A\n",
                                     "short_val.csv": "id,question,A,B,C,D,answer\n0,q,a,b,c,d,A\n1,q,a,b,c,d\n",
                                     "empty_val.csv": ""})
    (data / "gbk_val.csv").write_bytes(CEVAL.encode("gbk"))
    (data / "utf16_val.csv").write_bytes(CEVAL.encode("utf-16"))
    out = tmp_path / "res"
    with pytest.raises(SystemExit) as e:
        load_script("eval_ceval.py").main(["--model", str(path), "--tokenizer", str(tokenizer_dir),
                                           "--data_dir", str(data), "--out_dir", str(out), "--device", "cpu"])
    assert e.value.code == 1
    saved = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert sorted(saved["subjects"]) == ["agronomy", "geo"] and saved["total"]["count"] == 6
    err = [line.strip() for line in capsys.readouterr().err.splitlines() if ".csv" in line]
    assert len(err) == 5 and len(saved["failed_files"]) == 5, err
    expected = {"empty_val.csv": ": empty file", "gbk_val.csv": ": the file is GBK text, not UTF-8; convert it first",
                "utf16_val.csv": ": the file is UTF-16 text, not UTF-8; convert it first",
                "misspelt_val.csv": ":1: header has 'Answer' in a C-Eval header",
                "short_val.csv": ":3: 6 fields but the header has 7 (a short row"}
    for line, (name, why) in zip(err, sorted(expected.items())):
        assert line.startswith(str(data / name) + why), line
