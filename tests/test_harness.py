"""Our numbers beside the field's: eval_ceval.py's letter and cloze forms against lm-evaluation-harness (the `hf`
model on both export kinds, `local-completions` against a live server), the shipped task YAMLs, and bits per byte
against values computed by hand."""
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from model.checkpoint import save_weights
from model.evaluation import (LETTERS, Question, bits_per_byte, ceval_accuracy, cloze_context, mcq_prompt_ids,
                              read_ceval_dir)
from serving_helpers import start_server, wait_healthy
from test_eval_export import ROOT, load_script, tiny_model, tokenizer, tokenizer_dir  # noqa: F401  (fixtures)

# C-Eval layout; cells a CSV reader could turn into numbers or NA, quotes, a question without an answer
QUESTIONS = [
    ("长江有多长？", ["约6300公里", "约100公里", "约5公里", "约1公里"], "A"),
    ("世界上最高的山是什么？", ["泰山", "珠穆朗玛峰", "黄山", "华山"], "B"),
    ("What is 1/2?", ["0.50", "007", "NA", "1,000"], "A"),
    ("Hello", ["Hi! I am a tiny model.", "Bye", 'He said "no"', "None"], "C"),
    ("数一数", ["一二三", "四五六", "七八九", "十"], "D"),
    ("熊猫吃什么？", ["竹子", "肉", "鱼", "草"], "A"),
    ("水的化学式是？", ["H2O", "CO2", "NaCl", "O2"], "A"),
    ("  泰山在哪里？ ", [" 山东", "河南 ", "广东", "云南"], " b "),
    ("No answer here", ["a", "b", "c", "d"], ""),
] + [(f"第{i}题：哪一个？", [f"选项{i}{k}" for k in "甲乙丙丁"], "ABCD"[i % 4]) for i in range(12)]


def write_csv(folder, rows):
    import csv
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "mixed_val.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "question", "A", "B", "C", "D", "answer"])
        for i, (q, opts, ans) in enumerate(rows):
            w.writerow([i, q, *opts, ans])
    return folder


# ---------------------------------------------------------------------------------------------------------
# fast: cloze by hand, the YAMLs ask as eval_ceval.py asks, bits per byte by hand


def test_cloze_scores_options_as_computed_by_hand(tokenizer):
    """Each option's log-likelihood after the chat prompt of the bare question (the header's final newline
    scored with the option, as lm-evaluation-harness splits it), divided by the option's characters."""
    model = tiny_model(len(tokenizer), seed=3)
    q = Question("s", "0", "长江有多长？", ("约6300公里", "短", "很长很长的河流", "1"), "C")
    expected = []
    for opt in q.options:
        context = tokenizer.encode("<s>user\n长江有多长？</s>\n<s>assistant", add_special_tokens=False)
        ids = tokenizer.encode("<s>user\n长江有多长？</s>\n<s>assistant\n" + opt, add_special_tokens=False)
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        ll = sum(logp[t - 1, ids[t]].item() for t in range(len(context), len(ids)))
        expected.append(ll / len(opt))
    got = ceval_accuracy(model, tokenizer, [q], "cloze")
    row = got["results"][0]
    assert [row[f"score_{x}"] for x in LETTERS] == pytest.approx(expected, abs=1e-5)
    assert got["choices"] == [LETTERS[max(range(4), key=lambda k: expected[k])]]
    assert got["count"] == 1 and got["method"] == "cloze"
    empty = Question("s", "1", "q", ("", "b", "c", "d"), "A")  # an empty option is never chosen
    assert ceval_accuracy(model, tokenizer, [empty], "cloze")["results"][0]["score_A"] == -math.inf


def render(template, doc):
    from lm_eval.utils import apply_template  # how the harness renders a task's Jinja fields
    return apply_template(template, doc)


@pytest.mark.parametrize("method", ["letter", "cloze"])
def test_shipped_task_asks_as_eval_ceval_does(tmp_path, tokenizer, method):
    """The shipped YAML's prompt, choices and target, rendered as the harness renders them, are eval_ceval.py's
    (cells stripped, lower-case answers) for every fixture question."""
    task = yaml.safe_load((ROOT / "model" / "harness" / f"minimind_mcq_{method}.yaml").read_text(encoding="utf-8"))
    questions = read_ceval_dir(write_csv(tmp_path / "data", QUESTIONS))["mixed"]
    raw = QUESTIONS
    for q, (text, opts, ans) in zip(questions, raw):
        doc = {"id": q.id, "question": text, **dict(zip(LETTERS, opts)), "answer": ans}
        context = (tokenizer.decode(mcq_prompt_ids(tokenizer, q)) if method == "letter"
                   else cloze_context(tokenizer, q))
        assert render(task["doc_to_text"], doc) == context
        choices = task["doc_to_choice"] if method == "letter" else eval(render(task["doc_to_choice"], doc))
        assert choices == (list(LETTERS) if method == "letter" else list(q.options))
        if q.answer:
            assert int(render(task["doc_to_target"], doc)) == LETTERS.index(q.answer)
    assert task["target_delimiter"] == ""


