"""The OpenAI-compatible server as users run it: a real uvicorn process (my_openai_api.py) driven by the openai
SDK, raw HTTP and concurrent clients, and the chat client script. Answers are checked against the engine alone."""
import json
import socket
import subprocess
import sys
import threading

import httpx
import openai
import pytest

import os
import signal

import tiny_chat_model as tiny
from model.sampling import SamplingParams
from serving_helpers import (HANG_GUARD_S, HELLO, ROOT, engine, paths, questions, solo, start_server,  # noqa: F401
                             stop, tokenizer, wait_healthy, wait_until)

pytestmark = pytest.mark.slow  # server processes
HTTP = httpx.Client(timeout=HANG_GUARD_S)  # httpx's default of 5 s is a clock a busy machine can beat


@pytest.fixture(scope="module")
def servers(paths):
    """A plain server and one with an API key, --strict-context and short read timeouts, started side by side."""
    plain = start_server(paths)
    keyed = start_server(paths, "--api-key", "sk-secret", "--strict-context", "--max-batch", "2",
                         "--header-timeout", "3", "--body-timeout", "3")
    try:
        for proc, url in (plain, keyed):
            wait_healthy(proc, url)
        yield plain, keyed
    finally:
        for proc, _ in (plain, keyed):
            stop(proc)


@pytest.fixture(scope="module")
def url(servers):
    return servers[0][1]


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=HANG_GUARD_S)


