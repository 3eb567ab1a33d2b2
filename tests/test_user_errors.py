"""What users get wrong, fed to every script: missing, corrupt, malicious or mismatched model files, unwritable
output folders, torn metrics and training states, invalid Unicode. Each answer is one line on stderr that names
the file (and line) or the field; nothing in a file runs, and no raw data or finished weights are lost.

Most cases run the script in this process with runpy, exactly as `python SCRIPT ARGS` would run its __main__
block (minus the interpreter start-up, which would cost seconds per case); the cases that need a process of
their own (a kill, a folder made unwritable while a run writes to it) start one."""
import contextlib
import hashlib
import io
import json
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "model" / "minimind_tokenizer"
TINY = ["--dim", "32", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2"]
TRAIN = ["--device", "cpu", "--dtype", "float32", "--max_seq_len", "64", "--batch_size", "4", "--log_interval", "1"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


PROGRESS_BAR = re.compile(r"\|\s*\d+/\d+ \[")  # a tqdm line such as "Loading: 100%|###| 20/20 [00:00<...]"


def run_script(script, *args):
    """(exit code, stdout, stderr) of `python script args`, run in this process."""
    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_path = sys.argv, list(sys.path)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        sys.argv = [str(ROOT / script), *map(str, args)]
        sys.path.insert(0, str(ROOT))
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as e:
        if isinstance(e.code, str):  # sys.exit("message"): the interpreter would print it on stderr
            err.write(e.code + "\n")
            code = 1
        else:
            code = e.code or 0
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        for s, h in handlers.items():
            signal.signal(s, h)
    return code, out.getvalue(), err.getvalue()


def error_line(result):
    """The one line a failed run printed (warnings from libraries aside), checked to be exactly one."""
    code, out, err = result
    lines = [l for l in err.splitlines() if l.strip() and "Warning" not in l and not l.startswith("  warnings.warn")
             and not PROGRESS_BAR.search(l)]
    assert code != 0, f"exit code 0; stdout:\n{out}\nstderr:\n{err}"
    assert len(lines) == 1, f"{len(lines)} lines:\n{err}"
    assert lines[0].startswith("error"), lines[0]
    assert "Traceback" not in err
    return lines[0]


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class Payload:
    """Pickled, it would run a shell command that leaves a marker file behind."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ---------------------------------------------------------------- bad files


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A good tiny model and every kind of bad model file next to it."""
    from model.checkpoint import save_weights
    from model.LMConfig import LMConfig
    from model.model import Transformer
    d = tmp_path_factory.mktemp("bad_files")
    torch.manual_seed(0)
    good = d / "good.pth"
    save_weights(Transformer(LMConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)), good)
    f = {"dir": d, "good": good, "marker": d / "PAYLOAD_RAN"}

    def pair(name, pth_bytes=None, sidecar=None):
        pth = d / f"{name}.pth"
        pth.write_bytes(good.read_bytes() if pth_bytes is None else pth_bytes)
        if sidecar is not None:
            pth.with_suffix(".json").write_text(sidecar)
        f[name] = pth

    pair("corrupt", good.read_bytes()[:3000])
    torch.save({"tok_embeddings.weight": torch.zeros(2, 2), "x": Payload(f["marker"])}, d / "evil.pth")
    f["evil"] = d / "evil.pth"
    config = json.loads(good.with_suffix(".json").read_text())
    pair("mismatch", sidecar=json.dumps({**config, "dim": 64}))
    pair("bad_sidecar", sidecar='{"dim": 32, "n_layers": ')
    torch.save([1, 2, 3], d / "not_a_state.pth")
    f["not_a_state"] = d / "not_a_state.pth"
    small = Transformer(LMConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, max_seq_len=64))
    save_weights(small, d / "small_vocab.pth")
    f["small_vocab"] = d / "small_vocab.pth"
    (d / "no_config_folder").mkdir()
    f["no_config_folder"] = d / "no_config_folder"
    broken = d / "broken_tokenizer"
    shutil.copytree(TOKENIZER, broken)
    (broken / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": ')
    f["broken_tokenizer"] = broken
    blocker = d / "a_file"
    blocker.write_text("not a folder\n")
    f["unwritable"] = blocker / "out"  # a folder that cannot be made: its parent is a file
    (d / "ceval").mkdir()
    (d / "ceval" / "x_val.csv").write_text("id,question,A,B,C,D,answer\n0,1+1=?,1,2,3,4,B\n")
    return f


# (case, what the error must name) for a --model argument: key of `files` or a path
MODEL_CASES = [
    ("missing", "nothing.pth"),
    ("corrupt", "corrupt.pth"),
    ("evil", "evil.pth"),
    ("mismatch", "mismatch.pth"),
    ("bad_sidecar", "bad_sidecar.json"),
    ("not_a_state", "not_a_state.pth"),
    ("no_config_folder", "no_config_folder"),
    ("small_vocab", "minimind_tokenizer"),
]
MODEL_SCRIPTS = {
    "0-eval_pretrain.py": ["--max_new_tokens", "2"],
    "2-eval.py": ["--max_new_tokens", "2"],
    "eval_ceval.py": ["--data_dir", "{dir}/ceval", "--out_dir", "{dir}/ceval_out"],
    "export_model.py": ["--out", "{dir}/export_out"],
    "my_openai_api.py": ["--port", "1"],
}


def model_path(files, case):
    return files["dir"] / "nothing.pth" if case == "missing" else files[case]


@pytest.mark.parametrize("script", MODEL_SCRIPTS)
@pytest.mark.parametrize("case,named", MODEL_CASES, ids=[c for c, _ in MODEL_CASES])
def test_inference_scripts_and_server_name_the_bad_model_file(files, script, case, named):
    extra = [a.format(dir=files["dir"]) for a in MODEL_SCRIPTS[script]]
    line = error_line(run_script(script, "--model", model_path(files, case), "--device", "cpu", *extra))
    assert named in line
    if case == "mismatch":
        assert "dim" in line
    if case == "evil":
        assert "could run code" in line
    assert not files["marker"].exists(), "a pickled payload ran"


@pytest.mark.parametrize("script", ["0-eval_pretrain.py", "my_openai_api.py", "export_model.py"])
def test_a_broken_tokenizer_folder_is_named(files, script):
    extra = [a.format(dir=files["dir"]) for a in MODEL_SCRIPTS[script]]
    line = error_line(run_script(script, "--model", files["good"], "--tokenizer", files["broken_tokenizer"],
                                 "--device", "cpu", *extra))
    assert "broken_tokenizer" in line


@pytest.mark.parametrize("script,data", [("3-full_sft.py", "sft_single.jsonl"), ("5-dpo_train.py", "dpo.jsonl"),
                                         ("4-lora_sft.py", "lora_identity.jsonl"), ("1-pretrain.py", "pretrain.jsonl")])
@pytest.mark.parametrize("case,named", MODEL_CASES[1:6], ids=[c for c, _ in MODEL_CASES[1:6]])
def test_training_scripts_name_the_bad_init_checkpoint(files, demo, script, data, case, named):
    line = error_line(run_script(script, *TRAIN, "--data_path", demo / data, "--init", model_path(files, case),
                                 "--out_dir", files["dir"] / "train_out"))
    assert named in line
    assert not files["marker"].exists(), "a pickled payload ran"


def test_training_names_a_broken_tokenizer_folder(files, demo):
    line = error_line(run_script("1-pretrain.py", *TINY, *TRAIN, "--data_path", demo / "pretrain.jsonl",
                                 "--tokenizer", files["broken_tokenizer"], "--out_dir", files["dir"] / "train_out"))
    assert "broken_tokenizer" in line


# ---------------------------------------------------------------- unwritable output folders


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    code, _, err = run_script("data_process.py", "demo", "--out", out)
    assert code == 0, err
    return out


def test_unwritable_output_folders_are_named(files, demo):
    blocked = files["unwritable"]
    cases = [
        ("1-pretrain.py", *TINY, *TRAIN, "--data_path", demo / "pretrain.jsonl", "--out_dir", blocked),
        ("eval_ceval.py", "--model", files["good"], "--data_dir", demo / "ceval", "--out_dir", blocked, "--limit", "1"),
        ("export_model.py", "--model", files["good"], "--out", blocked / "export"),
        ("data_process.py", "pretrain", "--input", demo / "pretrain.jsonl", "--output", blocked / "p.jsonl", "--quiet"),
        ("data_process.py", "demo", "--out", blocked / "demo"),
        ("train_tokenizer.py", "--data_path", demo / "tokenizer.jsonl", "--out_dir", blocked / "tok"),
    ]
    for script, *args in cases:
        line = error_line(run_script(script, *args))
        assert str(blocked) in line, (script, line)


def make_unwritable(folder):
    """Make a folder refuse writes, whoever we are (root ignores permission bits); returns the undo."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return lambda: folder.chmod(0o755)
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
        return lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)  # immutable: not even root adds files
    # root without the immutable attribute (a container without CAP_LINUX_IMMUTABLE): a file in the folder's
    # place refuses every write in it just the same
    moved = folder.with_name(folder.name + ".moved")
    folder.rename(moved)
    folder.write_text("")

    def undo():
        folder.unlink()
        moved.rename(folder)
    return undo


@pytest.mark.slow  # a training process
def test_folder_made_unwritable_mid_run_is_one_line_and_keeps_the_states(demo, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "1-pretrain.py", *TINY, *TRAIN, "--data_path", str(demo / "pretrain.jsonl"),
           "--out_dir", str(out), "--max_steps", "400", "--save_interval", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # wait until a state has been saved (step 2) and training goes on
        if " step 3/" in line:
            break
    state_before = sha(out / "pretrain_32.state.pt")
    undo = make_unwritable(out)
    try:
        stdout, stderr = proc.communicate(timeout=1800)
    finally:
        undo()
    line = error_line((proc.returncode, stdout, stderr))
    assert "cannot write" in line and str(out) in line and "--resume" in line
    assert sha(out / "pretrain_32.state.pt") == state_before  # the last good state is intact
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow  # a server process
def test_server_process_with_a_corrupt_model_says_one_line(files):
    proc = subprocess.run([sys.executable, "my_openai_api.py", "--model", str(files["corrupt"]), "--device", "cpu"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=1800)
    assert str(files["corrupt"]) in error_line((proc.returncode, proc.stdout, proc.stderr))


# ---------------------------------------------------------------- resume: torn and malicious states


@pytest.fixture(scope="module")
def trained(demo, tmp_path_factory):
    """A finished 4-step run with states at steps 2 and 4."""
    out = tmp_path_factory.mktemp("trained")
    code, _, err = run_script("1-pretrain.py", *TINY, *TRAIN, "--data_path", demo / "pretrain.jsonl",
                              "--out_dir", out, "--max_steps", "4", "--save_interval", "2")
    assert code == 0, err
    return out


def resume(demo, out, *extra):
    return run_script("1-pretrain.py", *TINY, *TRAIN, "--data_path", demo / "pretrain.jsonl", "--out_dir", out,
                      "--max_steps", "5", "--save_interval", "2", "--resume", *extra)


def copy_run(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


def test_unreadable_states_stop_resume_and_keep_the_weights(demo, trained, tmp_path):
    out = copy_run(trained, tmp_path)
    for name in ("pretrain_32.state.pt", "pretrain_32.state.prev.pt"):
        (out / name).write_bytes((out / name).read_bytes()[:1000])
    weights = sha(out / "pretrain_32.pth")
    line = error_line(resume(demo, out))
    assert "pretrain_32.state.pt" in line and "pretrain_32.state.prev.pt" in line and "--fresh" in line
    assert sha(out / "pretrain_32.pth") == weights, "the finished weights were overwritten"
    code, stdout, err = resume(demo, out, "--fresh")  # the way out the message names
    assert code == 0, err
    assert "step 5/5" in stdout and sha(out / "pretrain_32.pth") != weights


def test_weights_without_state_are_not_replaced_by_resume(demo, trained, tmp_path):
    out = copy_run(trained, tmp_path)
    for name in ("pretrain_32.state.pt", "pretrain_32.state.prev.pt"):
        (out / name).unlink()
    weights = sha(out / "pretrain_32.pth")
    line = error_line(resume(demo, out))
    assert "pretrain_32.pth exists" in line and "--fresh" in line
    assert sha(out / "pretrain_32.pth") == weights


def test_a_malicious_state_file_does_not_run(demo, trained, tmp_path):
    out = copy_run(trained, tmp_path)
    marker = tmp_path / "PAYLOAD_RAN"
    torch.save({"format": "minimind-train-state-2", "step": Payload(marker)}, out / "pretrain_32.state.pt")
    (out / "pretrain_32.state.prev.pt").unlink()
    line = error_line(resume(demo, out))
    assert "pretrain_32.state.pt" in line and "could run code" in line
    assert not marker.exists(), "the pickled payload ran"


def test_a_torn_metrics_line_is_skipped_and_reported(demo, trained, tmp_path):
    out = copy_run(trained, tmp_path)
    metrics = out / "pretrain_32.metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 5, "loss": 7.')  # a run killed while writing its line
    code, stdout, err = resume(demo, out)
    assert code == 0, err
    assert f"{metrics}:5: skipped a torn line" in stdout
    steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


# ---------------------------------------------------------------- invalid Unicode and wrong kinds of paths


def write(path, data: bytes):
    path.write_bytes(data)
    return path


LONE = b'\\ud800'  # a JSON escape for half a UTF-16 pair: valid JSON, not text


def test_invalid_unicode_in_every_input_names_file_and_line(files, demo, tmp_path):
    ok_text = '{"text": "长江是中国第一长河。"}\n'.encode()
    lone = write(tmp_path / "lone.jsonl", ok_text + b'{"text": "bad ' + LONE + b' here"}\n')
    bad_utf8 = write(tmp_path / "bad_utf8.jsonl", ok_text + b'{"text": "bad \xff\xfe here"}\n')
    sft = write(tmp_path / "sft.jsonl", b'{"conversations": [{"role": "user", "content": "q"}, '
                                        b'{"role": "assistant", "content": "a ' + LONE + b'"}]}\n')
    prompts = write(tmp_path / "prompts.txt", "第一个问题\n".encode() + b"bad \xff prompt\n")
    json_prompts = write(tmp_path / "prompts.jsonl", b'{"prompt": "ok"}\n{"prompt": "bad ' + LONE + b'"}\n')
    ceval = tmp_path / "ceval"
    ceval.mkdir()
    write(ceval / "x_val.csv", b"id,question,A,B,C,D,answer\n0,q,a,b,c,d,A\n1,bad \xff q,a,b,c,d,B\n")
    model = ["--model", files["good"], "--device", "cpu", "--max_new_tokens", "2"]
    cases = [
        (("data_process.py", "pretrain", "--input", lone, "--output", tmp_path / "o1.jsonl", "--quiet"),
         f"{lone}:2", "'text'"),
        (("data_process.py", "sft", "--input", sft, "--output", tmp_path / "o2.jsonl", "--quiet", "--min_q_chars",
          "0", "--min_a_chars", "0", "--min_chinese_ratio", "0"), f"{sft}:1", "conversations[1].content"),
        (("data_process.py", "pretrain", "--input", bad_utf8, "--output", tmp_path / "o3.jsonl", "--quiet"),
         f"{bad_utf8}:2", "UTF-8"),
        (("1-pretrain.py", *TINY, *TRAIN, "--data_path", bad_utf8, "--out_dir", tmp_path / "t2"), f"{bad_utf8}:2",
         "UTF"),
        (("0-eval_pretrain.py", *model, "--prompts", prompts), f"{prompts}:2", "UTF-8"),
        (("2-eval.py", *model, "--prompts", json_prompts), f"{json_prompts}:2", "surrogate"),
        (("eval_ceval.py", "--model", files["good"], "--data_dir", ceval, "--out_dir", tmp_path / "c"),
         f"{ceval / 'x_val.csv'}:3", "UTF-8"),
        (("train_tokenizer.py", "--data_path", lone, "--out_dir", tmp_path / "tok"), f"{lone}:2", "surrogate"),
        (("train_tokenizer.py", "--data_path", bad_utf8, "--out_dir", tmp_path / "tok"), f"{bad_utf8}:2", "utf-8"),
    ]
    for (script, *args), *named in cases:
        line = error_line(run_script(script, *args))
        for n in named:
            assert n.lower() in line.lower(), (script, line)


def test_training_data_with_a_lone_surrogate_names_file_and_line(files, tmp_path):
    """A JSON escape for half a character in a training file is named by file and line, not a tokenizer crash."""
    ok_text = '{"text": "长江是中国第一长河。"}\n'.encode()
    lone = write(tmp_path / "lone.jsonl", ok_text + b'{"text": "bad ' + LONE + b' here"}\n')
    sft = write(tmp_path / "sft.jsonl", b'{"conversations": [{"role": "user", "content": "q"}, '
                                        b'{"role": "assistant", "content": "a ' + LONE + b'"}]}\n')
    for (script, *args), where in [
            (("1-pretrain.py", *TINY, *TRAIN, "--data_path", lone, "--out_dir", tmp_path / "t1"), f"{lone}:2"),
            (("3-full_sft.py", *TRAIN, "--init", files["good"], "--data_path", sft, "--out_dir", tmp_path / "t3"),
             f"{sft}:1")]:
        line = error_line(run_script(script, *args))
        assert where in line and "lone surrogate" in line, (script, line)


def test_data_converter_never_overwrites_its_input(tmp_path):
    raw = write(tmp_path / "raw.jsonl", b'{"text": "a"}\n{"text": "bb"}\n{"text": "' + b"x" * 600 + b'"}\n')
    before = sha(raw)
    (tmp_path / "link.jsonl").symlink_to(raw)
    os.link(raw, tmp_path / "hard.jsonl")
    (tmp_path / "folder").mkdir()
    for output in (raw, tmp_path / "link.jsonl", tmp_path / "hard.jsonl"):
        line = error_line(run_script("data_process.py", "pretrain", "--input", raw, "--output", output, "--quiet"))
        assert "is the input file" in line and str(output) in line
    line = error_line(run_script("data_process.py", "pretrain", "--input", raw, "--output", tmp_path / "folder"))
    assert "is a folder" in line and "--output" in line
    line = error_line(run_script("data_process.py", "sft", "--input", tmp_path / "folder", "--output", tmp_path / "o"))
    assert "is a folder" in line and "--input" in line
    assert sha(raw) == before


def test_an_empty_result_is_an_error_unless_allowed(tmp_path):
    empty = write(tmp_path / "empty.jsonl", b"")
    all_dropped = write(tmp_path / "long.jsonl", b'{"text": "' + b"x" * 600 + b'"}\n')
    for raw in (empty, all_dropped):
        out = tmp_path / f"{raw.stem}.out.jsonl"
        line = error_line(run_script("data_process.py", "pretrain", "--input", raw, "--output", out, "--quiet"))
        assert str(raw) in line and "--allow-empty" in line and not out.exists()
        code, _, err = run_script("data_process.py", "pretrain", "--input", raw, "--output", out, "--quiet",
                                  "--allow-empty")
        assert code == 0, err
        assert out.read_text() == ""
    assert "longer_than_512_chars: 1" in error_line(
        run_script("data_process.py", "pretrain", "--input", all_dropped, "--output", tmp_path / "x.jsonl"))


def test_chat_client_rejects_undecodable_text_and_a_dead_server():
    undecodable = b"bad \xff".decode("utf-8", "surrogateescape")  # what Python makes of such command-line bytes
    assert "--once" in error_line(run_script("chat_openai_api.py", "--once", undecodable))
    line = error_line(run_script("chat_openai_api.py", "--once", "hi", "--base-url", "http://127.0.0.1:9/v1"))
    assert "http://127.0.0.1:9/v1" in line
