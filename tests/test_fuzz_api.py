"""The fuzz suite that keeps the server hard: property-based tests (hypothesis) of the request parser through a
live server and of sampling in this process, a schema-driven run (schemathesis) against the live server's
/openapi.json, and a bounded load test: 64 concurrent greedy streams plus 20 clients that leave mid-stream.

Bounded for CI: a few hundred examples per property on a tiny model with a 64-token context; the counts of
what was tried are printed (pytest -s shows them)."""
import asyncio
import json
import math
import time
from collections import Counter

import httpx
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from model import chat_format
from model.sampling import openai_adjusted, penalized_logits, sample_token, sampling_probs
from my_openai_api import APIError, parse_messages, parse_request, parse_tool_options
from serving_helpers import (HANG_GUARD_S, engine, paths, questions, solo, start_server,  # noqa: F401
                             stop, tokenizer, wait_healthy, wait_until)

pytestmark = pytest.mark.slow  # live server processes and hundreds of examples

TRIED = Counter()  # what the properties met, printed at the end of the module


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    print("\nfuzz counts: " + ", ".join(f"{k} {v}" for k, v in sorted(TRIED.items())))


def serve(paths, *flags):
    proc, url = start_server(paths, *flags)
    wait_healthy(proc, url)
    return proc, url


@pytest.fixture(scope="module")
def short_model(paths, tmp_path_factory):
    """The tiny chat model with a 64-token context: any accepted request finishes within 64 decode steps."""
    folder = tmp_path_factory.mktemp("short")
    (folder / "short.pth").write_bytes(paths[0].read_bytes())
    config = json.loads(paths[0].with_suffix(".json").read_text())
    (folder / "short.json").write_text(json.dumps({**config, "max_seq_len": 64}))
    return folder / "short.pth", paths[1]


@pytest.fixture(scope="module")
def fuzz_url(short_model):
    proc, url = serve(short_model)
    yield url
    stop(proc)


# ---------------------------------------------------------------- any JSON body: 200 or a 4xx error object

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10)
TEXT = st.text(max_size=40) | st.sampled_from(["\ud800", "a\udfffb", "😀\u0000", "</s><s>user\n", "{{ x }}", ""])
NUMBER = st.one_of(
    st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(), st.text(max_size=3),
    st.sampled_from([0, 1, -1, 0.0, 1e-300, 5e-324, 2, 2.0000001, 10, 10.5, 1.5, 2 ** 63, 2 ** 64, -2 ** 63 - 1]))
ROLE = st.sampled_from(["system", "user", "assistant", "developer"])
PARTS = st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20)}), max_size=3)
NAME = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
TOOL = st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": NAME}, optional={"description": st.text(max_size=30), "parameters": st.fixed_dictionaries(
        {"type": st.just("object")}, optional={"properties": st.dictionaries(st.text(max_size=8), JSON, max_size=3),
                                               "required": st.lists(st.text(max_size=8), max_size=2)})})})
TOOL_CHOICE = st.sampled_from(["auto", "none", "required"]) | st.builds(
    lambda n: {"type": "function", "function": {"name": n}}, NAME)
CALL = st.fixed_dictionaries({"id": st.text(max_size=8), "type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": NAME, "arguments": st.builds(json.dumps, st.dictionaries(st.text(max_size=6), JSON, max_size=2))})})
VALID_FIELDS = {  # every value the server accepts, boundaries included
    "temperature": st.floats(0, 2) | st.sampled_from([0, 5e-324, 1e-300, 2]),
    "top_p": st.floats(0, 1, exclude_min=True) | st.sampled_from([5e-324, 1]),
    "top_k": st.integers(0, 2 ** 70),
    "repetition_penalty": st.floats(0, 10, exclude_min=True) | st.sampled_from([5e-324, 1e-300, 10]),
    "max_tokens": st.integers(1, 80) | st.sampled_from([-1, 2 ** 70]),
    "seed": st.integers(-2 ** 63, 2 ** 64 - 1),
    "n": st.just(1),
    "stream": st.booleans(),
    "stop": st.text(max_size=6) | st.lists(st.text(max_size=6), max_size=16),
    "ignore_eos": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "model": st.text(max_size=12),
    "tools": st.lists(TOOL, max_size=3, unique_by=lambda t: t["function"]["name"]),
    "tool_choice": st.sampled_from(["auto", "none"]),
    "chat_template_kwargs": st.fixed_dictionaries({}, optional={"enable_thinking": st.booleans()}),
    "frequency_penalty": st.floats(-2, 2) | st.sampled_from([-2, 0, 2]),
    "presence_penalty": st.floats(-2, 2) | st.sampled_from([-2, 0, 2]),
    "logit_bias": st.dictionaries(st.integers(0, 799).map(str), st.floats(-100, 100) | st.sampled_from([-100, 100]),
                                  max_size=4),
    "response_format": st.just({"type": "text"}),
    "logprobs": st.just(False),
    "user": st.text(max_size=6),
}
TURN = (st.fixed_dictionaries({"role": ROLE, "content": st.text(max_size=40) | PARTS})
        | st.fixed_dictionaries({"role": st.just("assistant"), "content": st.none(), "tool_calls": st.lists(
            CALL, min_size=1, max_size=2)}, optional={"reasoning_content": st.text(max_size=20)})
        | st.fixed_dictionaries({"role": st.just("tool"), "tool_call_id": st.text(max_size=8),
                                 "content": st.text(max_size=40)}))
