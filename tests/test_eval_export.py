"""Tests for the inference scripts: C-Eval scoring, exports (transformers and Llama), chat and continuation CLIs."""
import csv
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.checkpoint import save_weights  # noqa: E402
from model.evaluation import LETTERS, Question, chat_input_ids, mcq_prompt_ids, score_questions  # noqa: E402
from model.LMConfig import LMConfig  # noqa: E402
from model.model import Transformer  # noqa: E402


def load_script(name):
    """Import a top-level script (some names start with a digit) as a module."""
    spec = importlib.util.spec_from_file_location(name.replace("-", "_").removesuffix(".py"), ROOT / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(args, timeout=1800, **env):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env})


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from tiny_chat_model import tokenizer_dir as build
    return build(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def tiny_model(vocab_size, seed=0, **shape):
    """A small random model with weights large enough that greedy choices are far from ties."""
    torch.manual_seed(seed)
    config = LMConfig(**{"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": vocab_size, **shape})
    model = Transformer(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3 if "tok_embeddings" in name else 0.15)
    return model


@pytest.fixture(scope="module")
def dense_pth(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("dense") / "full_sft_64.pth"
    model = tiny_model(len(tokenizer))
    save_weights(model, path)
    return path, model


# ---------------------------------------------------------------------------------------------------------
# C-Eval

GEO = ('id,question,A,B,C,D,answer\n'
       '0,长江有多长？,约6300公里, 约100公里 ,,约5公里,B\n'   # empty option C, spaces around B
       '1,  泰山在哪里？ ,山东,河南,广东,云南, a \n'          # stray whitespace, lower-case answer
       '2,"多行\n的问题",x,y,z,w,\n'                          # multi-line cell, no answer
       '3,海水为什么是咸的？,因为盐,因为糖,因为油,因为沙,B\n')
MATH = ('\ufeffid,question,A,B,C,D,answer\n'                     # a byte-order mark
        '0,1+1=?,2,3,4,5,A\n'
        '\n'                                                    # a blank line
        '1,2+2=?,1,4,3,2,B\n'
        '2,3+3=?,6,5,4,3,A\n'
        '3,4+4=?,8,7,,,\n')                                     # C, D and answer left empty


@pytest.fixture(scope="module")
def ceval_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ceval")
    (d / "geo_val.csv").write_text(GEO, encoding="utf-8")
    (d / "math_val.csv").write_text(MATH, encoding="utf-8")
    return d


def letter_model(tokenizer, weights):
    """A real Transformer whose next token after any chat prompt has logits 8*weights[letter] on A-D.

    Attention and feed-forward outputs are zero, so the last hidden state is the embedding of the prompt's
    last token (the newline of the assistant header); embeddings are chosen so its dot product with each
    letter's (tied) embedding is what the test wants."""
    model = tiny_model(len(tokenizer), seed=1)
    last = mcq_prompt_ids(tokenizer, Question("s", "0", "q", ("a", "b", "c", "d"), "A"))[-1]
    letters = [tokenizer.encode(x, add_special_tokens=False)[0] for x in LETTERS]
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
        emb = model.tok_embeddings.weight
        emb.normal_(0.0, 0.01)
        emb[last] = 0.0
        emb[last, 0] = 1.0  # RMSNorm turns this into 8 * e_0 (dim 64)
        for tok, w in zip(letters, weights):
            emb[tok] = 0.0
            emb[tok, 0] = w
    return model


def test_ceval_end_to_end(tmp_path, ceval_dir, tokenizer, tokenizer_dir):
    weights = [1.0, 2.0, 0.5, 0.0]  # B wins: softmax(8 * w) over the letters
    path = tmp_path / "full_sft_64.pth"
    save_weights(letter_model(tokenizer, weights), path)
    eval_ceval = load_script("eval_ceval.py")
    out = tmp_path / "res"
    eval_ceval.main(["--model", str(path), "--tokenizer", str(tokenizer_dir), "--data_dir", str(ceval_dir),
                     "--out_dir", str(out), "--batch_size", "3", "--device", "cpu"])

    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["subjects"]["geo"] == {"correct": 2, "count": 3, "accuracy": 2 / 3, "unanswerable": 1}
    assert summary["subjects"]["math"] == {"correct": 1, "count": 3, "accuracy": 1 / 3, "unanswerable": 1}
    assert summary["total"] == {"correct": 3, "count": 6, "accuracy": 0.5, "unanswerable": 2}

    rows = list(csv.DictReader(open(out / "geo.csv", encoding="utf-8")))
    assert [r["id"] for r in rows] == ["0", "1", "2", "3"]
    assert [r["answer"] for r in rows] == ["B", "A", "", "B"]
    assert [r["prediction"] for r in rows] == ["B"] * 4
    assert [r["correct"] for r in rows] == ["1", "0", "", "1"]
    expected = torch.tensor(weights).mul(8).softmax(-1)
    for r in rows:
        got = torch.tensor([float(r[f"prob_{x}"]) for x in LETTERS])
        assert torch.allclose(got, expected, atol=5e-3), (got, expected)
    math_rows = list(csv.DictReader(open(out / "math.csv", encoding="utf-8")))
    assert [(r["id"], r["answer"], r["correct"]) for r in math_rows] == [
        ("0", "A", "0"), ("1", "B", "1"), ("2", "A", "0"), ("3", "", "")]

    # --limit: at most N questions per subject
    out2 = tmp_path / "res2"
    eval_ceval.main(["--model", str(path), "--tokenizer", str(tokenizer_dir), "--data_dir", str(ceval_dir),
                     "--out_dir", str(out2), "--limit", "2", "--device", "cpu"])
    summary = json.loads((out2 / "summary.json").read_text(encoding="utf-8"))
    assert summary["subjects"]["geo"]["count"] == 2 and summary["subjects"]["geo"]["correct"] == 1
    assert summary["subjects"]["math"]["count"] == 2 and summary["subjects"]["math"]["correct"] == 1
    assert summary["total"] == {"correct": 2, "count": 4, "accuracy": 0.5, "unanswerable": 0}


def test_ceval_bad_answer_names_file_and_line(tmp_path, dense_pth, tokenizer_dir):
    (tmp_path / "bad_val.csv").write_text("id,question,A,B,C,D,answer\n0,q,a,b,c,d,A\n1,q,a,b,c,d,E\n")
    eval_ceval = load_script("eval_ceval.py")
    with pytest.raises(SystemExit) as e:
        eval_ceval.main(["--model", str(dense_pth[0]), "--tokenizer", str(tokenizer_dir), "--data_dir",
                         str(tmp_path), "--out_dir", str(tmp_path / "o")])
    assert "bad_val.csv:3" in str(e.value) and "'E'" in str(e.value)


class MarkerModel(torch.nn.Module):
    """A stand-in model: puts a high logit on the letter written as [[X]] in the prompt; checks left padding."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer, self.dummy = tokenizer, torch.nn.Parameter(torch.zeros(1))
        self.letter_ids = [tokenizer.encode(x, add_special_tokens=False)[0] for x in LETTERS]
        self.batch_shapes = []

    def forward(self, input_ids, attention_mask, logits_to_keep):
        assert logits_to_keep == 1 and bool(attention_mask[:, -1].all())
        assert bool((attention_mask.diff(dim=-1) >= 0).all()), "padding must be on the left"
        self.batch_shapes.append(tuple(input_ids.shape))
        logits = torch.zeros(len(input_ids), 1, len(self.tokenizer))
        for i, (ids, mask) in enumerate(zip(input_ids, attention_mask)):
            text = self.tokenizer.decode(ids[mask.bool()])
            m = re.search(r"\[\[([ABCD])\]\]", text)
            if m:
                logits[i, 0, self.letter_ids[LETTERS.index(m.group(1))]] = 10.0
        return type("Out", (), {"logits": logits})


def test_scoring_follows_the_prompt_across_batch_sizes(tokenizer):
    questions = []
    for i in range(7):
        right = LETTERS[i % 4]
        options = tuple(f"选项{x}" + ("[[%s]]" % x if x == right else "") + "很长的内容" * (i % 3) for x in LETTERS)
        answer = right if i != 5 else LETTERS[(i + 1) % 4]  # question 5 is answered wrongly by the marker
        questions.append(Question("s", str(i), f"问题{i}" + "？" * i, options, answer))
    model = MarkerModel(tokenizer)
    baseline = None
    for batch_size in (1, 3, 8):
        results, info = score_questions(model, tokenizer, questions, batch_size=batch_size)
        assert [r["prediction"] for r in results] == [LETTERS[i % 4] for i in range(7)]
        assert [r["correct"] for r in results] == [1, 1, 1, 1, 1, 0, 1]
        assert all(r[f"prob_{r['prediction']}"] > 0.99 for r in results)
        assert info["truncated_prompts"] == 0
        baseline = baseline or results
        assert results == baseline
    assert any(shape[0] > 1 for shape in model.batch_shapes)
    # prompts longer than the context keep their end: the options and the assistant header
    results, info = score_questions(model, tokenizer, questions, batch_size=4, max_len=24)
    assert info["truncated_prompts"] == 7 and max(shape[1] for shape in model.batch_shapes[-2:]) == 24


# ---------------------------------------------------------------------------------------------------------
# export

LOAD_BACK = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from model.checkpoint import load_model
out = {}
ids = torch.tensor(json.loads(sys.argv[1]))
for folder, pth in zip(sys.argv[2::2], sys.argv[3::2]):
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        diff = (logits - load_model(pth)(input_ids=ids).logits).abs().max().item()
    gen = model.generate(ids[:1], max_new_tokens=12, do_sample=False)
    out[folder] = {"logits": logits.tolist(), "diff": diff, "generate": gen[0].tolist(),
                   "class": type(model).__module__ + "." + type(model).__name__,
                   "pad": tok.pad_token_id, "eos": tok.eos_token_id,
                   "chat": tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                   add_generation_prompt=True)}
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow  # export, then a fresh interpreter loads it as a user would
def test_export_transformers_round_trip(tmp_path, dense_pth, tokenizer, tokenizer_dir):
    export_model = load_script("export_model.py")
    moe_path = tmp_path / "full_sft_64_moe.pth"
    moe = tiny_model(len(tokenizer), seed=2, use_moe=True)
    save_weights(moe, moe_path)
    folders = {}
    for name, (path, model) in {"dense": dense_pth, "moe": (moe_path, moe)}.items():
        folders[name] = tmp_path / f"hf_{name}"
        diff = export_model.main(["--model", str(path), "--tokenizer", str(tokenizer_dir),
                                  "--out", str(folders[name])])
        assert diff == 0.0
        config = json.loads((folders[name] / "config.json").read_text())
        assert config["auto_map"]["AutoModelForCausalLM"] == "model.Transformer"
        assert config["auto_map"]["AutoConfig"] == "LMConfig.LMConfig"
        for f in ("model.py", "LMConfig.py", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert (folders[name] / f).is_file(), f
        gen = json.loads((folders[name] / "generation_config.json").read_text())
        assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 0)

    ids = torch.randint(3, len(tokenizer), (2, 20), generator=torch.Generator().manual_seed(0))
    proc = run_script(["-c", LOAD_BACK, json.dumps(ids.tolist()), folders["dense"], dense_pth[0], folders["moe"],
                       moe_path],
                      HF_MODULES_CACHE=str(tmp_path / "modules"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.split("RESULT", 1)[1])
    for name, model in {"dense": dense_pth[1], "moe": moe}.items():
        got = loaded[str(folders[name])]
        with torch.no_grad():
            ours = model(input_ids=ids).logits
        assert got["diff"] == 0.0  # the folder and the .pth, loaded side by side in a fresh offline process
        print(f"{name}: max |logit diff| across processes {(torch.tensor(got['logits']) - ours).abs().max().item()}")
        assert (torch.tensor(got["logits"]) - ours).abs().max().item() <= 1e-5  # across processes: float noise
        assert got["generate"] == model.generate(ids[:1], max_new_tokens=12, do_sample=False)[0].tolist()
        assert got["class"].startswith("transformers_modules.") and got["class"].endswith(".model.Transformer")
        assert (got["pad"], got["eos"]) == (0, 2)
        assert got["chat"] == "<s>user\nhi</s>\n<s>assistant\n"


def check_llama_folder(folder, ours):
    from transformers import LlamaForCausalLM
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in config
    assert not (folder / "model.py").exists()
    llama = LlamaForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(3, ours.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (llama(input_ids=ids).logits - ours(input_ids=ids).logits).abs().max().item()
    assert diff <= 1e-4
    prompt = ids[:1, :10]
    assert llama.generate(prompt, max_new_tokens=16, do_sample=False).tolist() == \
        ours.generate(prompt, max_new_tokens=16, do_sample=False).tolist()
    return diff


def test_export_llama_matches(tmp_path, dense_pth, tokenizer_dir):
    export_model = load_script("export_model.py")
    out = tmp_path / "llama"
    reported = export_model.main(["--model", str(dense_pth[0]), "--tokenizer", str(tokenizer_dir),
                                  "--out", str(out), "--format", "llama"])
    assert reported <= 1e-4
    diff = check_llama_folder(out, dense_pth[1])
    print(f"llama export: max |logit diff| {diff:.3g}")


def test_export_v1_pth_without_sidecar(tmp_path, tokenizer, tokenizer_dir):
    """A published-style .pth: seed key names, torch.compile prefix, no JSON sidecar, 16 heads (the default)."""
    model = tiny_model(len(tokenizer), seed=3, n_heads=16, n_kv_heads=8)
    path = tmp_path / "full_sft_512.pth"
    torch.save({"_orig_mod." + k: v for k, v in model.state_dict().items()}, path)
    assert not path.with_suffix(".json").exists()
    export_model = load_script("export_model.py")
    out = tmp_path / "llama_v1"
    export_model.main(["--model", str(path), "--tokenizer", str(tokenizer_dir), "--out", str(out),
                       "--format", "llama", "--dim", "64", "--n_layers", "2"])
    check_llama_folder(out, model)


def test_export_llama_refuses_moe(tmp_path, tokenizer, tokenizer_dir):
    path = tmp_path / "moe.pth"
    save_weights(tiny_model(len(tokenizer), use_moe=True), path)
    export_model = load_script("export_model.py")
    out = tmp_path / "llama_moe"
    with pytest.raises(SystemExit) as e:
        export_model.main(["--model", str(path), "--tokenizer", str(tokenizer_dir), "--out", str(out),
                           "--format", "llama"])
    message = str(e.value)
    assert "mixture-of-experts" in message and "--format transformers" in message and "\n" not in message
    assert not out.exists()
    keep = tmp_path / "not_an_export"  # a folder of other things is never replaced
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="refusing to replace"):
        export_model.main(["--model", str(path), "--tokenizer", str(tokenizer_dir), "--out", str(keep)])
    assert (keep / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------------------
# chat and continuation scripts


def answers(stdout):
    return [line for line in stdout.splitlines() if line.startswith("A: ")]


@pytest.mark.slow  # the script as a process
def test_chat_script_answers_every_demo_question(dense_pth, tokenizer, tokenizer_dir):
    proc = run_script(["2-eval.py", "--model", dense_pth[0], "--tokenizer", tokenizer_dir, "--max_new_tokens", 8,
                       "--temperature", 0, "--device", "cpu"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    chat = load_script("2-eval.py")
    questions = [line[3:] for line in proc.stdout.splitlines() if line.startswith("Q: ")]
    assert questions == chat.DEMO_QUESTIONS
    assert len(answers(proc.stdout)) == len(chat.DEMO_QUESTIONS)
    # greedy: the streamed answer is what transformers' generate gives for the same chat prompt
    prompt = chat_input_ids(tokenizer, [{"role": "user", "content": chat.DEMO_QUESTIONS[0]}], 400)
    greedy = dense_pth[1].generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt):]
    first = proc.stdout.split("\nA: ", 1)[1].split("\n\nQ: ", 1)[0]
    assert first == tokenizer.decode(greedy, skip_special_tokens=True)


@pytest.mark.slow  # the script as a process
def test_pretrain_script_continues_prompts_from_file(tmp_path, dense_pth, tokenizer_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("长江是\n\nThe river\n", encoding="utf-8")
    proc = run_script(["0-eval_pretrain.py", "--model", dense_pth[0], "--tokenizer", tokenizer_dir,
                       "--max_new_tokens", 8, "--prompts", prompts, "--device", "cpu"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert answers(proc.stdout)[0].startswith("A: 长江是") and answers(proc.stdout)[1].startswith("A: The river")
    assert len(answers(proc.stdout)) == 2


def test_chat_history_keeps_earlier_turns(tmp_path, monkeypatch, capsys, dense_pth, tokenizer, tokenizer_dir):
    chat = load_script("2-eval.py")
    seen = []

    class FakeEngine:  # records each prompt the script builds and answers 回答1, 回答2, ...
        def __init__(self, model, tok):
            self.tok = tok

        def stream(self, input_ids, **sampling):
            seen.append(self.tok.decode(input_ids))
            yield f"回答{len(seen)}"

    monkeypatch.setattr(chat, "Engine", FakeEngine)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "第一问"}\n{"question": "第二问"}\n', encoding="utf-8")
    args = ["--model", str(dense_pth[0]), "--tokenizer", str(tokenizer_dir), "--prompts", str(prompts),
            "--device", "cpu"]
    chat.main(args + ["--history"])
    assert seen[1] == "<s>user\n第一问</s>\n<s>assistant\n回答1</s>\n<s>user\n第二问</s>\n<s>assistant\n"
    seen.clear()
    chat.main(args)  # without --history every question stands alone
    assert seen[1] == "<s>user\n第二问</s>\n<s>assistant\n"
    seen.clear()
    monkeypatch.setattr(sys, "stdin", io.StringIO("你好\n\n再见\nexit\n不会被问\n"))
    chat.main(args[:4] + ["--interactive", "--history"])
    assert len(seen) == 2 and seen[1].endswith("回答1</s>\n<s>user\n再见</s>\n<s>assistant\n")
    assert "A: 回答2" in capsys.readouterr().out


def test_chat_script_runs_the_demo_tools_and_shows_thinking_apart(tmp_path, monkeypatch, capsys, dense_pth,
                                                                 tokenizer_dir):
    chat = load_script("2-eval.py")
    seen, replies = [], ['<tool_call>{"name": "calculate", "arguments": {"expression": "12*7"}}</tool_call>',
                         "12*7等于84。", "<think>先想一想</think>\n答案。"]

    class ScriptedEngine:  # answers in the chat format, as a model that learned tools and thinking would
        def __init__(self, model, tok):
            self.tok = tok

        def stream(self, input_ids, **sampling):
            seen.append(self.tok.decode(input_ids))
            text = replies[len(seen) - 1]
            yield from (text[i:i + 3] for i in range(0, len(text), 3))  # deltas that cut the markers

    monkeypatch.setattr(chat, "Engine", ScriptedEngine)
    (tmp_path / "manifest.json").write_text('{"seed": 3, "params": {"n_entities": 64}}', encoding="utf-8")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("12*7等于多少？\n两步的问题\n", encoding="utf-8")
    chat.main(["--model", str(dense_pth[0]), "--tokenizer", str(tokenizer_dir), "--prompts", str(prompts),
               "--device", "cpu", "--tools", str(tmp_path)])
    out = capsys.readouterr().out
    assert '🔧 calculate({"expression": "12*7"})\n   → 84\nA: 12*7等于84。\n' in out
    assert "💭 先想一想\nA: 答案。\n" in out
    assert "<tools>\nlookup(name)" in seen[0] and seen[1].endswith("<s>tool\n84</s>\n<s>assistant\n")


def test_chat_prompt_drops_oldest_turns_first(tokenizer):
    messages = [{"role": "system", "content": "系统"}, {"role": "user", "content": "第一问" * 20},
                {"role": "assistant", "content": "第一答" * 20}, {"role": "user", "content": "第二问"},
                {"role": "assistant", "content": "第二答"}, {"role": "user", "content": "最后的问题"}]
    everything = tokenizer.decode(chat_input_ids(tokenizer, messages, 10_000))
    assert everything.startswith("系统<s>user\n第一问") and everything.endswith("最后的问题</s>\n<s>assistant\n")
    keep_last_two = len(chat_input_ids(tokenizer, messages[:1] + messages[3:], 10_000))
    trimmed = tokenizer.decode(chat_input_ids(tokenizer, messages, keep_last_two))
    assert trimmed == "系统<s>user\n第二问</s>\n<s>assistant\n第二答</s>\n<s>user\n最后的问题</s>\n<s>assistant\n"
    alone = chat_input_ids(tokenizer, [{"role": "user", "content": "很长的问题" * 50}], 30)
    assert len(alone) == 30 and tokenizer.decode(alone).endswith("</s>\n<s>assistant\n")


@pytest.mark.parametrize("script,default,stage", [("2-eval.py", "full_sft_512.pth", "3-full_sft.py"),
                                                  ("0-eval_pretrain.py", "pretrain_512.pth", "1-pretrain.py"),
                                                  ("eval_ceval.py", "full_sft_512.pth", "3-full_sft.py")])
def test_missing_model_names_the_stage(tmp_path, monkeypatch, ceval_dir, script, default, stage):
    monkeypatch.chdir(tmp_path)  # the default out/... path does not exist here
    extra = ["--data_dir", str(ceval_dir)] if script == "eval_ceval.py" else []
    with pytest.raises(SystemExit) as e:
        load_script(script).main(extra)
    message = str(e.value)
    assert f"out/{default}" in message and f"python {stage}" in message and "\n" not in message
