"""Generation engine and OpenAI-compatible server: the static cache and batching against the plain model, sampling,
streaming text, and a real uvicorn process driven by the openai SDK, raw HTTP and concurrent clients."""
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch
from transformers import AutoTokenizer

import tiny_chat_model as tiny
from model.checkpoint import load_model
from model.generate import Engine, Request, SamplingParams, Scheduler, TextStream, sample_token

ROOT = tiny.ROOT
HELLO = [{"role": "user", "content": tiny.CONVERSATIONS[0][0]}]


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


# ---------------------------------------------------------------- engine


def plain_greedy(model, ids, n, eos):
    """Greedy decoding by re-running the whole sequence each step: no cache at all."""
    ids, out = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            out.append(token)
            if token == eos:
                break
            ids.append(token)
    return out


def test_static_cache_matches_plain_forward(engine):
    plain_engine = Engine(engine.model, engine.tokenizer, fast=False)  # decode steps through model.forward
    for messages in questions(3):
        done = engine.complete(messages, temperature=0, max_new_tokens=24)
        ids = engine.encode(messages)
        assert done.token_ids == plain_greedy(engine.model, ids, 24, engine.eos_id)
        assert plain_engine.complete(messages, temperature=0, max_new_tokens=24).token_ids == done.token_ids
        assert done.prompt_tokens == len(ids) and done.completion_tokens == len(done.token_ids)
        assert done.finish_reason == ("stop" if done.token_ids[-1] == engine.eos_id else "length")


@pytest.mark.parametrize("use_moe,rows", [(False, 3), (False, 6), (True, 3), (True, 6)])
def test_fast_decoder_logits_equal_model_forward(use_moe, rows):
    """One batched decode step, rows at different positions: FastDecoder against the model's own forward
    (below 4 rows and from 4 on, SkinnyWeight multiplies in different layouts)."""
    from model.LMConfig import LMConfig
    from model.model import Transformer
    torch.manual_seed(0)
    model = Transformer(LMConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=300, max_seq_len=64,
                                 use_moe=use_moe)).eval()
    fast = Engine(model, None, max_batch=rows)
    for n in (5, 17, 9, 2, 12, 7)[:rows]:  # prompts of different lengths
        fast.add(fast.prepare(list(range(3, 3 + n)), SamplingParams(temperature=0, max_new_tokens=30,
                                                                      ignore_eos=True)))
    fast.step()
    tokens = torch.tensor([r.last_token for r in fast.active])
    positions = torch.tensor([r.n_cached for r in fast.active])
    window = int(positions.max()) + 1
    with torch.inference_mode():
        got = fast.decoder(tokens, positions, window, fast.cache)
        fast.cache.decode(positions, window)  # the same step again, through the model (same cache contents)
        want = model(tokens[:, None], attention_mask=torch.arange(window)[None] <= positions[:, None],
                     position_ids=positions[:, None], cache=fast.cache, logits_to_keep=1).logits[:, -1]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_batched_steps_equal_each_request_alone(engine):
    """Requests join at different steps and leave when done; each one's tokens equal its solo run."""
    prompts = questions(6)
    params = [SamplingParams(temperature=0, max_new_tokens=12 + 5 * i, ignore_eos=i % 2 == 0) for i in range(6)]
    params[3] = SamplingParams(temperature=1.0, top_k=20, seed=11, max_new_tokens=20)  # sampled, seeded
    alone = [engine.complete(p, q).token_ids for p, q in zip(prompts, params)]

    reqs = [engine.prepare(p, q) for p, q in zip(prompts, params)]
    pending, steps = list(reqs), 0
    while pending or engine.active:
        if pending and len(engine.active) < engine.max_batch and steps % 3 == 0:
            engine.add(pending.pop(0))
        engine.step()
        steps += 1
    assert [r.token_ids for r in reqs] == alone
    assert steps < sum(len(a) for a in alone)  # decoding really was shared


def test_cancel_frees_the_slot(engine):
    stream = engine.stream(HELLO, temperature=0, ignore_eos=True)
    next(stream)
    assert len(engine.active) == 1
    stream.close()
    assert engine.active == [] and engine.last.finish_reason == "cancelled"


