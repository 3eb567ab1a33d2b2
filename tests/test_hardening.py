"""Hardening of the serving and training code, in this process: one failing request never touches the others in
its batch, sampling stays finite at every accepted boundary, the event loop answers /health while a maximal
request is tokenized, the docs need the API key, model names, body-size limit, training-state round trip and
the permissions of written files."""
import json
import os
import pickle
import random
import runpy
import threading
import time

import httpx
import numpy as np
import pytest
import torch
import uvicorn

import tiny_chat_model as tiny
from model import engine as engine_module
from model.checkpoint import load_model, load_tensors, save_weights
from model.engine import Engine
from model.sampling import SamplingParams, sample_token, sampling_probs
from model.scheduler import Scheduler
from my_openai_api import create_app
from serving_helpers import HANG_GUARD_S, HELLO, paths, tokenizer, wait_until  # noqa: F401  (the tiny model)
from test_user_errors import Payload


@pytest.fixture(scope="module")
def model(paths):
    return load_model(paths[0])


def questions(n):
    base = [q for q, _ in tiny.CONVERSATIONS]
    return [[{"role": "user", "content": base[i % len(base)]}] for i in range(n)]


# ---------------------------------------------------------------- sampling at the boundaries


EXTREME_LOGITS = [torch.tensor([3e38, -3e38, 0.0, 1.0]), torch.tensor([1e-30, 2e-30, 0.0, -1e-30]),
                  torch.tensor([float("inf"), 1.0, 0.0, float("-inf")]), torch.full((4,), -1e30)]


@pytest.mark.parametrize("params", [
    dict(temperature=1e-300), dict(temperature=5e-324), dict(temperature=2.0), dict(temperature=1, top_p=1e-300),
    dict(temperature=1, repetition_penalty=1e-300), dict(temperature=1e-300, repetition_penalty=1e-300),
    dict(temperature=2, repetition_penalty=10, top_k=1), dict(temperature=0.7, top_k=10 ** 30, top_p=1.0),
], ids=str)
def test_sampling_is_finite_at_every_accepted_boundary(params):
    p = SamplingParams(**params)
    seen = torch.tensor([True, False, True, False])
    g = torch.Generator().manual_seed(0)
    for logits in EXTREME_LOGITS:
        probs = sampling_probs(logits, p, seen)
        assert torch.isfinite(probs).all() and (probs >= 0).all() and abs(float(probs.sum()) - 1) < 1e-9
        token = sample_token(logits, p, g, seen)
        assert probs[token] > 0
    # a tiny temperature is (near-)greedy: the best token takes all the mass
    assert sampling_probs(torch.tensor([1.0, 3.0, 2.0]), SamplingParams(temperature=1e-300)).tolist() == [0, 1, 0]


def test_nan_logits_fail_the_request_not_the_process():
    with pytest.raises(FloatingPointError):
        sample_token(torch.tensor([0.0, float("nan")]), SamplingParams(temperature=1))
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=2 ** 70)


# ---------------------------------------------------------------- one failing request in a real batch


def run_together(sched, prompts, params):
    """Submit everything at once (the scheduler admits them together) and wait on events until every request
    has finished; the requests."""
    done = [threading.Event() for _ in prompts]
    with sched.cond:  # held: the scheduler thread cannot pick up the first before the last is queued
        reqs = [sched.submit(p, q, lambda d, f, e=e: f and e.set()) for p, q, e in zip(prompts, params, done)]
    for e in done:
        assert e.wait(HANG_GUARD_S), "a request never finished"
    return reqs