def uniform_model(vocab_size, max_seq_len=512):
    model = tiny_model(vocab_size, max_seq_len=max_seq_len)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # every logit 0: each token costs log2(vocab) bits
    return model


def test_bits_per_byte_by_hand(tokenizer):
    V = len(tokenizer)
    text = "长江abc"  # 6 + 3 bytes
    n = len(tokenizer.encode(text, add_special_tokens=False))
    got = bits_per_byte(uniform_model(V), tokenizer, [text])
    assert got["bytes"] == 9 and got["tokens"] == n and got["documents"] == 1
    assert got["bpb"] == pytest.approx(n * math.log2(V) / 9, rel=1e-6)
    # windows of 4 tokens over a longer document: every token still predicted once
    long = "长江是中国第一长河，全长约6300公里。" * 3
    m = len(tokenizer.encode(long, add_special_tokens=False))
    windowed = bits_per_byte(uniform_model(V), tokenizer, [long, text], max_len=4)
    assert windowed["tokens"] == m + n and windowed["bytes"] == len(long.encode()) + 9
    assert windowed["bpb"] == pytest.approx((m + n) * math.log2(V) / (len(long.encode()) + 9), rel=1e-6)
    # a real model in one window: the summed loss of a forward pass over <s> + text
    model = tiny_model(V, seed=2)
    ids = [tokenizer.convert_tokens_to_ids("<s>")] + tokenizer.encode(long, add_special_tokens=False)
    with torch.no_grad():
        nats = torch.nn.functional.cross_entropy(model(torch.tensor([ids[:-1]])).logits[0], torch.tensor(ids[1:]),
                                                 reduction="sum").item()
    assert bits_per_byte(model, tokenizer, [long])["bpb"] == pytest.approx(nats / math.log(2) / len(long.encode()),
                                                                           rel=1e-5)


def test_eval_pretrain_bpb_flag(tmp_path, tokenizer, tokenizer_dir, capsys):
    path = tmp_path / "pretrain_64.pth"
    save_weights(uniform_model(len(tokenizer)), path)
    docs = tmp_path / "held_out.jsonl"
    docs.write_text('{"text": "长江abc"}\n{"text": "长江abc"}\n', encoding="utf-8")
    script = load_script("0-eval_pretrain.py")
    result = script.main(["--model", str(path), "--tokenizer", str(tokenizer_dir), "--bpb", str(docs),
                          "--device", "cpu"])
    n = len(tokenizer.encode("长江abc", add_special_tokens=False))
    assert result["bytes"] == 18 and result["bpb"] == pytest.approx(n * math.log2(len(tokenizer)) / 9, rel=1e-6)
    assert "over 18 bytes" in capsys.readouterr().out
    docs.write_text('{"text": "ok"}\n{"txt": 1}\n', encoding="utf-8")
    with pytest.raises(SystemExit, match=r"held_out.jsonl:2: missing or non-string field 'text'"):
        script.main(["--model", str(path), "--tokenizer", str(tokenizer_dir), "--bpb", str(docs), "--device", "cpu"])


# ---------------------------------------------------------------------------------------------------------
# slow: lm-evaluation-harness itself, offline, on the task eval_ceval.py writes


@pytest.fixture(scope="module")
def scored(tmp_path_factory, tokenizer, tokenizer_dir):
    """eval_ceval.py in both forms on the fixture questions with a small random model (its choices vary), into
    one folder, so one lm_eval run has both tasks. Returns (tmp, model path, summaries, {method: {id: row}})."""
    import csv
    tmp = tmp_path_factory.mktemp("harness")
    path = tmp / "full_sft_64.pth"
    save_weights(tiny_model(len(tokenizer), seed=10), path)  # letter and cloze choices both vary
    data = write_csv(tmp / "data", QUESTIONS)
    eval_ceval = load_script("eval_ceval.py")
    summaries, rows = {}, {}
    for m in ("letter", "cloze"):
        summaries[m] = eval_ceval.main(["--model", str(path), "--tokenizer", str(tokenizer_dir), "--data_dir",
                                        str(data), "--out_dir", str(tmp / "ceval"), "--device", "cpu", "--method", m])
        with open(tmp / "ceval" / "mixed.csv", encoding="utf-8") as f:  # the next run replaces it
            rows[m] = {r["id"]: r for r in csv.DictReader(f)}
    assert summaries["cloze"]["method"] == "cloze" and summaries["letter"]["method"] == "letter"
    return tmp, path, summaries, rows