VALID_BODY = st.fixed_dictionaries({"messages": st.lists(TURN, min_size=1, max_size=4)}, optional=VALID_FIELDS)
MESSAGE = st.fixed_dictionaries(
    {"role": ROLE | st.sampled_from(["tool", "USER", ""]) | JSON,
     "content": TEXT | st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]),
                                                      "text": TEXT}) | JSON, max_size=3) | JSON},
    optional={"name": JSON, "tool_calls": st.lists(CALL | JSON, max_size=2) | JSON, "tool_call_id": JSON,
              "reasoning_content": TEXT | JSON}) | JSON
BROKEN_BODY = st.fixed_dictionaries(  # each field anything at all, mostly wrong
    {"messages": st.lists(MESSAGE, max_size=4) | JSON},
    optional={name: NUMBER | value for name, value in VALID_FIELDS.items()}
    | {"stream": st.booleans() | JSON, "stop": TEXT | st.lists(TEXT, max_size=18) | JSON, "model": TEXT | JSON,
       "ignore_eos": st.booleans() | JSON, "stream_options": st.fixed_dictionaries({}, optional={
           "include_usage": st.booleans() | JSON}) | JSON,
       "tools": st.lists(TOOL | JSON, max_size=3) | JSON, "tool_choice": TOOL_CHOICE | JSON,
       "chat_template_kwargs": st.dictionaries(st.sampled_from(["enable_thinking", "x"]), JSON, max_size=2) | JSON,
       "parallel_tool_calls": JSON,
       "logit_bias": st.dictionaries(TEXT | st.integers(-5, 10 ** 6).map(str), NUMBER, max_size=3) | JSON,
       "response_format": st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "json_schema"])})
       | JSON, "audio": JSON, "store": JSON, "modalities": JSON})


def check_response(r, stream):
    """200 with a complete answer, or a 4xx OpenAI error object: never a 5xx, never an error inside a 200."""
    assert r.status_code == 200 or 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code != 200:
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], error
        TRIED[f"status {r.status_code}"] += 1
        return
    TRIED["status 200"] += 1
    if stream:
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", events[-3:]
        chunks = [json.loads(e) for e in events[:-1]]
        assert not [c for c in chunks if "error" in c], chunks
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] in FINISH
    else:
        assert r.json()["choices"][0]["finish_reason"] in FINISH


FINISH = ("stop", "length", "tool_calls")


@settings(max_examples=250, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=VALID_BODY | BROKEN_BODY | JSON)
def test_any_json_body_gets_an_answer_or_an_openai_error(fuzz_url, body):
    raw = json.dumps(body).encode()  # ASCII with \u escapes: lone surrogates and NaN/Infinity reach the server
    with httpx.Client(base_url=fuzz_url, timeout=HANG_GUARD_S) as client:
        r = client.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
    TRIED["bodies"] += 1
    check_response(r, isinstance(body, dict) and body.get("stream") is True)


IDS = st.lists(st.integers(0, 6399), min_size=1, max_size=70)  # the shipped vocabulary; 70 > the 64-token context
VALID_COMPLETION_BODY = st.fixed_dictionaries(
    {"prompt": st.text(min_size=1, max_size=40) | st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=3)
     | IDS | st.lists(IDS, min_size=1, max_size=3)},
    optional={**{k: v for k, v in VALID_FIELDS.items() if k != "max_tokens"},
              "max_tokens": st.integers(0, 80) | st.sampled_from([-1, 2 ** 70]), "echo": st.booleans(),
              "logprobs": st.integers(0, 20) | st.sampled_from([None, False]), "suffix": st.sampled_from(["", None]),
              "best_of": st.sampled_from([1, None])})
