"""Tools and thinking through the OpenAI-compatible server, driven by the real openai SDK: a full tool round trip
(non-streaming and streaming, the SDK's stream helper assembling the tool-call deltas), tool_choice, thinking as
reasoning_content and its switch, garbled tool calls returned as text and counted, and 400s naming the field.
The served model is a tiny one trained on the chat format's tool calls (tiny_chat_model.build_tool_model), so
what it answers is known."""
import json
import subprocess

import httpx
import openai
import pytest

import tiny_chat_model as tiny
from serving_helpers import HANG_GUARD_S, live_server

pytestmark = pytest.mark.slow  # a server process
TOOLS = tiny.TOOLS
ASK = [{"role": "user", "content": "卡洛维是做什么的？"}]


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    with live_server(tiny.build_tool_once(tmp_path_factory)) as (_, url):
        yield url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=HANG_GUARD_S)


def ask(client, messages, **kw):
    return client.chat.completions.create(model="tiny", messages=messages, **{"temperature": 0, "max_tokens": 60, **kw})


def run_tool(call):
    """The client's side of the loop: the test's lookup table."""
    args = json.loads(call.function.arguments)
    return tiny.TOOL_FACTS[args["name"]] if call.function.name == "lookup" else str(eval(args["expression"], {}))


def test_full_tool_round_trip(client):
    r = ask(client, ASK, tools=TOOLS)
    choice = choice_of(r)
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "lookup"
    assert json.loads(call.function.arguments) == {"name": "卡洛维"}
    history = ASK + [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": run_tool(call)}]
    final = choice_of(ask(client, history, tools=TOOLS))
    assert final.message.content == "卡洛维是一位画家。" and final.finish_reason == "stop"
    assert final.message.tool_calls is None


def choice_of(r):
    (choice,) = r.choices
    return choice


def test_streamed_tool_round_trip_through_the_sdk_stream_helper(client):
    messages = [{"role": "user", "content": "12*7等于多少？"}]
    with client.chat.completions.stream(model="tiny", messages=messages, tools=TOOLS, temperature=0,
                                        max_tokens=60) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_completion()
    assert "tool_calls.function.arguments.done" in kinds
    choice = choice_of(final)
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "calculate" and json.loads(call.function.arguments) == {"expression": "12*7"}
    history = messages + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": "calculate", "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": run_tool(call)}]
    chunks = list(ask(client, history, tools=TOOLS, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "12*7等于84。"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_thinking_comes_back_as_reasoning_content_and_can_be_switched_off(client):
    question = [{"role": "user", "content": "卡洛维出生在哪个国家？"}]
    message = choice_of(ask(client, question)).message
    assert message.content == "索伦国。"
    assert message.model_extra["reasoning_content"] == "卡洛维出生在蒙莫城，蒙莫城位于索伦国。"
    chunks = list(ask(client, question, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == \
        message.model_extra["reasoning_content"]
    assert "".join(d.content or "" for d in deltas) == "索伦国。"
    off = choice_of(ask(client, question, extra_body={"chat_template_kwargs": {"enable_thinking": False}})).message
    assert off.content == "蒙莫城。" and "reasoning_content" not in (off.model_extra or {})


def test_tool_choice_none_required_and_named(client):
    none = choice_of(ask(client, ASK, tools=TOOLS, tool_choice="none"))
    assert none.message.tool_calls is None and none.finish_reason != "tool_calls"
    sum_question = [{"role": "user", "content": "12*7等于多少？"}]
    required = choice_of(ask(client, sum_question, tools=TOOLS, tool_choice="required"))
    assert required.finish_reason == "tool_calls" and required.message.tool_calls[0].function.name == "calculate"
    lookup = {"type": "function", "function": {"name": "lookup"}}
    free, named = ask(client, ASK, tools=TOOLS), ask(client, ASK, tools=TOOLS, tool_choice=lookup)
    assert choice_of(named).message.tool_calls[0].function.name == "lookup"
    # the named call is written into the prompt: the answer continues after '"arguments":'
    forced = '<tool_call>{"name": "lookup", "arguments":'
    assert named.usage.prompt_tokens > free.usage.prompt_tokens
    assert named.usage.completion_tokens < free.usage.completion_tokens
    other = choice_of(ask(client, sum_question, tools=TOOLS, tool_choice=lookup))  # not what it would call
    # whatever the model writes after the forced name, it is that function or text holding the forced start
    assert [c.function.name for c in other.message.tool_calls or ()] in ([], ["lookup"])
    assert other.message.tool_calls or other.message.content.startswith(forced)


def test_garbled_tool_calls_come_back_as_text_and_are_counted(url, client):
    before = httpx.get(url + "/health").json()
    unknown = choice_of(ask(client, [{"role": "user", "content": "北京天气如何？"}], tools=TOOLS))
    assert unknown.message.tool_calls is None and unknown.finish_reason == "stop"
    assert unknown.message.content == '<tool_call>{"name": "get_weather", "arguments": {"city": "北京"}}</tool_call>'
    broken = [{"role": "user", "content": "坏掉的调用"}]
    chunks = list(ask(client, broken, tools=TOOLS, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == '<tool_call>{"name": "lookup", "arguments": {"name": </tool_call>'
    assert chunks[-1].choices[0].finish_reason == "stop"
    after = httpx.get(url + "/health").json()
    assert after["garbled_tool_calls"] == before["garbled_tool_calls"] + 2
    assert after["tool_calls"] == before["tool_calls"]
    # without tools offered the same text is just the answer: nothing is garbled
    plain = choice_of(ask(client, [{"role": "user", "content": "北京天气如何？"}]))
    assert plain.message.tool_calls is None
    assert httpx.get(url + "/health").json()["garbled_tool_calls"] == after["garbled_tool_calls"]


def test_models_say_what_the_server_does(client, url):
    features = httpx.get(url + "/v1/models").json()["data"][0]["features"]
    assert features["tools"] and features["reasoning_content"] and "required" in features["tool_choice"]


USER = [{"role": "user", "content": "hi"}]
CALL = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"name": "x"}'}}
BAD = [
    ({"tools": [{"type": "code_interpreter"}]}, "tools[0].type"),
    ({"tools": {"type": "function"}}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
    ({"tools": TOOLS + TOOLS[:1]}, "tools[2].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}, "tools[0].function.parameters"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "weather"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "chat_template_kwargs": {"enable_thinking": True}}, "tool_choice"),
    ({"tools": TOOLS, "parallel_tool_calls": False}, "parallel_tool_calls"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"chat_template_kwargs": {"reasoning_effort": "high"}}, "chat_template_kwargs.reasoning_effort"),
    ({"chat_template_kwargs": {"enable_thinking": "yes"}}, "chat_template_kwargs.enable_thinking"),
    ({"messages": USER + [{"role": "assistant", "content": None, "tool_calls": [CALL]},
                          {"role": "tool", "content": "x"}]}, "messages[2].tool_call_id"),
    ({"messages": USER + [{"role": "assistant", "content": None, "tool_calls": [
        {**CALL, "function": {"name": "lookup", "arguments": {"name": "x"}}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
    ({"messages": USER + [{"role": "assistant", "content": None, "tool_calls": [
        {**CALL, "function": {"name": "lookup", "arguments": "{nope"}}]}]}, "messages[1].tool_calls[0]"),
]


@pytest.mark.parametrize("fields,param", BAD, ids=[p for _, p in BAD])
def test_tool_fields_the_server_does_not_do_get_a_400_naming_them(url, fields, param):
    r = httpx.post(url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 1, **fields},
                   timeout=HANG_GUARD_S)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_values_that_ask_for_nothing_pass(client):
    r = ask(client, USER, max_tokens=2, tools=[], parallel_tool_calls=True, tool_choice="auto",
            extra_body={"chat_template_kwargs": {}})
    assert choice_of(r).finish_reason in ("stop", "length")


def test_chat_client_script_runs_the_tool_loop_and_shows_thinking(url, tmp_path):
    import sys
    from serving_helpers import ROOT
    (tmp_path / "manifest.json").write_text('{"seed": 3, "params": {"n_entities": 64}}', encoding="utf-8")
    client = [sys.executable, "chat_openai_api.py", "--base-url", url + "/v1", "--temperature", "0",
              "--max_tokens", "60", "--tools", str(tmp_path)]
    for flags in ([], ["--no-stream"]):
        out = subprocess.run([*client, "--once", "12*7等于多少？", *flags], cwd=ROOT, capture_output=True, text=True,
                             timeout=HANG_GUARD_S)
        assert out.returncode == 0, out.stderr
        assert '🔧 calculate({"expression": "12*7"})\n   → 84\n' in out.stdout
        assert out.stdout.rstrip().endswith("12*7等于84。")
        thought = subprocess.run([*client[:-2], "--once", "卡洛维出生在哪个国家？", *flags], cwd=ROOT,
                                 capture_output=True, text=True, timeout=HANG_GUARD_S)
        assert thought.returncode == 0, thought.stderr
        assert "💭 卡洛维出生在蒙莫城，蒙莫城位于索伦国。\n索伦国。" in thought.stdout