def test_a_request_failing_mid_batch_fails_alone(model, tokenizer, monkeypatch):
    engine = Engine(model, tokenizer, max_batch=8)
    prompts = questions(6)
    params = [SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True) for _ in prompts]
    alone = [engine.complete(p, q).token_ids for p, q in zip(prompts, params)]
    completed_alone = engine.counters["completed"]
    params[2] = SamplingParams(temperature=0.5, seed=666, max_new_tokens=24, ignore_eos=True)  # the one to fail
    real_sample, seen = engine_module.sample_token, {"calls": 0, "batch": 0}

    def flaky(logits, p, generator=None, mask=None):
        if p.seed == 666:
            seen["calls"] += 1
            if seen["calls"] == 4:  # its fourth token: the others are mid-answer in the same batch
                seen["batch"] = len(engine.active)
                raise RuntimeError("injected sampling failure")
        return real_sample(logits, p, generator, mask)

    monkeypatch.setattr(engine_module, "sample_token", flaky)
    sched = Scheduler(engine, threads=1)
    try:
        reqs = run_together(sched, prompts, params)
        stats = sched.stats()
    finally:
        sched.close()
    assert seen["batch"] == 6, "the failure did not happen inside the full batch"
    assert reqs[2].finish_reason == "error" and reqs[2].n_generated == 3
    for i, r in enumerate(reqs):
        if i != 2:
            assert r.finish_reason == "length" and r.token_ids == alone[i], i
    assert stats["failed"] == 1 and stats["active"] == 0 and stats["completed"] - completed_alone == 5


def test_a_prefill_failure_fails_only_its_request(model, tokenizer, monkeypatch):
    engine = Engine(model, tokenizer, max_batch=8)
    poison = 4321  # a token id no chat prompt holds; the wrapped model refuses any prompt containing it
    prompts = questions(3) + [[3, 4, poison, 5]]
    params = [SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)] * 4
    alone = [engine.complete(p, q).token_ids for p, q in zip(prompts[:3], params)]
    real_model, calls = engine.model, []

    def refusing(ids, **kw):
        calls.append(ids.shape[0])
        if (ids == poison).any():
            raise RuntimeError("injected prefill failure")
        return real_model(ids, **kw)

    monkeypatch.setattr(engine, "model", refusing)
    sched = Scheduler(engine, threads=1)
    try:
        reqs = run_together(sched, prompts, params)
    finally:
        sched.close()
    assert calls[0] == 4, "the four prompts were not prefilled together first"
    assert reqs[3].finish_reason == "error"
    assert [r.token_ids for r in reqs[:3]] == alone and all(r.finish_reason == "length" for r in reqs[:3])


# ---------------------------------------------------------------- the server, in this process


class LiveServer:
    """create_app(...) served by uvicorn on a thread of this process (so a test can reach into the engine)."""

    def __init__(self, engine, **app_kwargs):
        self.scheduler = Scheduler(engine, threads=1)
        app = create_app(self.scheduler, "tiny", **app_kwargs)
        self.port = tiny.free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive(), "the server starts")
        assert self.server.started, "the server did not start"
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self):
        self.server.should_exit = True
        self.thread.join(HANG_GUARD_S)
        self.scheduler.close()


@pytest.fixture
def live(model, tokenizer):
    servers = []

    def start(max_batch=4, **kw):
        servers.append(LiveServer(Engine(model, tokenizer, max_batch=max_batch), **kw))
        return servers[-1]
    yield start
    for s in servers:
        s.close()