def test_context_limit_and_left_truncation(paths, tokenizer):
    model = load_model(paths[0])
    model.config.max_seq_len = 48
    small = Engine(model, tokenizer)
    done = small.complete(HELLO, temperature=0, ignore_eos=True)  # max_new_tokens None: until the context is full
    assert done.finish_reason == "length" and done.prompt_tokens + done.completion_tokens == 48
    assert small.complete(HELLO, temperature=0, max_new_tokens=-1, ignore_eos=True).completion_tokens == \
        done.completion_tokens
    long_prompt = list(range(3, 103))  # 100 tokens: more than the context
    cut = small.complete(long_prompt, temperature=0, ignore_eos=True)
    assert cut.truncated == 100 - (48 - 12) and cut.prompt_tokens == 36 and cut.completion_tokens == 12
    cut = small.complete(long_prompt, temperature=0, max_new_tokens=5, ignore_eos=True)
    assert cut.prompt_tokens == 43 and cut.completion_tokens == 5
    # the kept tokens are the newest ones: same answer as giving only those
    assert cut.token_ids == small.complete(long_prompt[-43:], temperature=0, max_new_tokens=5,
                                           ignore_eos=True).token_ids


def test_text_stream_holds_back_partial_utf8_and_stop_strings():
    table = [b"", b"\xe4", b"\xbd", b"\xa0", b"ab", b"S", b"TO", b"P!", b"x", b"\xf0\x9f\x98", b"\x80", b"\xff"]
    s = TextStream(table)
    assert [s.push(i)[0] for i in (1, 2, 3, 4, 9, 10)] == ["", "", "你", "ab", "", "😀"]
    assert s.push(11)[0] == "\ufffd"  # an invalid byte becomes U+FFFD at once, never a broken character
    s = TextStream(table, stop=("STOP",))
    assert [s.push(i) for i in (4, 5, 8)] == [("ab", False), ("", False), ("Sx", False)]  # "S" held, then released
    assert [s.push(i) for i in (5, 6, 7)] == [("", False), ("", False), ("", True)]  # "STOP" across three tokens
    s = TextStream(table, stop=("你",))
    assert [s.push(i) for i in (4, 1, 2, 3)] == [("ab", False), ("", False), ("", False), ("", True)]
    s = TextStream(table)
    s.push(1)
    assert s.flush() == "\ufffd"  # an answer that ends inside a character


def test_sampling_rules():
    logits = torch.tensor([2.0, 1.0, -1.0, 0.5])
    greedy = SamplingParams(temperature=0)
    assert sample_token(logits, greedy) == 0
    seen = torch.tensor([True, False, False, False])
    assert sample_token(logits, SamplingParams(temperature=0, repetition_penalty=4.0), seen=seen) == 1
    g = torch.Generator().manual_seed(0)
    assert {sample_token(logits, SamplingParams(temperature=2.0, top_k=1), g) for _ in range(20)} == {0}
    assert {sample_token(logits, SamplingParams(temperature=2.0, top_p=0.01), g) for _ in range(20)} == {0}
    assert {sample_token(logits, SamplingParams(temperature=2.0, top_k=2), g) for _ in range(200)} == {0, 1}
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)


def test_seeded_sampling_is_reproducible(engine):
    runs = [engine.complete(HELLO, temperature=1.5, seed=s, max_new_tokens=30, ignore_eos=True).token_ids
            for s in (1, 1, 2, 3, 4)]
    assert runs[0] == runs[1]
    assert any(r != runs[0] for r in runs[2:])


def test_prefill_together_equals_prefill_alone(engine):
    """Prompts of different lengths prefilled in one padded forward: the same first-token logits and the same
    greedy answers as each prompt prefilled and decoded alone."""
    prompts = questions(engine.max_batch)
    params = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True)
    alone, first_logits = [], []
    for prompt in prompts:
        req = engine.prepare(prompt, params)
        with torch.inference_mode():
            first_logits.append(engine.model(torch.tensor([req.prompt_ids])).logits[0, -1])
        alone.append(engine.complete(prompt, params).token_ids)
    reqs = [engine.prepare(p, params) for p in prompts]
    assert len({len(r.prompt_ids) for r in reqs}) > 1  # really padded
    logits = {}
    real_accept = engine._accept
    engine._accept = lambda rs, lg: (logits.update(zip([id(r) for r in rs], lg.clone())), real_accept(rs, lg))
    try:
        engine.add_many(reqs)
    finally:
        engine._accept = real_accept
    for r, want in zip(reqs, first_logits):
        torch.testing.assert_close(logits[id(r)], want, rtol=1e-4, atol=1e-5)
    while engine.active:
        engine.step()
    assert [r.token_ids for r in reqs] == alone