def test_models_and_health(url, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    raw = HTTP.get(url + "/v1/models").json()
    assert raw["object"] == "list" and raw["data"][0]["object"] == "model"
    health = HTTP.get(url + "/health").json()
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
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=HANG_GUARD_S) as r:
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
    ({"messages": [*USER, {"role": "tool", "content": "x"}]}, "messages[1].tool_call_id"),
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
    ({"messages": USER, "presence_penalty": "abc"}, "presence_penalty"),
    ({"messages": USER, "frequency_penalty": 2.5}, "frequency_penalty"),
    ({"messages": USER, "presence_penalty": -3}, "presence_penalty"),
    ({"messages": USER, "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"messages": USER, "logit_bias": {"5": 101}}, "logit_bias"),
    ({"messages": USER, "logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"messages": USER, "logit_bias": [1, 2]}, "logit_bias"),
    ({"messages": USER, "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": USER, "response_format": "text"}, "response_format"),
    ({"messages": USER, "tool_choice": "required"}, "tool_choice"),
    ({"messages": USER, "audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"messages": USER, "modalities": ["text", "audio"]}, "modalities"),
    ({"messages": USER, "store": True}, "store"),
    ({"messages": USER, "user": 5}, "user"),
]


@pytest.mark.parametrize("body,param", ERROR_CASES, ids=[str(i) for i in range(len(ERROR_CASES))])
def test_bad_requests_get_openai_errors(url, body, param):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = HTTP.post(url + "/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
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
    r = HTTP.get(url + "/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_api_key(servers):
    keyed = servers[1][1]
    for key in (None, "sk-wrong"):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        r = HTTP.post(keyed + "/v1/chat/completions", json={"messages": USER}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert HTTP.get(keyed + "/v1/models", headers=headers).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed + "/v1", api_key="sk-wrong", max_retries=0).models.list()
    good = openai.OpenAI(base_url=keyed + "/v1", api_key="sk-secret", max_retries=0)
    assert good.chat.completions.create(model="tiny", messages=HELLO, max_tokens=5).choices[0].message is not None
    assert HTTP.get(keyed + "/health").status_code == 200  # monitoring needs no key


def test_requests_beyond_max_batch_wait_their_turn(servers, engine):
    """The keyed server decodes at most 2 requests at a time; 5 at once queue, and each still equals alone."""
    good = openai.OpenAI(base_url=servers[1][1] + "/v1", api_key="sk-secret", max_retries=0, timeout=HANG_GUARD_S)
    prompts = questions(5)
    results = [None] * 5

    def run(i):
        results[i] = good.chat.completions.create(model="tiny", messages=prompts[i], temperature=0,
                                                  max_tokens=20).choices[0].message.content

    threads = [threading.Thread(target=run, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [solo(engine, p, max_new_tokens=20).text for p in prompts]
    health = HTTP.get(servers[1][1] + "/health").json()
    assert health["max_batch"] == 2 and health["active"] == 0 and health["waiting"] == 0


def long_messages(tokenizer, n_tokens):
    text = " ".join(str(i) for i in range(n_tokens))
    messages = [{"role": "user", "content": text}]
    assert len(tokenizer(text)["input_ids"]) > n_tokens
    return messages


def test_long_prompt_is_cut_from_the_left_or_rejected(servers, tokenizer):
    plain, keyed = servers[0][1], servers[1][1]
    messages = long_messages(tokenizer, 4200)  # the tiny model's context is 4096
    r = HTTP.post(plain + "/v1/chat/completions", timeout=HANG_GUARD_S,
                   json={"messages": messages, "max_tokens": 8, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert int(r.headers["X-Prompt-Tokens-Truncated"]) > 0
    assert r.json()["usage"]["prompt_tokens"] == 4096 - 8 and r.json()["usage"]["completion_tokens"] == 8
    r = HTTP.post(keyed + "/v1/chat/completions", json={"messages": messages, "max_tokens": 8},
                   headers={"Authorization": "Bearer sk-secret"}, timeout=HANG_GUARD_S)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert r.json()["error"]["param"] == "messages"


def requests_queued(port):
    """Connections to 127.0.0.1:port whose request bytes wait unread in the kernel (/proc/net/tcp: the local end
    is the server's, state 01 established, a non-empty receive queue)."""
    count = 0
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            local, _, state, queues = line.split()[1:5]
            if int(local.split(":")[1], 16) == port and state == "01" and int(queues.split(":")[1], 16) > 0:
                count += 1
    return count


def test_sixteen_concurrent_greedy_clients_equal_alone(servers, client, engine):
    (proc, url) = servers[0]
    prompts = questions(16)
    alone = [solo(engine, p, max_new_tokens=40).text for p in prompts]
    before = HTTP.get(url + "/health").json()
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

    # the server is paused until all sixteen requests wait in its sockets, so they meet in its batch however
    # the threads here happen to be scheduled
    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        for t in threads:
            t.start()
        wait_until(lambda: requests_queued(proc.port) >= 16, "sixteen requests wait at the paused server")
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    for t in threads:
        t.join()
    assert not errors and results == alone
    after = HTTP.get(url + "/health").json()
    tokens, steps = after["generated_tokens"] - before["generated_tokens"], after["steps"] - before["steps"]
    assert steps < tokens, "no decode step served more than one request"
    assert after["active"] == 0


def test_disconnecting_client_stops_its_generation(servers, url):
    def health():
        return HTTP.get(url + "/health").json()

    before = health()
    body = {"messages": HELLO, "stream": True, "ignore_eos": True}  # would run to the 4096-token context
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=HANG_GUARD_S) as r:
        for n, _ in enumerate(r.iter_lines()):
            if n > 6:
                break
    after = wait_until(lambda: (h := health())["cancelled"] == before["cancelled"] + 1 and h, "the stream is cancelled")
    assert after["active"] == 0 and after["waiting"] == 0  # (cancelled: stopped before its 4096-token end)

    # the same for a non-streaming request whose client goes away while its answer is being generated
    raw = json.dumps({**body, "stream": False}).encode()
    with socket.create_connection(("127.0.0.1", servers[0][0].port)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(raw) + raw)
        wait_until(lambda: health()["active"] == 1, "the request is generating")
    after = wait_until(lambda: (h := health())["cancelled"] == before["cancelled"] + 2 and h,
                       "the abandoned request is cancelled")
    assert after["active"] == 0


def test_chat_client_script(url, engine):
    expected = solo(engine, HELLO, max_new_tokens=60).text
    client = [sys.executable, "chat_openai_api.py", "--base-url", url + "/v1", "--temperature", "0", "--max_tokens", "60"]
    for flags in ([], ["--no-stream"]):
        out = subprocess.run([*client, "--once", HELLO[0]["content"], *flags], cwd=ROOT, capture_output=True,
                             text=True, timeout=HANG_GUARD_S)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == expected.strip()
    # multi-turn: the history goes back to the server
    script = "你好\n长江有多长？\n"
    out = subprocess.run(client, input=script, cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert out.returncode == 0, out.stderr
    second = solo(engine, [*HELLO, {"role": "assistant", "content": expected},
                           {"role": "user", "content": "长江有多长？"}], max_new_tokens=60).text
    assert second.strip() in out.stdout


def test_values_that_ask_for_nothing_pass_and_penalties_and_logit_bias_are_honoured(client, engine):
    neutral = client.chat.completions.create(
        model="tiny", messages=HELLO, temperature=0, max_tokens=20, n=1, frequency_penalty=0, presence_penalty=0,
        logit_bias={}, logprobs=False, response_format={"type": "text"}, tool_choice="none", store=False,
        user="u1", extra_body={"ignore_eos": True})
    plain = solo(engine, HELLO, max_new_tokens=20, ignore_eos=True)
    assert neutral.choices[0].message.content == plain.text
    first = plain.token_ids[0]
    for fields in ({"logit_bias": {str(first): -100}}, {"frequency_penalty": 2}, {"presence_penalty": -2},
                   {"frequency_penalty": 2, "presence_penalty": 1.5, "logit_bias": {"7": 5}}):
        r = client.chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=40,
                                           extra_body={"ignore_eos": True}, **fields)
        bias = {int(k): v for k, v in fields.pop("logit_bias", {}).items()}
        expected = solo(engine, HELLO, max_new_tokens=40, ignore_eos=True, logit_bias=bias, **fields)
        assert r.choices[0].message.content == expected.text, fields
    banned = client.chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=5,
                                            logit_bias={str(first): -100})
    assert banned.choices[0].message.content != solo(engine, HELLO, max_new_tokens=5).text


def test_system_messages_anywhere_and_a_trailing_assistant(client, engine, tokenizer):
    """OpenAI's rule: every system text first, in order; a new assistant turn after a trailing assistant."""
    q, a = tiny.CONVERSATIONS[1]
    messages = [{"role": "user", "content": q}, {"role": "system", "content": "S1"},
                {"role": "assistant", "content": a}, {"role": "developer", "content": "S2"}]
    r = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=30)
    text = f"S1\nS2<s>user\n{q}</s>\n<s>assistant\n{a}</s>\n<s>assistant\n"
    assert r.usage.prompt_tokens == len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert r.choices[0].message.content == engine.complete(text, SamplingParams(temperature=0, max_new_tokens=30)).text


# ---------------------------------------------------------------- what a raw HTTP client meets


def server_log(proc):
    return os.pread(proc.log.fileno(), 1 << 24, 0).decode(errors="replace")  # (pread: the server's offset stays)


def raw_connection(url):
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=HANG_GUARD_S)


def post_head(length, key=None):
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def test_each_abandoned_request_is_one_log_line(servers):
    proc, url = servers[0]
    for i in range(5):
        with raw_connection(url) as s:
            s.sendall(post_head(1000) + b'{"messages": [')  # and leave mid-body
    wait_until(lambda: server_log(proc).count("body bytes; request abandoned") >= 5, "five abandoned requests logged")
    log = server_log(proc)
    lines = [line for line in log.splitlines() if "request abandoned" in line]
    assert len(lines) == 5 and all("went away after 14 of 1000 body bytes" in line for line in lines), lines
    assert "Traceback" not in log and "Exception in ASGI" not in log
    assert HTTP.get(url + "/health").json()["active"] == 0


def read_all(s):
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def test_header_and_body_read_timeouts_close_slow_clients(servers):
    proc, url = servers[1]  # --header-timeout 3 --body-timeout 3
    with raw_connection(url) as idle, raw_connection(url) as partial, raw_connection(url) as dribble:
        partial.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # headers that never end
        assert read_all(idle) == b"" and read_all(partial) == b""  # both closed by the server
        dribble.sendall(b"GET /health HTTP/1.1\r\n")
        closed = False
        for _ in range(HANG_GUARD_S):  # a header byte every 0.2 s does not keep it open
            try:
                dribble.sendall(b"X")
                dribble.settimeout(0.2)
                closed = dribble.recv(1) == b""
            except socket.timeout:
                continue
            except OSError:
                closed = True
            if closed:
                break
        assert closed
    with raw_connection(url) as slow_body:
        slow_body.sendall(post_head(100, "sk-secret") + b'{"messages"')
        reply = read_all(slow_body).decode()
    assert reply.startswith("HTTP/1.1 408 ") and "connection: close" in reply.lower()
    assert '"code": "request_timeout"' in reply and "--body-timeout" in reply
    log = server_log(proc)
    assert log.count("no complete request headers within 3 s (--header-timeout)") >= 3
    assert "sent 11 of 100 body bytes in 3 s; request abandoned with 408" in log and "Traceback" not in log
    assert HTTP.get(url + "/health").status_code == 200  # the server itself goes on


def test_405_names_the_allowed_methods_and_head_answers_where_get_does(url):
    r = HTTP.post(url + "/health")
    assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"
    assert r.json()["error"]["code"] == "method_not_allowed"
    r = HTTP.get(url + "/v1/chat/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    for path in ("/health", "/v1/models", "/openapi.json"):
        head, get = HTTP.head(url + path), HTTP.get(url + path)
        assert head.status_code == get.status_code == 200 and head.content == b"", path
        assert head.headers["content-type"] == get.headers["content-type"], path
    assert "head" not in HTTP.get(url + "/openapi.json").json()["paths"]["/health"]