def run_lm_eval(command, tmp, **replace):
    """Run a printed lm_eval command (env prefix, then arguments) with both tasks, logging samples; returns
    (results, {task: {question id: sample}}, seconds)."""
    words = shlex.split(command)
    env = dict(w.split("=", 1) for w in words[:words.index("lm_eval")])
    args = words[words.index("lm_eval") + 1:]
    args[args.index("--tasks") + 1] = "minimind_ceval_letter,minimind_ceval_cloze"
    for old, new in replace.items():
        args = [a.replace(old, new) for a in args]
    out = tmp / f"lm_eval_{len(list(tmp.glob('lm_eval_*')))}"
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "lm_eval", *args, "--output_path", str(out), "--log_samples"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, **env, "HF_DATASETS_CACHE": str(tmp / "datasets"), "OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    samples = {}
    for task in ("minimind_ceval_letter", "minimind_ceval_cloze"):
        lines = next(out.rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()
        samples[task] = {json.loads(x)["doc"]["id"]: json.loads(x) for x in lines}
    return results, samples, seconds


def assert_same_as_eval_ceval(summaries, rows, results, samples, label):
    """The harness's accuracy equals eval_ceval.py's for each method, and so does every question's choice."""
    for m, metric in (("letter", "acc"), ("cloze", "acc_norm")):
        task = f"minimind_ceval_{m}"
        assert results[task][f"{metric},none"] == pytest.approx(summaries[m]["total"]["accuracy"], abs=1e-12), label
        answered = {i: r for i, r in rows[m].items() if r["answer"]}
        assert set(samples[task]) == set(answered)  # the question without an answer is left out of both
        for qid, sample in samples[task].items():
            lls = [float(r[0]) for r in sample["filtered_resps"]]
            options = [sample["doc"][x].strip() for x in LETTERS]
            scores = lls if m == "letter" else [ll / len(o) for ll, o in zip(lls, options)]
            assert LETTERS[max(range(4), key=lambda k: scores[k])] == answered[qid]["prediction"], (label, m, qid)
            if m == "cloze":
                ours = [float(answered[qid][f"logprob_{x}"]) for x in LETTERS]
                assert lls == pytest.approx(ours, abs=1e-4), (label, qid)
    print(f"{label}: letter {summaries['letter']['total']['accuracy']:.4f}, cloze "
          f"{summaries['cloze']['total']['accuracy']:.4f} on {summaries['cloze']['total']['count']} questions: equal")


@pytest.mark.slow
def test_lm_eval_hf_on_both_export_kinds_equals_eval_ceval(scored, tokenizer_dir):
    tmp, path, summaries, rows = scored
    harness = summaries["cloze"]["lm_eval"]
    export = load_script("export_model.py")
    export.main(shlex.split(harness["export"])[2:])  # the printed export command: the remote-code folder
    llama = tmp / "llama"
    export.main(["--model", str(path), "--tokenizer", str(tokenizer_dir), "--out", str(llama), "--format", "llama"])
    folder = str(tmp / "ceval" / "hf_model")
    assert f"pretrained={folder}," in harness["hf"]
    for label, replace in (("hf, transformers folder", {}), ("hf, stock Llama folder", {folder: str(llama)})):
        results, samples, seconds = run_lm_eval(harness["hf"], tmp, **replace)
        assert_same_as_eval_ceval(summaries, rows, results, samples, label)
        print(f"lm_eval {label}: {seconds:.1f} s for both tasks")


@pytest.mark.slow
def test_lm_eval_local_completions_on_a_live_server_equals_eval_ceval(scored, tokenizer_dir):
    tmp, path, summaries, rows = scored
    proc, url = start_server((path, tokenizer_dir))
    try:
        wait_healthy(proc, url)
        command = summaries["cloze"]["lm_eval"]["server"]
        results, samples, seconds = run_lm_eval(command, tmp, **{"http://127.0.0.1:8998": url})
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert_same_as_eval_ceval(summaries, rows, results, samples, "local-completions")
    print(f"lm_eval local-completions: {seconds:.1f} s for both tasks")