def test_prefill_groups_limit_padding():
    owner = SimpleNamespace(device="cpu", vocab_size=8, token_bytes=[b""] * 8)

    def req(n):
        return Request(list(range(n)), SamplingParams(), 0, 1, owner)

    similar = [req(n) for n in (20, 22, 25, 19)]
    assert [len(g) for g in Engine.prefill_groups(similar)] == [4]
    mixed = [req(n) for n in (10, 12, 400, 11, 9)]  # the long prompt would pad the short ones 40x
    assert [[len(r.prompt_ids) for r in g] for g in Engine.prefill_groups(mixed)] == [[10, 12], [400], [11, 9]]
    many = [req(300) for _ in range(16)]  # a group stays within the token budget
    assert [len(g) for g in Engine.prefill_groups(many, budget=4096)] == [13, 3]
    assert Engine.prefill_groups([]) == []


def test_scheduler_stream_and_cancel(engine):
    sched = Scheduler(Engine(engine.model, engine.tokenizer, max_batch=2))
    try:
        expected = engine.complete(HELLO, temperature=0, max_new_tokens=20).text
        assert "".join(sched.stream(HELLO, temperature=0, max_new_tokens=20)) == expected
        stats = sched.stats()  # the engine's busy time, which bench_serve reports per step
        assert stats["steps"] >= 1 and stats["prefill_seconds"] > 0 and stats["decode_seconds"] > 0
        stream = sched.stream(HELLO, temperature=0, ignore_eos=True)
        next(stream)
        stream.close()
        deadline = time.time() + 10
        while sched.stats()["active"] and time.time() < deadline:
            time.sleep(0.02)
        assert sched.stats()["active"] == 0 and sched.stats()["cancelled"] == 1
    finally:
        sched.close()


# ---------------------------------------------------------------- server


def start_server(paths, *extra):
    port = tiny.free_port()
    cmd = [sys.executable, "my_openai_api.py", "--model", str(paths[0]), "--tokenizer", str(paths[1]),
           "--port", str(port), "--threads", "1", *extra]
    env = {**os.environ, "MINIMIND_API_KEY": ""}
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a pipe nobody reads can block the server
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    return proc, f"http://127.0.0.1:{port}"


def wait_healthy(proc, url, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            proc.log.seek(0)
            raise RuntimeError(f"server exited with {proc.returncode}:\n{proc.log.read()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError("server did not become healthy")


@pytest.fixture(scope="module")
def servers(paths):
    """A plain server and one with an API key and --strict-context, started side by side."""
    plain = start_server(paths)
    keyed = start_server(paths, "--api-key", "sk-secret", "--strict-context", "--max-batch", "2")
    try:
        for proc, url in (plain, keyed):
            wait_healthy(proc, url)
        yield plain[1], keyed[1]
    finally:
        for proc, _ in (plain, keyed):
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="module")
def url(servers):
    return servers[0]


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def solo(engine, messages, **kw):
    """What the request gives alone, in this process."""
    return engine.complete(messages, SamplingParams(temperature=0, **kw))


def test_models_and_health(url, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    raw = httpx.get(url + "/v1/models").json()
    assert raw["object"] == "list" and raw["data"][0]["object"] == "model"
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and health["active"] == 0 and health["max_batch"] == 16


def test_non_streaming(client, engine):
    r = client.chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=40)
    expected = solo(engine, HELLO, max_new_tokens=40)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "tiny"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == expected.text
    assert r.choices[0].finish_reason == expected.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (expected.prompt_tokens, expected.completion_tokens)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_with_sdk(client, engine):
    messages = [{"role": "system", "content": "你是MiniMind。"}, {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "长江有多长？"}]
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=30,
                                                 stream=True))
    expected = solo(engine, messages, max_new_tokens=30)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == expected.finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_finish_reason_length_and_stop_strings(client, engine):
    r = client.chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=3,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    full = solo(engine, HELLO, max_new_tokens=40).text
    stop = full[4:6]
    r = client.chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=40, stop=[stop, "@@"])
    assert r.choices[0].message.content == full[:full.find(stop)] and r.choices[0].finish_reason == "stop"


def test_seed_and_extensions(client):
    def ask(seed):
        return client.chat.completions.create(model="tiny", messages=HELLO, temperature=1.5, top_p=1.0, seed=seed,
                                              max_tokens=25, extra_body={"top_k": 50, "repetition_penalty": 1.2,
                                                                         "ignore_eos": True}).choices[0].message.content
    assert ask(7) == ask(7)