def test_health_answers_while_a_maximal_request_is_tokenized(live, monkeypatch):
    limit = 1 << 20
    server = live(max_body_bytes=limit)
    engine = server.scheduler.engine
    tokenizing, release, real_encode = threading.Event(), threading.Event(), engine.encode

    def slow_encode(prompt, **chat_options):  # holds the big request inside its tokenization until /health answered
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict) and len(prompt[0]["content"]) > 1000:
            tokenizing.set()
            assert release.wait(HANG_GUARD_S)
        return real_encode(prompt, **chat_options)

    monkeypatch.setattr(engine, "encode", slow_encode)
    filler = "长江是中国第一长河。"
    body = {"messages": [{"role": "user", "content": ""}], "max_tokens": 4, "temperature": 0}
    room = limit - len(json.dumps(body, ensure_ascii=False).encode())
    body["messages"][0]["content"] = (filler * (room // 30 + 1))[:room // 3]  # 3 bytes a character
    raw = json.dumps(body, ensure_ascii=False).encode()
    assert limit - 3 < len(raw) <= limit  # as large as the server takes
    result = {}
    big = threading.Thread(target=lambda: result.update(r=httpx.post(
        server.url + "/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"},
        timeout=HANG_GUARD_S)))
    probe = httpx.Client(base_url=server.url, timeout=HANG_GUARD_S)
    assert probe.get("/health").status_code == 200  # connection made before: the timing below is the answer's
    big.start()
    assert tokenizing.wait(HANG_GUARD_S)
    started = time.perf_counter()
    health = probe.get("/health")  # the loop is free: it answers while the request's tokenization waits
    latency = time.perf_counter() - started
    still_tokenizing = not release.is_set()
    release.set()
    big.join(HANG_GUARD_S)
    assert health.status_code == 200 and still_tokenizing
    assert result["r"].status_code == 200, result["r"].text
    print(f"/health answered in {latency * 1000:.1f} ms while a {len(raw)}-byte request was being tokenized")

    too_big = httpx.post(server.url + "/v1/chat/completions", content=raw + b" ",
                         headers={"Content-Type": "application/json"}, timeout=HANG_GUARD_S)
    chunked = httpx.post(server.url + "/v1/chat/completions", content=iter([raw, b" "]),  # no Content-Length
                         headers={"Content-Type": "application/json"}, timeout=HANG_GUARD_S)
    for r in (too_big, chunked):
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_docs_and_schema_need_the_key(live):
    server = live(api_key="sk-test")
    key = {"Authorization": "Bearer sk-test"}
    assert httpx.get(server.url + "/docs").status_code == 404 and httpx.get(server.url + "/redoc").status_code == 404
    r = httpx.get(server.url + "/openapi.json")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert "/v1/chat/completions" in httpx.get(server.url + "/openapi.json", headers=key).json()["paths"]
    assert httpx.get(server.url + "/health").status_code == 200
    open_server = live()
    assert httpx.get(open_server.url + "/docs").status_code == 200
    assert httpx.get(open_server.url + "/openapi.json").status_code == 200


def test_any_model_name_is_answered_unless_strict(live):
    body = {"messages": HELLO, "max_tokens": 3, "temperature": 0}
    loose, strict = live(), live(strict_model_name=True)
    assert httpx.get(loose.url + "/v1/models").json()["data"][0]["answers_any_model_name"] is True
    assert httpx.get(strict.url + "/v1/models").json()["data"][0]["answers_any_model_name"] is False
    for name in ("gpt-4o", "tiny", None):
        assert httpx.post(loose.url + "/v1/chat/completions", json={**body, "model": name}).status_code == 200
    r = httpx.post(strict.url + "/v1/chat/completions", json={**body, "model": "gpt-4o"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert r.json()["error"]["param"] == "model"
    for name in ("tiny", None):
        assert httpx.post(strict.url + "/v1/chat/completions", json={**body, "model": name}).status_code == 200
    r = httpx.post(loose.url + "/v1/chat/completions", json={**body, "model": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"


def test_an_injected_failure_over_http_fails_one_stream_alone(live, monkeypatch):
    """Four streams in flight and one request whose sampling raises: it alone gets an error."""
    server = live(max_batch=8)
    sched, engine = server.scheduler, server.scheduler.engine
    prompts = questions(4)
    alone = [engine.complete(p, temperature=0, max_new_tokens=20).text for p in prompts]
    streams_queued, all_streaming, bad_queued = threading.Event(), threading.Event(), threading.Event()
    real_sample, real_submit, queued, failed_beside = engine_module.sample_token, sched.submit, [], []

    def flaky(logits, p, generator=None, mask=None):  # runs on the scheduler thread
        if p.seed == 666:
            failed_beside.append(len(engine.active) - 1)
            raise RuntimeError("injected sampling failure")
        assert streams_queued.wait(HANG_GUARD_S)  # no stream gets ahead before all four are queued
        if len(engine.active) == 4 and not bad_queued.is_set():  # then hold them until the bad one is queued
            all_streaming.set()
            assert bad_queued.wait(HANG_GUARD_S)
        return real_sample(logits, p, generator, mask)

    def submit(prompt, params=None, on_event=None):  # runs on the server's event loop
        req = real_submit(prompt, params, on_event)
        queued.append(params.seed)
        if queued.count(None) == 4:
            streams_queued.set()
        if params.seed == 666:
            bad_queued.set()
        return req

    monkeypatch.setattr(engine_module, "sample_token", flaky)
    monkeypatch.setattr(sched, "submit", submit)
    results = {}

    def stream(i):
        body = {"messages": prompts[i], "stream": True, "temperature": 0, "max_tokens": 20}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=HANG_GUARD_S) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        chunks = [json.loads(e) for e in events if e != "[DONE]"]
        results[i] = ("".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c.get("choices")),
                      events[-1])

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    assert all_streaming.wait(HANG_GUARD_S)
    bad = httpx.post(server.url + "/v1/chat/completions", timeout=HANG_GUARD_S,
                     json={"messages": HELLO, "temperature": 1, "seed": 666, "max_tokens": 20})
    for t in threads:
        t.join(HANG_GUARD_S)
    assert failed_beside == [4], "the failing request was not decoded beside the four streams"
    assert bad.status_code == 500 and bad.json()["error"]["type"] == "server_error"
    assert [results[i] for i in range(4)] == [(a, "[DONE]") for a in alone]
    assert sched.stats()["failed"] == 1


# ---------------------------------------------------------------- training state and written files


def test_rng_state_survives_a_weights_only_round_trip(tmp_path):
    from model.train_state import rng_state, set_rng_state
    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    random.gauss(0, 1), np.random.standard_normal()  # cached Gaussians are part of the state
    state = rng_state()
    want = (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    torch.save({"rng": [state]}, tmp_path / "s.pt")
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    set_rng_state(load_tensors(tmp_path / "s.pt")["rng"][0])
    got = (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    assert got == want


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_follow_the_umask(tmp_path, model, umask):
    from model import convert
    from model.train_state import StateFiles
    lora = runpy.run_path(str(tiny.ROOT / "4-lora_sft.py"))  # its save_adapter, as the LoRA stage calls it

    class Adapter:
        def save_pretrained(self, folder):
            os.makedirs(folder)
            (folder / "adapter_model.safetensors").write_bytes(b"x")
            os.chmod(folder / "adapter_model.safetensors", 0o600)  # as safetensors 0.8 writes, whatever the umask

    old = os.umask(umask)
    try:
        save_weights(model, tmp_path / "w.pth")
        StateFiles(tmp_path, "w").save({"format": "x"})
        (tmp_path / "raw.jsonl").write_text('{"text": "好"}\n')
        convert.convert(tmp_path / "raw.jsonl", str(tmp_path / "out.jsonl"), convert.pretrain_record, progress=False)
        lora["save_adapter"](Adapter(), tmp_path / "lora_sft_64.pth")
    finally:
        os.umask(old)
    for name in ("w.pth", "w.json", "w.state.pt", "out.jsonl", "lora_sft_64/adapter_model.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    assert (tmp_path / "lora_sft_64").stat().st_mode & 0o777 == 0o777 & ~umask


def test_deepspeed_states_load_weights_only(tmp_path):
    """DeepSpeed's loader asks torch.load for weights_only=False; under deepspeed_weights_only its ZeRO state still
    loads, and a planted pickle does not run."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    from model.train_state import deepspeed_weights_only
    torch.save({"loss_scaler": LossScaler(4.0), "zero_stage": ZeroStageEnum.gradients,
                "fragment": fragment_address(numel=8, start=2), "exp_avg": torch.ones(3)}, tmp_path / "optim.pt")
    marker = tmp_path / "PAYLOAD_RAN"
    torch.save({"exp_avg": Payload(marker)}, tmp_path / "planted.pt")
    real_load = torch.load
    with deepspeed_weights_only():
        state = torch.load(tmp_path / "optim.pt", map_location="cpu", weights_only=False)  # as DeepSpeed calls it
        with pytest.raises(pickle.UnpicklingError):
            torch.load(tmp_path / "planted.pt", map_location="cpu", weights_only=False)
    assert torch.load is real_load and not marker.exists()
    assert state["zero_stage"] == ZeroStageEnum.gradients and state["loss_scaler"].loss_scale == 4.0
    assert state["fragment"] == fragment_address(numel=8, start=2)