BROKEN_COMPLETION_BODY = st.fixed_dictionaries(
    {"prompt": TEXT | st.lists(TEXT | st.integers(-2 ** 70, 2 ** 70) | JSON, max_size=4) | JSON},
    optional={name: NUMBER | value for name, value in VALID_FIELDS.items()}
    | {"echo": st.booleans() | JSON, "logprobs": NUMBER, "suffix": TEXT | JSON, "best_of": NUMBER,
       "stream": st.booleans() | JSON, "stop": TEXT | st.lists(TEXT, max_size=18) | JSON})


SCORING_BODY = st.fixed_dictionaries(  # what lm-eval's local-completions sends, and max_tokens 0
    {"prompt": IDS | st.lists(IDS, min_size=1, max_size=3), "echo": st.just(True), "logprobs": st.integers(0, 20),
     "max_tokens": st.integers(0, 3)}, optional={"temperature": st.just(0), "seed": st.integers(0, 2 ** 32)})


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=VALID_COMPLETION_BODY | SCORING_BODY | BROKEN_COMPLETION_BODY | JSON)
def test_any_completions_body_gets_an_answer_or_an_openai_error(fuzz_url, body):
    """The legacy endpoint: every prompt form, echo and logprobs against a 64-token context (too long to echo
    is a 400, not a cut); with echo and logprobs the first token has none and the others one each."""
    raw = json.dumps(body).encode()
    with httpx.Client(base_url=fuzz_url, timeout=HANG_GUARD_S) as client:
        r = client.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
    TRIED["completions bodies"] += 1
    stream = isinstance(body, dict) and body.get("stream") is True
    check_response(r, stream)
    if r.status_code == 200 and not stream and body.get("echo") is True and is_count(body.get("logprobs")):
        for choice in r.json()["choices"]:
            values = choice["logprobs"]["token_logprobs"]
            assert values[0] is None and all(isinstance(v, float) and v <= 0 for v in values[1:])
        TRIED["completions scored with echo"] += 1


def is_count(x):
    return isinstance(x, int) and not isinstance(x, bool)


@settings(max_examples=60, deadline=None, database=None)
@given(raw=st.binary(max_size=64) | st.sampled_from([
    b"[" * 100_000, b"{" * 5000, b'{"messages": 1' + b"0" * 5000 + b"}", b'{"a": NaN}', b"\xff\xfe{}",
    b'{"messages": [{"role": "user", "content": "\\ud800"}]}']))
def test_any_bytes_get_an_answer_or_an_openai_error(fuzz_url, raw):
    r = httpx.post(fuzz_url + "/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"},
                   timeout=HANG_GUARD_S)
    TRIED["raw bodies"] += 1
    check_response(r, False)


# ---------------------------------------------------------------- accepted sampling parameters: finite probabilities

SAMPLING = st.fixed_dictionaries({}, optional={
    "temperature": st.floats(0, 2) | st.sampled_from([0, 5e-324, 1e-300, 1e-30, 2]),
    "top_p": st.floats(0, 1) | st.sampled_from([5e-324, 1e-300, 1]),
    "top_k": st.integers(0, 2 ** 70),
    "repetition_penalty": st.floats(0, 10) | st.sampled_from([5e-324, 1e-300, 10]),
    "frequency_penalty": st.floats(-3, 3) | st.sampled_from([-2, 2]),
    "presence_penalty": st.floats(-3, 3) | st.sampled_from([-2, 2]),
    "logit_bias": st.dictionaries(st.integers(0, 60).map(str), st.floats(-101, 101) | st.sampled_from([-100, 100]),
                                  max_size=3),
    "seed": st.integers(-2 ** 63, 2 ** 64 - 1)})
LOGITS = st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False) | st.sampled_from([0.0, -1e30, 3.4e38]),
                  min_size=1, max_size=48)


@settings(max_examples=500, deadline=None, database=None)
@given(fields=SAMPLING, logits=LOGITS, seen_bits=st.lists(st.booleans(), min_size=48, max_size=48),
       counts=st.lists(st.integers(0, 10 ** 6), min_size=48, max_size=48))
def test_accepted_sampling_parameters_give_finite_probabilities(fields, logits, seen_bits, counts):
    try:
        _, params, _, _ = parse_request({"messages": [{"role": "user", "content": "x"}], **fields},
                                        vocab_size=len(logits))
    except APIError:
        TRIED["sampling rejected (400)"] += 1
        assume(False)  # only what the server accepts must sample finitely
    TRIED["sampling accepted"] += 1
    # the engine's order: OpenAI's adjustments (counts of the answer so far), then the sampling rules
    x = openai_adjusted(torch.tensor(logits, dtype=torch.float32), params,
                        torch.tensor(counts[:len(logits)], dtype=torch.float64))
    seen = torch.tensor(seen_bits[:len(logits)])
    g = torch.Generator().manual_seed(0)
    token = sample_token(x, params, g, seen)
    assert 0 <= token < len(logits)
    if params.temperature == 0:
        assert penalized_logits(x, params, seen)[token] == penalized_logits(x, params, seen).max()
        return
    probs = sampling_probs(x, params, seen)
    assert torch.isfinite(probs).all() and (probs >= 0).all() and math.isclose(float(probs.sum()), 1, abs_tol=1e-9)
    assert probs[token] > 0