def read_sse(response):
    """The data payloads of an SSE response, checking the framing: each event one data line and a blank line."""
    events, lines = [], list(response.iter_lines())
    for i, line in enumerate(lines):
        if line.startswith("data: "):
            events.append(line[len("data: "):])
            assert lines[i + 1] == "", "an event must end with a blank line"
        else:
            assert line == "", f"unexpected SSE line {line!r}"
    return events


def test_sse_chunk_schema_and_done(url, engine):
    body = {"model": "anything", "messages": HELLO, "stream": True, "temperature": 0, "max_tokens": 30,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = read_sse(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    for c in chunks:
        assert set(c) >= {"id", "object", "created", "model", "choices"}
        assert c["object"] == "chat.completion.chunk" and c["model"] == "tiny" and isinstance(c["created"], int)
    content = [c for c in chunks if c["choices"]]
    for c in content:
        (choice,) = c["choices"]
        assert choice["index"] == 0 and set(choice) >= {"delta", "finish_reason"}
    assert content[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert content[-1]["choices"][0]["delta"] == {} and content[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    expected = solo(engine, HELLO, max_new_tokens=30)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in content) == expected.text
    usage = chunks[-1]["usage"]  # stream_options.include_usage: a last chunk with usage and no choices
    assert chunks[-1]["choices"] == [] and usage["completion_tokens"] == expected.completion_tokens
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


USER = [{"role": "user", "content": "hi"}]
ERROR_CASES = [
    # (raw body or JSON object, param named in the error)
    (b"{not json", None),
    (b"", None),
    ([1, 2], None),
    ({}, "messages"),
    ({"messages": None}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": ["hi"]}, "messages[0]"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"content": "hi"}]}, "messages[0].role"),
    ({"messages": [*USER, {"role": "tool", "content": "x"}]}, "messages[1].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "system", "content": ""}]}, "messages"),
    ({"messages": USER, "temperature": -0.1}, "temperature"),
    ({"messages": USER, "temperature": 2.5}, "temperature"),
    ({"messages": USER, "temperature": "hot"}, "temperature"),
    ({"messages": USER, "temperature": True}, "temperature"),
    ({"messages": USER, "top_p": 0}, "top_p"),
    ({"messages": USER, "top_p": 1.01}, "top_p"),
    ({"messages": USER, "max_tokens": 0}, "max_tokens"),
    ({"messages": USER, "max_tokens": -2}, "max_tokens"),
    ({"messages": USER, "max_tokens": 1.5}, "max_tokens"),
    ({"messages": USER, "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": USER, "n": 2}, "n"),
    ({"messages": USER, "top_k": -1}, "top_k"),
    ({"messages": USER, "repetition_penalty": 0}, "repetition_penalty"),
    ({"messages": USER, "stream": "yes"}, "stream"),
    ({"messages": USER, "stop": 5}, "stop"),
    ({"messages": USER, "stop": ["a", 1]}, "stop"),
    ({"messages": USER, "seed": "x"}, "seed"),
]


@pytest.mark.parametrize("body,param", ERROR_CASES, ids=[str(i) for i in range(len(ERROR_CASES))])
def test_bad_requests_get_openai_errors(url, body, param):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(url + "/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    if isinstance(body, bytes) and body:
        assert error["code"] == "invalid_json"


def test_errors_through_the_sdk_and_unknown_fields(url, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=USER, temperature=3)
    assert e.value.status_code == 400 and e.value.body["param"] == "temperature"
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=2,
                                       extra_body={"frobnicate": {"x": 1}, "user": "u1"})
    assert r.usage.completion_tokens <= 2
    r = httpx.get(url + "/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_api_key(servers):
    keyed = servers[1]
    for key in (None, "sk-wrong"):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        r = httpx.post(keyed + "/v1/chat/completions", json={"messages": USER}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(keyed + "/v1/models", headers=headers).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed + "/v1", api_key="sk-wrong", max_retries=0).models.list()
    good = openai.OpenAI(base_url=keyed + "/v1", api_key="sk-secret", max_retries=0)
    assert good.chat.completions.create(model="tiny", messages=HELLO, max_tokens=5).choices[0].message is not None
    assert httpx.get(keyed + "/health").status_code == 200  # monitoring needs no key


def test_requests_beyond_max_batch_wait_their_turn(servers, engine):
    """The keyed server decodes at most 2 requests at a time; 5 at once queue, and each still equals alone."""
    good = openai.OpenAI(base_url=servers[1] + "/v1", api_key="sk-secret", max_retries=0, timeout=60)
    prompts = questions(5)
    results = [None] * 5

    def run(i):
        results[i] = good.chat.completions.create(model="tiny", messages=prompts[i], temperature=0,
                                                  max_tokens=20).choices[0].message.content

    threads = [threading.Thread(target=run, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == [solo(engine, p, max_new_tokens=20).text for p in prompts]
    health = httpx.get(servers[1] + "/health").json()
    assert health["max_batch"] == 2 and health["active"] == 0 and health["waiting"] == 0


def long_messages(tokenizer, n_tokens):
    text = " ".join(str(i) for i in range(n_tokens))
    messages = [{"role": "user", "content": text}]
    assert len(tokenizer(text)["input_ids"]) > n_tokens
    return messages


def test_long_prompt_is_cut_from_the_left_or_rejected(servers, tokenizer):
    plain, keyed = servers
    messages = long_messages(tokenizer, 4200)  # the tiny model's context is 4096
    r = httpx.post(plain + "/v1/chat/completions", timeout=120,
                   json={"messages": messages, "max_tokens": 8, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert int(r.headers["X-Prompt-Tokens-Truncated"]) > 0
    assert r.json()["usage"]["prompt_tokens"] == 4096 - 8 and r.json()["usage"]["completion_tokens"] == 8
    r = httpx.post(keyed + "/v1/chat/completions", json={"messages": messages, "max_tokens": 8},
                   headers={"Authorization": "Bearer sk-secret"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert r.json()["error"]["param"] == "messages"


def test_sixteen_concurrent_greedy_clients_equal_alone(url, client, engine):
    prompts = questions(16)
    alone = [solo(engine, p, max_new_tokens=40).text for p in prompts]
    before = httpx.get(url + "/health").json()
    results, errors = [None] * 16, []

    def run(i):
        try:
            if i % 2:  # half stream, half not
                stream = client.chat.completions.create(model="tiny", messages=prompts[i], temperature=0,
                                                        max_tokens=40, stream=True)
                results[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            else:
                results[i] = client.chat.completions.create(model="tiny", messages=prompts[i], temperature=0,
                                                            max_tokens=40).choices[0].message.content
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and results == alone
    after = httpx.get(url + "/health").json()
    tokens, steps = after["generated_tokens"] - before["generated_tokens"], after["steps"] - before["steps"]
    assert steps < tokens, "no decode step served more than one request"
    assert after["active"] == 0


def test_disconnecting_client_stops_its_generation(url):
    before = httpx.get(url + "/health").json()
    body = {"messages": HELLO, "stream": True, "ignore_eos": True}  # would run to the 4096-token context
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        for n, _ in enumerate(r.iter_lines()):
            if n > 6:
                break
    deadline, health = time.time() + 20, None
    while time.time() < deadline:
        health = httpx.get(url + "/health").json()
        if health["active"] == 0 and health["waiting"] == 0:
            break
        time.sleep(0.05)
    assert health["active"] == 0 and health["cancelled"] == before["cancelled"] + 1
    assert health["generated_tokens"] - before["generated_tokens"] < 4000

    # the same for a non-streaming request whose client gives up
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/chat/completions", json={**body, "stream": False}, timeout=1.0)
    deadline = time.time() + 20
    while time.time() < deadline:
        health = httpx.get(url + "/health").json()
        if health["active"] == 0:
            break
        time.sleep(0.05)
    assert health["active"] == 0 and health["cancelled"] == before["cancelled"] + 2


def test_chat_client_script(url, engine):
    expected = solo(engine, HELLO, max_new_tokens=60).text
    client = [sys.executable, "chat_openai_api.py", "--base-url", url + "/v1", "--temperature", "0", "--max_tokens", "60"]
    for flags in ([], ["--no-stream"]):
        out = subprocess.run([*client, "--once", HELLO[0]["content"], *flags], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == expected.strip()
    # multi-turn: the history goes back to the server
    script = "你好\n长江有多长？\n"
    out = subprocess.run(client, input=script, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    second = solo(engine, [*HELLO, {"role": "assistant", "content": expected},
                           {"role": "user", "content": "长江有多长？"}], max_new_tokens=60).text
    assert second.strip() in out.stdout
