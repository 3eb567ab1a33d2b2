"""What the engine, API and fuzz tests share: the tiny chat model as fixtures, prompts, a server process, and
waiting on a condition (a counter, a state) rather than on the clock."""
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

import httpx
import pytest
from transformers import AutoTokenizer

import tiny_chat_model as tiny
from model.checkpoint import load_model
from model.engine import Engine
from model.sampling import SamplingParams

ROOT = tiny.ROOT
HELLO = [{"role": "user", "content": tiny.CONVERSATIONS[0][0]}]
HANG_GUARD_S = 900  # only a hung process takes this long: waits end on their condition, not on a time limit


def wait_until(condition, what):
    """Return the first truthy value of condition(), checked every 20 ms; fail only if nothing changes for
    the hang guard (a stalled or crashed process), never because a machine is slow."""
    stop = time.monotonic() + HANG_GUARD_S
    while not (value := condition()):
        if time.monotonic() > stop:
            raise AssertionError(f"{what}: still not true after {HANG_GUARD_S} s, the process seems hung")
        time.sleep(0.02)
    return value


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return tiny.build_once(tmp_path_factory)


@pytest.fixture(scope="module")
def tokenizer(paths):
    return AutoTokenizer.from_pretrained(paths[1])


@pytest.fixture(scope="module")
def engine(paths, tokenizer):
    return Engine(load_model(paths[0]), tokenizer, max_batch=4)


def questions(n):
    base = [q for q, _ in tiny.CONVERSATIONS]
    return [[{"role": "user", "content": base[i % len(base)] + ("" if i < len(base) else f" {i}")}] for i in range(n)]


def solo(engine, messages, **kw):
    """What the request gives alone, in this process."""
    return engine.complete(messages, SamplingParams(temperature=0, **kw))


def start_process(cmd, port, env=None):
    """A server process on 127.0.0.1:port, its output in a temporary file (proc.log); returns (proc, url)."""
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a pipe nobody reads can block the server
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log, proc.port = log, port
    return proc, f"http://127.0.0.1:{port}"


def start_server(paths, *extra):
    """my_openai_api.py on the tiny model at `paths` (model, tokenizer); returns (proc, url) at once."""
    port = tiny.free_port()
    cmd = [sys.executable, "my_openai_api.py", "--model", str(paths[0]), "--tokenizer", str(paths[1]),
           "--port", str(port), "--threads", "1", *extra]
    return start_process(cmd, port, env={**os.environ, "MINIMIND_API_KEY": ""})


def wait_healthy(proc, url, path="/health", ok=lambda r: r.status_code == 200):
    """Wait until `url + path` answers as `ok` says; a process that exits first fails with its log."""
    def healthy():
        if proc.poll() is not None:
            proc.log.seek(0)
            raise RuntimeError(f"server exited with {proc.returncode}:\n{proc.log.read()}")
        try:
            return ok(httpx.get(url + path, timeout=30))
        except httpx.HTTPError:
            return False
    wait_until(healthy, f"the server answers {path}")


def stop(proc, grace_s=30):
    """Terminate a server process; kill it if it has not ended within grace_s."""
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()


@contextmanager
def live_server(paths, *extra):
    """start_server, yielding (proc, url) once it answers /health, and stopped on leaving."""
    proc, url = start_server(paths, *extra)
    try:
        wait_healthy(proc, url)
        yield proc, url
    finally:
        stop(proc)