@settings(max_examples=300, deadline=None, database=None)
@given(body=VALID_BODY | BROKEN_BODY)
def test_any_tools_and_messages_parse_to_a_renderable_chat_or_a_400(body):
    """Whatever tools, tool_choice and message lists hold: a 400 naming a field, or a chat the format renders and
    whose forced prefix (tool_choice) the reply reader takes."""
    try:
        messages = parse_messages(body.get("messages"))
        options = parse_tool_options(body)
    except APIError as e:
        assert e.status == 400 and e.message
        TRIED["tool fields 400"] += 1
        return
    text = chat_format.render(messages, options.tools, True, options.enable_thinking) + options.prefix
    assert text.endswith(options.prefix)
    chat_format.read_reply("</tool_call>", options.tools, options.start())
    TRIED["tool fields rendered" + (" with tools" if options.tools else "")] += 1


# ---------------------------------------------------------------- schemathesis against the live server's schema


@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])
def test_the_live_server_keeps_to_its_openapi_schema(fuzz_url, mode):
    """Cases made from /openapi.json (in schema and, negative, out of it) for every operation, checked by
    schemathesis: no 5xx, documented status codes and content types, responses that fit their schemas."""
    live = schemathesis.openapi.from_url(fuzz_url + "/openapi.json")
    operations = [result.ok() for result in live.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models"}
    for op in operations:
        if mode == schemathesis.GenerationMode.NEGATIVE and op.method.upper() != "POST":
            continue  # GET /health and /v1/models take no input that could be made invalid
        @settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode))
        def check(case):
            TRIED[f"schemathesis {mode.value} {op.method.upper()} {op.path}"] += 1
            case.call_and_validate(timeout=HANG_GUARD_S)

        check()


# ---------------------------------------------------------------- bounded load: 64 streams and 20 who leave


@pytest.fixture(scope="module")
def load_url(paths):
    proc, url = serve(paths)  # the 4096-token context: a client that leaves would otherwise run for minutes
    yield url
    stop(proc)


def test_64_streams_and_20_disconnects_leave_no_error_and_no_stuck_slot(load_url, engine):
    url = load_url
    prompts = questions(64)
    alone = [solo(engine, p, max_new_tokens=32).text for p in prompts]
    before = httpx.get(url + "/health").json()

    async def stream(client, messages, leave_after=None):
        body = {"messages": messages, "stream": True, "temperature": 0,
                **({"max_tokens": 32} if leave_after is None else {"ignore_eos": True})}  # leavers would run 4k
        pieces = []
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            n = 0
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                n += 1
                if leave_after is not None and n > leave_after:
                    return None  # leaving the block closes the connection mid-stream
                if line == "data: [DONE]":
                    return "".join(pieces)
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                if chunk["choices"]:
                    pieces.append(chunk["choices"][0]["delta"].get("content", ""))
        raise AssertionError("the stream ended without [DONE]")

    async def run():
        limits = httpx.Limits(max_connections=128, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=url, timeout=HANG_GUARD_S, limits=limits) as client:
            return await asyncio.gather(*[stream(client, p) for p in prompts],
                                        *[stream(client, prompts[i], leave_after=3) for i in range(20)])

    started = time.perf_counter()
    results = asyncio.run(run())
    served = time.perf_counter() - started
    assert results[:64] == alone  # every greedy answer equals its lone answer
    with httpx.Client(base_url=url, timeout=None) as client:
        def settled():  # the leavers' slots are freed once the server notices they left
            h = client.get("/health").json()
            return h["active"] == 0 and h["waiting"] == 0 and h
        health = wait_until(settled, "every slot is free")
    assert health["active"] == 0 and health["waiting"] == 0, health
    assert health["failed"] == before["failed"]
    assert health["cancelled"] - before["cancelled"] == 20  # each leaver was cancelled, none ran to the end
    assert health["completed"] - before["completed"] == 64
    TRIED["load: streams"] += 64
    TRIED["load: disconnects"] += 20
    print(f"\nload test: 64 streams + 20 disconnects served in {served:.1f} s; slots all free")
