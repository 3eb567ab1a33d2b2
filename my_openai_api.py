"""An OpenAI-compatible chat server for MiniMind (FastAPI + uvicorn): concurrent requests are decoded together,
one batched forward per step, each in its own cache slot with its own sampling state. Tool calls and thinking
follow OpenAI's tools API and DeepSeek's reasoning_content, over the chat format of model/chat_format.py.

    python my_openai_api.py --model out/full_sft_512.pth          # then point any OpenAI client at
    curl http://127.0.0.1:8998/v1/chat/completions -H "Content-Type: application/json" \\
         -d '{"messages": [{"role": "user", "content": "世界上最高的山是什么？"}], "stream": true}'
"""
import argparse
import asyncio
import codecs
import hmac
import json
import logging
import os
import re
import textwrap
import threading
import time
import uuid
import warnings
from contextlib import aclosing
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from model import chat_format
from model.checkpoint import weights_name
from model.cli import add_model_args, load_from_flags, script
from model.engine import Engine
from model.LMConfig import requested_shape
from model.sampling import SAMPLING_RULES, SamplingParams, sampling_problem
from model.scheduler import Scheduler, single_torch_thread

log = logging.getLogger("minimind.api")
ROLES = ("system", "user", "assistant", "tool", "developer")  # "developer" is OpenAI's newer name for system
DEFAULTS = SamplingParams()  # a field a request leaves out (or sends as null) gets its default
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: hundreds of thousands of characters, far beyond any context
DEFAULT_HEADER_TIMEOUT_S = 30  # a client has this long to send its request line and headers
DEFAULT_BODY_TIMEOUT_S = 60  # ... and this long for the whole body (1 MiB at 20 KB/s)
SURROGATE = re.compile("[\ud800-\udfff]")  # a lone UTF-16 half: valid in a JSON escape, not as text


class APIError(Exception):
    """An error the client caused (or may retry), sent as an OpenAI error object."""

    def __init__(self, status, message, param=None, code=None, type_="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def response(self, headers=None):
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        headers = {**(headers or {}), **({"WWW-Authenticate": "Bearer"} if self.status == 401 else {})}
        # ASCII JSON: a message quoting the client's text stays sendable even if that text holds lone surrogates
        return Response(json.dumps(body), status_code=self.status, headers=headers, media_type="application/json")


def bad(param, message, code=None):
    return APIError(400, message, param=param, code=code)


def short(value, limit=40):
    """repr of a client's value for an error message, cut to a readable length."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw):
    """The request body as a Python object, or a 400 invalid_json error saying why it is not one."""
    try:
        return json.loads(raw, parse_constant=reject_constant)
    except RecursionError:
        raise APIError(400, "the request body is not valid JSON: nested too deeply", code="invalid_json") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, NaN/Infinity, integers of over 4300 digits
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None


def is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def is_int(x):  # as in JSON Schema, 2.0 is an integer too (field() passes it on as int)
    return (isinstance(x, int) and not isinstance(x, bool)) or (isinstance(x, float) and x.is_integer())


def parse_messages(messages):
    if messages is None:
        raise bad("messages", "'messages' is required", "missing_required_parameter")
    if not isinstance(messages, list):
        raise bad("messages", f"'messages' must be an array, got {type(messages).__name__}")
    if not messages:
        raise bad("messages", "'messages' must contain at least one message")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}]", f"messages[{i}] must be an object")
        role, content = m.get("role"), m.get("content")
        if role is None:
            raise bad(f"messages[{i}].role", f"messages[{i}].role is required", "missing_required_parameter")
        if not isinstance(role, str) or role not in ROLES:
            raise bad(f"messages[{i}].role",
                      f"messages[{i}].role {short(role)} is not one of 'system', 'user', 'assistant', 'tool'")
        extras = message_tool_fields(i, m, role)
        if content is None and extras.get("tool_calls"):
            content = ""  # OpenAI sends null content beside tool calls
        if isinstance(content, list):  # content parts: only text is understood
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad(f"messages[{i}].content[{j}]", f"messages[{i}].content[{j}] must be a text part "
                              "{'type': 'text', 'text': ...}")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content", f"messages[{i}].content must be a string")
        if (half := SURROGATE.search(content)) is not None:
            raise bad(f"messages[{i}].content", f"messages[{i}].content holds a lone UTF-16 surrogate "
                      f"\\u{ord(half.group()):04x} at character {half.start()}: not valid Unicode text")
        out.append({"role": "system" if role == "developer" else role, "content": content, **extras})
    if not any(m["role"] in ("user", "assistant", "tool") for m in out):
        raise bad("messages", "'messages' must include a user, assistant or tool message")
    return out


def parse_logit_bias(value, vocab_size):
    """OpenAI's logit_bias, {"token id": bias}, as (id, bias) pairs; each key and value checked."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise bad("logit_bias", f"'logit_bias' must be an object mapping token ids to numbers, got {type(value).__name__}")
    pairs, low, high = [], rule_bounds("logit_bias")["minimum"], rule_bounds("logit_bias")["maximum"]
    for key, bias in value.items():
        if not (key.isascii() and key.strip().lstrip("-").isdigit()) or not 0 <= int(key) < vocab_size:
            raise bad("logit_bias", f"'logit_bias' key {short(key)} is not a token id of this model "
                      f"(an integer from 0 to {vocab_size - 1}, as a string)", "invalid_value")
        if not is_number(bias) or not low <= bias <= high:
            raise bad("logit_bias", f"'logit_bias' value {short(bias)} for token {key} must be a number from {low} "
                      f"to {high}", "invalid_value")
        pairs.append((int(key), float(bias)))
    return tuple(pairs)


# fields whose values ask for something this server does not do: each value here asks for nothing and passes;
# any other is a 400 naming the field (a missing or null field always passes)
NOTHING_ASKED = {
    "response_format": (lambda v: isinstance(v, dict) and v.get("type") == "text", '{"type": "text"}'),  # no JSON mode
    "functions": (lambda v: v == [], "[]"),  # OpenAI's deprecated tool fields (tools and tool_choice are served)
    "function_call": (lambda v: v in ("none", "auto"), '"none" or "auto"'),
    "audio": (None, ""), "prediction": (None, ""), "web_search_options": (None, ""),  # nor audio, predictions, search
    "modalities": (lambda v: v == ["text"], '["text"]'),
    "store": (lambda v: v is False, "false"),  # nothing is stored
}
TYPED = {  # optional fields that ask for nothing either way, checked for their type
    "user": (str, "a string"), "metadata": (dict, "an object"), "parallel_tool_calls": (bool, "a boolean"),
    "service_tier": (str, "a string"),
}


def refuse_unsupported(body):
    for name, (asks_nothing, allowed) in NOTHING_ASKED.items():
        value = body.get(name)
        if value is not None and not (asks_nothing and asks_nothing(value)):
            said = f"only {allowed} (or null)" if allowed else "null"
            raise bad(name, f"'{name}' {short(value)} asks for what this server does not do; it accepts {said}",
                      "unsupported_value")
    for name, (kind, what) in TYPED.items():
        value = body.get(name)
        if value is not None and not isinstance(value, kind):
            raise bad(name, f"'{name}' must be {what}, got {type(value).__name__}")


def parse_request(body, prompt=("messages", parse_messages), vocab_size=2 ** 31):
    """Validated (messages, SamplingParams, stream, include_usage) from a request body; unknown fields ignored.
    prompt: the field that holds the prompt and its parser (/v1/completions: "prompt", parse_prompts)."""
    if not isinstance(body, dict):
        raise bad(None, "the request body must be a JSON object")
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise bad("model", f"'model' must be a string, got {type(body['model']).__name__}")
    messages = prompt[1](body.get(prompt[0]))
    refuse_unsupported(body)

    def field(name, default, rule=None, kind=(is_number, "a number")):
        """The value of a request field; `rule`: the sampling rule it must meet (SAMPLING_RULES's name)."""
        value = body.get(name)
        if value is None:
            return default
        if not kind[0](value):
            raise bad(name, f"'{name}' must be {kind[1]}, got {type(value).__name__}")
        if kind[0] is is_int:
            value = int(value)
        if rule and (why := sampling_problem(rule, value)):
            raise bad(name, f"'{name}' is {short(value)}; it {why}", "invalid_value")
        return value

    integer = partial(field, kind=(is_int, "an integer"))

    temperature = field("temperature", DEFAULTS.temperature, "temperature")
    top_p = field("top_p", DEFAULTS.top_p, "top_p")
    repetition_penalty = field("repetition_penalty", DEFAULTS.repetition_penalty, "repetition_penalty")
    frequency_penalty = field("frequency_penalty", DEFAULTS.frequency_penalty, "frequency_penalty")
    presence_penalty = field("presence_penalty", DEFAULTS.presence_penalty, "presence_penalty")
    logit_bias = parse_logit_bias(body.get("logit_bias"), vocab_size)
    top_k = integer("top_k", DEFAULTS.top_k, "top_k")
    if (n := integer("n", 1)) != 1:
        raise bad("n", f"'n' is {short(n)}; it must be 1 (one choice per request)", "invalid_value")
    seed = integer("seed", None)
    seed = None if seed is None else seed % 2**64  # any integer: the generator takes 64 bits
    limits = [integer(name, None, "max_new_tokens")
              for name in ("max_tokens", "max_completion_tokens")]  # both checked; max_tokens wins
    max_tokens = limits[0] if limits[0] is not None else limits[1]

    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad("stream", "'stream' must be a boolean")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) for s in stop)):
        raise bad("stop", "'stop' must be a string or an array of strings")
    if stop and len(stop) > 16:
        raise bad("stop", "'stop' may hold at most 16 strings")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("stream_options", "'stream_options' must be an object")
    include_usage = (options or {}).get("include_usage")
    include_usage = False if include_usage is None else include_usage
    if not isinstance(include_usage, bool):
        raise bad("stream_options.include_usage", "'stream_options.include_usage' must be a boolean")
    ignore_eos = body.get("ignore_eos")
    if ignore_eos is None:
        ignore_eos = False
    if not isinstance(ignore_eos, bool):
        raise bad("ignore_eos", "'ignore_eos' must be a boolean")
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise bad("logprobs", "'logprobs' must be a boolean")
    top_logprobs = integer("top_logprobs", 0, "logprobs")
    if top_logprobs and not logprobs:
        raise bad("top_logprobs", "'top_logprobs' needs 'logprobs': true", "invalid_value")
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
                            frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                            logit_bias=logit_bias, max_new_tokens=max_tokens, stop=tuple(stop or ()), seed=seed,
                            ignore_eos=ignore_eos, logprobs=top_logprobs if logprobs else None)
    return messages, params, bool(stream), include_usage


MAX_PROMPTS = 2048  # prompts in one /v1/completions request


def parse_prompts(prompt):
    """The prompts of /v1/completions: a string, strings, token ids or lists of token ids -> [str | [int]]."""
    if prompt is None:
        raise bad("prompt", "'prompt' is required", "missing_required_parameter")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt)):
        prompt, names = [prompt], ["prompt"]
    elif isinstance(prompt, list) and prompt and is_int(prompt[0]):  # token ids, one of them something else
        i = next(i for i, t in enumerate(prompt) if not is_int(t))
        raise bad(f"prompt[{i}]", f"prompt[{i}] must be a token id (an integer), as the ids before it are")
    elif isinstance(prompt, list) and prompt:
        names = [f"prompt[{i}]" for i in range(len(prompt))]
    else:
        raise bad("prompt", "'prompt' must be a non-empty string, array of strings, array of token ids or array "
                  "of token-id arrays")
    if len(prompt) > MAX_PROMPTS:
        raise bad("prompt", f"'prompt' holds {len(prompt)} prompts; at most {MAX_PROMPTS} per request")
    out = []
    for name, p in zip(names, prompt):
        if isinstance(p, str):
            if (half := SURROGATE.search(p)) is not None:
                raise bad(name, f"{name} holds a lone UTF-16 surrogate \\u{ord(half.group()):04x} at character "
                          f"{half.start()}: not valid Unicode text")
            out.append(p)
        elif isinstance(p, list) and p and all(is_int(t) for t in p):
            out.append([int(t) for t in p])
        else:
            raise bad(name, f"{name} must be a non-empty string or a non-empty array of token ids")
    return out


def parse_completion_request(body, vocab_size=2 ** 31):
    """Validated (prompts, SamplingParams, stream, include_usage, echo) of a /v1/completions body: the chat
    fields as parse_request has them, and the legacy endpoint's own: max_tokens (default 16; 0 scores the
    prompt without generating), echo, logprobs (an integer: the alternatives per token), suffix and best_of."""
    if not isinstance(body, dict):
        raise bad(None, "the request body must be a JSON object")
    own = ("max_tokens", "logprobs", "echo", "top_logprobs", "max_completion_tokens")  # not chat's meaning
    shared = {k: v for k, v in body.items() if k not in own}
    max_tokens = body.get("max_tokens")
    if max_tokens is not None and not (is_int(max_tokens) and int(max_tokens) == 0):
        shared["max_tokens"] = max_tokens  # checked as chat checks it
    prompts, params, stream, include_usage = parse_request(shared, ("prompt", parse_prompts), vocab_size)
    max_tokens = 16 if max_tokens is None else params.max_new_tokens if "max_tokens" in shared else 0
    echo = body.get("echo")
    if echo is not None and not isinstance(echo, bool):
        raise bad("echo", "'echo' must be a boolean")
    logprobs = body.get("logprobs")
    logprobs = None if logprobs is False else logprobs  # asks for nothing
    if logprobs is not None:
        if not is_int(logprobs):
            raise bad("logprobs", f"'logprobs' must be an integer (alternatives per token), got "
                      f"{type(logprobs).__name__}")
        if why := sampling_problem("logprobs", int(logprobs)):
            raise bad("logprobs", f"'logprobs' is {short(logprobs)}; it {why}", "invalid_value")
        logprobs = int(logprobs)
    if body.get("suffix") not in (None, ""):
        raise bad("suffix", "'suffix' is not supported: this model does not fill in the middle", "invalid_value")
    if body.get("best_of") is not None and not (is_int(body["best_of"]) and int(body["best_of"]) == 1):
        raise bad("best_of", f"'best_of' is {short(body['best_of'])}; it must be 1 (one choice per prompt)",
                  "invalid_value")
    scored = logprobs if echo and logprobs is not None else 0 if max_tokens == 0 else None  # 0: prefill only
    params = replace(params, max_new_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=scored)
    return prompts, params, stream, include_usage, bool(echo)


# ---------------------------------------------------------------------------------------------------------
# tools and thinking: OpenAI's tools API and DeepSeek's reasoning_content over model/chat_format.py


def message_tool_fields(i, m, role):
    """The tool-call fields of message i: an assistant's tool_calls and reasoning_content, a tool's tool_call_id."""
    out = {}
    if role == "assistant":
        calls = m.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, list):
                raise bad(f"messages[{i}].tool_calls", f"messages[{i}].tool_calls must be an array")
            out["tool_calls"] = []
            for j, call in enumerate(calls):
                where = f"messages[{i}].tool_calls[{j}]"
                if not isinstance(call, dict) or call.get("type", "function") != "function" \
                        or not isinstance(call.get("function"), dict):
                    raise bad(where, f"{where} must be {{'type': 'function', 'function': {{'name', 'arguments'}}}}")
                if not isinstance(call["function"].get("arguments"), str):
                    raise bad(f"{where}.function.arguments", f"{where}.function.arguments must be a JSON string")
                try:
                    checked = chat_format.check_call(call, where)
                except chat_format.FormatError as e:
                    raise bad(where, str(e)) from None
                # the arguments as the model wrote them: what a client sends back is rendered verbatim
                out["tool_calls"].append({"name": checked["name"], "arguments": call["function"]["arguments"]})
        reasoning = m.get("reasoning_content")
        if reasoning is not None:
            if not isinstance(reasoning, str) or SURROGATE.search(reasoning):
                raise bad(f"messages[{i}].reasoning_content", f"messages[{i}].reasoning_content must be text")
            out["reasoning_content"] = reasoning
    elif role == "tool" and not isinstance(m.get("tool_call_id"), str):
        raise bad(f"messages[{i}].tool_call_id", f"messages[{i}].tool_call_id is required: the id of the call "
                  "this message answers", "missing_required_parameter")
    return out


@dataclass
class ChatOptions:
    """What a request asks of the chat format: the tools offered, the forced start of a tool call, thinking."""
    tools: list = None  # offered to the model; None when none are offered or tool_choice is "none"
    prefix: str = ""  # tool_choice "required" or named: the answer starts as a tool call
    enable_thinking: bool = None  # None: the model decides

    def start(self):
        """The part of the answer the prompt already holds, which the reply reader reads first."""
        think = {False: chat_format.THINK_OFF, True: chat_format.THINK_OPEN}.get(self.enable_thinking, "")
        return think + self.prefix


def parse_tool_options(body):
    """ChatOptions from tools, tool_choice, parallel_tool_calls and chat_template_kwargs (400 naming the field)."""
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise bad("tools", "'tools' must be an array of function definitions")
    names = []
    for i, tool in enumerate(tools or ()):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise bad(f"tools[{i}].type", f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}: "
                      "this server calls functions only")
        f = tool.get("function")
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not chat_format.TOOL_NAME.fullmatch(f["name"]):
            raise bad(f"tools[{i}].function.name", f"tools[{i}].function.name must be 1-64 letters, digits, '_' "
                      "or '-'")
        if f["name"] in names:
            raise bad(f"tools[{i}].function.name", f"tools[{i}]: the function name {f['name']!r} is given twice")
        names.append(f["name"])
        description, params = f.get("description"), f.get("parameters")
        if description is not None and (not isinstance(description, str) or SURROGATE.search(description)):
            raise bad(f"tools[{i}].function.description", f"tools[{i}].function.description must be text")
        if params is not None and (not isinstance(params, dict)
                                   or not isinstance(params.get("properties", {}), (dict, type(None)))):
            raise bad(f"tools[{i}].function.parameters", f"tools[{i}].function.parameters must be a JSON Schema "
                      "object whose 'properties' is an object")
        if SURROGATE.search(" ".join(map(str, (params or {}).get("properties") or {}))):
            raise bad(f"tools[{i}].function.parameters", f"tools[{i}].function.parameters names must be text")
    choice = body.get("tool_choice")
    if choice is None:
        choice = "auto"
    named = choice.get("function", {}).get("name") if isinstance(choice, dict) and \
        choice.get("type") == "function" and isinstance(choice.get("function"), dict) else None
    if choice not in ("auto", "none", "required") and not isinstance(named, str):
        raise bad("tool_choice", "'tool_choice' must be 'auto', 'none', 'required' or "
                  "{'type': 'function', 'function': {'name': ...}}")
    if (choice == "required" or named) and not names:
        raise bad("tool_choice", "'tool_choice' asks for a tool call but no 'tools' are given")
    if named and named not in names:
        raise bad("tool_choice", f"'tool_choice' names {short(named)}, which is not among the tools")
    if body.get("parallel_tool_calls") not in (None, True):
        raise bad("parallel_tool_calls", "'parallel_tool_calls' false is not supported: the model may call several "
                  "tools in one answer")
    for legacy, nothing in (("functions", ([],)), ("function_call", ("none", "auto"))):
        if body.get(legacy) is not None and body[legacy] not in nothing:
            raise bad(legacy, f"'{legacy}' is OpenAI's deprecated form of tools; send 'tools' and 'tool_choice'")
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise bad("chat_template_kwargs", "'chat_template_kwargs' must be an object")
    for key in kwargs or ():
        if key != "enable_thinking":
            raise bad(f"chat_template_kwargs.{key}", f"chat_template_kwargs.{short(key)} is not understood: the "
                      "template takes only 'enable_thinking'")
    thinking = (kwargs or {}).get("enable_thinking")
    if thinking is not None and not isinstance(thinking, bool):
        raise bad("chat_template_kwargs.enable_thinking", "chat_template_kwargs.enable_thinking must be a boolean")
    forced = choice == "required" or bool(named)
    if forced and thinking:
        raise bad("tool_choice", "a forced tool call starts the answer, so it cannot also start with thinking "
                  "(chat_template_kwargs.enable_thinking: true)")
    offered = tools if names and choice != "none" else None
    return ChatOptions(offered, chat_format.forced_call_prefix(named) if forced else "", thinking)


def openai_tool_call(call, index=None):
    out = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
           "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}
    return out if index is None else {"index": index, **out}


def assistant_message(events):
    """The chat.completion message of a whole answer's events: content, reasoning_content, tool_calls."""
    content = "".join(t for k, t in events if k == "content")
    reasoning = "".join(t for k, t in events if k == "reasoning")
    calls = [openai_tool_call(c) for k, c in events if k == "call"]
    message = {"role": "assistant", "content": content or (None if calls else "")}
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = calls
    return message


def stream_deltas(events, n_calls):
    """Chunk deltas for reader events, tool calls as OpenAI streams them: the name first, then the arguments."""
    deltas = []
    for kind, value in events:
        if kind == "call":
            call = openai_tool_call(value, n_calls)
            arguments = call["function"].pop("arguments")
            call["function"]["arguments"] = ""
            deltas += [{"tool_calls": [call]}, {"tool_calls": [{"index": n_calls, "function": {"arguments": arguments}}]}]
            n_calls += 1
        else:
            deltas.append({"reasoning_content" if kind == "reasoning" else "content": value})
    return deltas, n_calls


def reply_deltas(reply, delta, final=False):
    """Stream deltas of generated text: reasoning_content, content and tool-call deltas."""
    first_index = reply.n_calls
    return stream_deltas(reply.read(delta, final), first_index)[0]


def model_features():
    """What /v1/models says the server does with this model's chat format."""
    return {"tools": True, "tool_choice": ["auto", "none", "required", "named"], "parallel_tool_calls": True,
            "reasoning_content": True, "chat_template_kwargs": ["enable_thinking"], "logprobs": True,
            "completions": True, "chat_format": "model/chat_format.py"}


class EventRelay:
    """Carries generation events from the scheduler thread to the event loop, waking the loop once per batch of
    events rather than once per token: with 16 streams that is one wake-up per decode step instead of 16."""

    def __init__(self, loop):
        self.loop, self.pending, self.lock, self.scheduled = loop, [], threading.Lock(), False

    def put(self, queue, event):  # any thread
        with self.lock:
            self.pending.append((queue, event))
            if self.scheduled:
                return
            self.scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the event loop is gone (shutdown)
            pass

    def _deliver(self):  # the event loop's thread
        with self.lock:
            pending, self.pending, self.scheduled = self.pending, [], False
        for queue, event in pending:
            queue.put_nowait(event)


ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}


def rule_bounds(name):
    """The JSON-schema bounds of a sampling rule, read from its wording in SAMPLING_RULES (the one statement of the
    ranges): {"minimum": .., "maximum": ..}, or a list of alternatives for "A (..) or at least B"."""
    number = lambda text: float(text) if "." in text else int(text)  # noqa: E731
    rule = SAMPLING_RULES[name][1]
    if m := re.fullmatch(r"between (\S+) and (\S+)( for each token)?", rule):
        return {"minimum": number(m[1]), "maximum": number(m[2])}
    if m := re.fullmatch(r"greater than (\S+) and at most (\S+)", rule):
        return {"exclusiveMinimum": number(m[1]), "maximum": number(m[2])}
    if m := re.fullmatch(r"(\S+) \(.*\) or more", rule):
        return {"minimum": number(m[1])}
    if m := re.fullmatch(r"(\S+) \(.*\) or at least (\S+)", rule):
        return [{"const": number(m[1])}, {"minimum": number(m[2])}]
    raise ValueError(f"SAMPLING_RULES[{name!r}] {rule!r}: a wording rule_bounds does not read")


def rule_range(name):
    """A sampling rule as an interval, for the help text: [0, 2], (0, 1], >= 0."""
    b = rule_bounds(name)
    if "maximum" not in b:
        return f">= {b['minimum']}"
    low = f"({b['exclusiveMinimum']}" if "exclusiveMinimum" in b else f"[{b['minimum']}"
    return f"{low}, {b['maximum']}]"


def ranged(name, kind="number"):
    """The schema of an optional request field that follows a sampling rule (null: the default)."""
    return {"type": [kind, "null"], **rule_bounds(name)}


TOKEN_LIMIT = {"type": ["integer", "null"], "anyOf": [*rule_bounds("max_new_tokens"), {"type": "null"}]}
CHAT_REQUEST_SCHEMA = {  # what parse_request accepts (null means "the default" for every optional field)
    "type": "object", "required": ["messages"],
    "properties": {
        "model": {"type": ["string", "null"]},
        "messages": {"type": "array", "contains": {"required": ["role"], "properties": {
            "role": {"enum": ["user", "assistant", "tool"]}}}, "items": {
            "type": "object", "required": ["role", "content"],
            "properties": {"role": {"enum": list(ROLES)}, "content": {"anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "object", "required": ["type", "text"], "properties": {
                    "type": {"const": "text"}, "text": {"type": "string"}}}}]}},
            # a tool result names the call it answers
            "if": {"properties": {"role": {"const": "tool"}}}, "then": {"required": ["tool_call_id"], "properties": {
                "tool_call_id": {"type": "string"}}}}},
        "temperature": ranged("temperature"), "top_p": ranged("top_p"), "top_k": ranged("top_k", "integer"),
        "repetition_penalty": ranged("repetition_penalty"), "frequency_penalty": ranged("frequency_penalty"),
        "presence_penalty": ranged("presence_penalty"),
        "logit_bias": {"type": ["object", "null"]},  # (narrowed to the model's token ids by logit_bias_schema)
        "response_format": {"anyOf": [{"type": "null"}, {"type": "object", "required": ["type"],
                                                          "properties": {"type": {"const": "text"}}}]},
        "functions": {"type": ["array", "null"], "maxItems": 0}, "function_call": {"enum": ["none", "auto", None]},
        "audio": {"type": "null"}, "prediction": {"type": "null"}, "web_search_options": {"type": "null"},
        "modalities": {"anyOf": [{"type": "null"}, {"const": ["text"]}]}, "store": {"enum": [False, None]},
        "user": {"type": ["string", "null"]}, "metadata": {"type": ["object", "null"]},
        "parallel_tool_calls": {"enum": [True, None]}, "service_tier": {"type": ["string", "null"]},
        "max_tokens": TOKEN_LIMIT, "max_completion_tokens": TOKEN_LIMIT,
        "n": {"type": ["integer", "null"], "enum": [1, None]},
        "seed": {"type": ["integer", "null"]},
        "stream": {"type": ["boolean", "null"]},
        "stream_options": {"type": ["object", "null"], "properties": {"include_usage": {"type": ["boolean", "null"]}}},
        "stop": {"anyOf": [{"type": "string"}, {"type": "array", "maxItems": 16, "items": {"type": "string"}},
                           {"type": "null"}]},
        "ignore_eos": {"type": ["boolean", "null"]},
        "logprobs": {"type": ["boolean", "null"]},
        "top_logprobs": {"type": ["integer", "null"], "anyOf": [rule_bounds("logprobs"), {"type": "null"}]},
    },
    # top_logprobs from 1 on needs logprobs: true
    "if": {"required": ["top_logprobs"], "properties": {"top_logprobs": {"type": "integer", "minimum": 1}}},
    "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}}


def logit_bias_schema(vocab_size):
    """logit_bias keys as ids of a model with vocab_size tokens (as many digits as always fit), values as
    SAMPLING_RULES["logit_bias"] says."""
    return {"type": ["object", "null"], "propertyNames": {"pattern": f"^[0-9]{{1,{len(str(vocab_size)) - 1}}}$"},
            "additionalProperties": {"type": "number", **rule_bounds("logit_bias")}}


def completion_request_schema(vocab_size):
    """What parse_completion_request accepts, for a model with vocab_size token ids."""
    ids = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0, "maximum": vocab_size - 1}}
    text = {"type": "string", "minLength": 1}
    chat_only = ("messages", "max_completion_tokens", "logprobs", "top_logprobs")
    shared = {k: v for k, v in CHAT_REQUEST_SCHEMA["properties"].items() if k not in chat_only}
    return {"type": "object", "required": ["prompt"], "properties": {
        **shared, "logit_bias": logit_bias_schema(vocab_size),
        "prompt": {"anyOf": [text, ids, {"type": "array", "minItems": 1, "maxItems": MAX_PROMPTS, "items": text},
                             {"type": "array", "minItems": 1, "maxItems": MAX_PROMPTS, "items": ids}]},
        "max_tokens": {"type": ["integer", "null"], "anyOf": [{"minimum": -1}, {"type": "null"}]},
        "echo": {"type": ["boolean", "null"]},
        "logprobs": {"anyOf": [{"type": "integer", **rule_bounds("logprobs")}, {"const": False}, {"type": "null"}]},
        "suffix": {"type": ["string", "null"], "maxLength": 0},
        "best_of": {"type": ["integer", "null"], "enum": [1, None]},
    }}


def error_responses(*statuses):
    """OpenAPI entries for the error statuses a route can answer, all in the OpenAI error schema."""
    return {s: {"description": "an OpenAI error object", "content": {"application/json": {"schema": ERROR_SCHEMA}}}
            for s in statuses}


def peer(request):
    return "%s:%d" % tuple(request.client) if request.client else "a client"


async def read_body(request, limit, timeout=None):
    """The request body; a 413 error as soon as it is known to exceed `limit` bytes, a 408 when it has not all
    arrived within `timeout` seconds. A client that leaves before sending all of it is one log line."""
    def too_large():
        return APIError(413, f"the request body is over the server's limit of {limit} bytes (--max-body-bytes)",
                        code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large()
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large()
                chunks.append(chunk)
    except ClientDisconnect:
        log.warning("%s went away after %d of %s body bytes; request abandoned", peer(request), size,
                    length or "?")
        raise Abandoned() from None
    except TimeoutError:
        log.warning("%s sent %d of %s body bytes in %g s; request abandoned with 408 (--body-timeout)",
                    peer(request), size, length or "?", timeout)
        raise APIError(408, f"the request body did not arrive within {timeout:g} s (--body-timeout)",
                       code="request_timeout") from None
    return b"".join(chunks)


class Abandoned(Exception):
    """The client left while its request was being read: nobody to answer (logged once, where it was seen)."""


def with_header_timeout(seconds):
    """uvicorn's HTTP/1.1 protocol, closing a connection whose request headers are not complete `seconds` after
    they were due (from the connection's start, or from the first byte of a later request on it). uvicorn has no
    such timer: a connection that opens and sends nothing, or headers that never end, would stay open for ever.
    (Idle keep-alive connections between requests are closed by uvicorn's --timeout-keep-alive.)"""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):
        header_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._watch_headers()

        def data_received(self, data):
            super().data_received(data)
            self._watch_headers()

        def _watch_headers(self):
            waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
            if waiting and self.header_timer is None and self.timeout_keep_alive_task is None:
                self.header_timer = self.loop.call_later(seconds, self._headers_late)
            elif not waiting and self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def _headers_late(self):
            self.header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                who = "%s:%d" % tuple(self.client) if self.client else "a client"
                log.warning("closed the connection from %s: no complete request headers within %g s "
                            "(--header-timeout)", who, seconds)
                self.transport.close()

        def connection_lost(self, exc):
            if self.header_timer is not None:
                self.header_timer.cancel()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol


async def generation(scheduler, req, queue, request):
    """The one event stream of a request, which both response kinds consume: (text, None) for what was generated
    since the last item (("", None) after a quiet half second), then (text, finish_reason). It ends without a
    finish reason when the client has gone away; whenever it is left before the end (the client went away, the
    response was cancelled, a consumer stopped) the request is cancelled and its slot freed."""
    finish, last_check = None, time.monotonic()
    try:
        while finish is None:
            try:
                async with asyncio.timeout(0.5):  # no task per token, unlike wait_for
                    delta, finish = await queue.get()
            except TimeoutError:
                delta = ""
            pieces = [delta]
            while finish is None and not queue.empty():  # coalesce what piled up while we were busy
                delta, finish = queue.get_nowait()
                pieces.append(delta)
            if finish is None and time.monotonic() - last_check > 0.5:
                last_check = time.monotonic()
                if await request.is_disconnected():
                    return
            yield "".join(pieces), finish
    finally:
        if finish is None:
            scheduler.cancel(req)


class TokenText:
    """Tokens as the OpenAI logprobs objects show them: text (bytes that are not whole UTF-8 characters as \\xNN
    escapes), raw bytes, and a special token as its name."""

    def __init__(self, engine):
        self.engine = engine

    def bytes(self, token):
        return self.engine.token_bytes[token] or self.engine.tokenizer.convert_ids_to_tokens(token).encode()

    def text(self, token):
        return self.bytes(token).decode("utf-8", errors="backslashreplace")

    def generated(self, req, start=0):
        """req.logprobs from `start` without a final </s> (the answer's text does not hold it either)."""
        entries = req.logprobs[start:]
        ends = not req.params.ignore_eos and entries and entries[-1].token == self.engine.eos_id
        return entries[:-1] if ends else entries

    def chat(self, entries):
        """Chat completions' logprobs.content entries."""
        def one(token, logprob):
            raw = self.bytes(token)
            return {"token": raw.decode("utf-8", errors="backslashreplace"), "logprob": logprob, "bytes": list(raw)}
        return [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries]

    def legacy(self, tokens, entries, offset=0):
        """The legacy completions' logprobs object of `tokens`, whose entries (TokenLogprob, or None for a first
        prompt token) line up with them; text_offset counts characters from `offset`."""
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, e in zip(tokens, entries):
            out["tokens"].append(self.text(token))
            out["token_logprobs"].append(None if e is None else e.logprob)
            top = None
            if e is not None:
                top = {}
                for t, lp in e.top:
                    top.setdefault(self.text(t), lp)  # two ids with one text: the likelier one stays
            out["top_logprobs"].append(top)
            out["text_offset"].append(offset)
            offset += len(decoder.decode(self.engine.token_bytes[token]))
        return out


class Reply:
    """The OpenAI objects of one answer: chat.completion, its chat.completion.chunk events, usage."""

    def __init__(self, model_name, req, tokens=None, options=None, stats=None):
        self.model, self.req, self.tokens = model_name, req, tokens
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        self.logprobs_sent = 0
        options = options or ChatOptions()
        self.reader = chat_format.ReplyReader(options.tools, options.start())  # thinking, content, tool calls
        self.stats, self.n_calls = stats if stats is not None else {}, 0

    def new_logprobs(self):
        """The logprobs object for the tokens generated since the last call (None when not asked for)."""
        if self.req.params.logprobs is None:
            return None
        entries = self.tokens.generated(self.req, self.logprobs_sent)
        self.logprobs_sent += len(entries)
        return {"content": self.tokens.chat(entries), "refusal": None}

    def read(self, delta, final=False):
        """Reader events for generated text; at the end the answer's tool calls are counted (/health)."""
        events = self.reader.feed(delta) + (self.reader.close() if final else [])
        self.n_calls += sum(kind == "call" for kind, _ in events)
        if final:
            for key, n in (("tool_calls", self.n_calls), ("garbled_tool_calls", self.reader.garbled)):
                self.stats[key] = self.stats.get(key, 0) + n
        return events

    def finish_reason(self, finish):
        return "tool_calls" if self.n_calls and finish == "stop" else finish

    def usage(self):
        prompt, generated = len(self.req.prompt_ids), self.req.n_generated
        return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}

    def completion(self, text, finish):
        message = assistant_message(self.read(text, final=True))
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": message, "finish_reason": self.finish_reason(finish),
                             "logprobs": self.new_logprobs()}],
                "usage": self.usage()}

    def chunk(self, delta, finish=None, with_usage=False):
        data = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [] if with_usage else [{"index": 0, "delta": delta, "finish_reason": finish,
                                                   "logprobs": None if delta is None else self.new_logprobs()}]}
        if with_usage:
            data["usage"] = self.usage()
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def whole_answer(reply, events, headers):
    """A non-streaming response: the events gathered into one chat.completion."""
    pieces, finish = [], None
    async with aclosing(events):
        async for delta, finish in events:
            pieces.append(delta)
    if finish is None:
        return JSONResponse({}, status_code=499)  # nobody is listening any more
    if finish == "error":
        raise APIError(500, "generation failed", type_="server_error")
    return JSONResponse(reply.completion("".join(pieces), finish), headers=headers)


async def sse(reply, events, include_usage):
    """A streaming response: each event as a chunk, then the finish chunk, usage if asked, and [DONE]. (When the
    client disconnects, the server cancels this generator, which closes the events and so the request.)"""
    finish = None
    async with aclosing(events):
        yield reply.chunk({"role": "assistant", "content": ""})
        async for delta, finish in events:
            if finish == "error":
                err = {"message": "generation failed", "type": "server_error", "param": None, "code": None}
                yield f"data: {json.dumps({'error': err})}\n\n"
                return
            if delta:
                for chunk in reply_deltas(reply, delta):
                    yield reply.chunk(chunk)
    if finish is None:
        return  # the client has gone away
    for chunk in reply_deltas(reply, "", final=True):
        yield reply.chunk(chunk)
    yield reply.chunk({}, reply.finish_reason(finish))
    if include_usage:
        yield reply.chunk(None, with_usage=True)
    yield "data: [DONE]\n\n"


async def merged(streams):
    """(index, delta, finish) from several generation() streams as their events come; leaving it early closes
    them all (and so cancels their requests)."""
    queue, done = asyncio.Queue(), object()

    async def pump(i, events):
        try:
            async with aclosing(events):
                async for delta, finish in events:
                    queue.put_nowait((i, delta, finish))
        finally:
            queue.put_nowait((i, done, None))
    tasks = [asyncio.create_task(pump(i, events)) for i, events in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, delta, finish = await queue.get()
            if delta is done:
                left -= 1
            else:
                yield i, delta, finish
    finally:
        for task in tasks:
            task.cancel()


class TextReply:
    """The legacy endpoint's objects: text_completion (one choice per prompt), its stream chunks, usage."""

    def __init__(self, model_name, reqs, prompts, echo, tokens):
        self.model, self.reqs, self.echo, self.tokens = model_name, reqs, echo, tokens
        self.id, self.created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        decode = tokens.engine.tokenizer.decode
        self.prompt_text = [p if isinstance(p, str) and not r.truncated else decode(r.prompt_ids)
                            for p, r in zip(prompts, reqs)]
        self.offset = [0] * len(reqs)  # characters of text sent per choice
        self.sent = [0] * len(reqs)  # generated tokens whose logprobs were sent per choice

    def usage(self):
        prompt, generated = sum(len(r.prompt_ids) for r in self.reqs), sum(r.n_generated for r in self.reqs)
        return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}

    def choice(self, i, text, finish=None, start=False):
        """Choice i with `text` (the prompt first when echoing, at the start) and the logprobs of the tokens
        generated since the last choice i."""
        r, echoed = self.reqs[i], start and self.echo
        if echoed:
            text, self.offset[i] = self.prompt_text[i] + text, len(self.prompt_text[i])
        logprobs = None
        if r.params.logprobs is not None:
            # a final </s> is listed too, as OpenAI and vLLM list it: lm-eval's local-completions scores a prompt
            # as all entries but the one generated token, so that token must always be there
            entries = r.logprobs[self.sent[i]:]
            ids = r.token_ids[self.sent[i]:self.sent[i] + len(entries)]
            self.sent[i] += len(entries)
            logprobs = self.tokens.legacy(ids, entries, self.offset[i])
            if echoed:
                head = self.tokens.legacy(r.prompt_ids, r.prompt_logprobs)
                logprobs = {k: head[k] + logprobs[k] for k in head}
        self.offset[i] = (0 if echoed else self.offset[i]) + len(text)
        return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def completion(self, texts, finishes):
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [self.choice(i, t, f, start=True) for i, (t, f) in enumerate(zip(texts, finishes))],
                "usage": self.usage()}

    def chunk(self, choices, with_usage=False):
        data = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices}
        if with_usage:
            data["usage"] = self.usage()
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def whole_texts(reply, events, headers):
    """A non-streaming legacy response: every prompt's events gathered into one text_completion."""
    n = len(reply.reqs)
    pieces, finishes = [[] for _ in range(n)], [None] * n
    async with aclosing(events):
        async for i, delta, finish in events:
            pieces[i].append(delta)
            finishes[i] = finish or finishes[i]
    if "error" in finishes:
        raise APIError(500, "generation failed", type_="server_error")
    if None in finishes:
        return JSONResponse({}, status_code=499)  # nobody is listening any more
    return JSONResponse(reply.completion(["".join(p) for p in pieces], finishes), headers=headers)


async def text_sse(reply, events, include_usage):
    """A streaming legacy response: per choice its text as it comes (the prompt first when echoing), a finish
    chunk, then usage if asked and [DONE]."""
    started, finishes = set(), [None] * len(reply.reqs)
    async with aclosing(events):
        async for i, delta, finish in events:
            if finish == "error":
                err = {"message": "generation failed", "type": "server_error", "param": None, "code": None}
                yield f"data: {json.dumps({'error': err})}\n\n"
                return
            finishes[i] = finish
            if delta or finish:  # (a quiet half second gives ("", None))
                yield reply.chunk([reply.choice(i, delta, finish, start=i not in started)])
                started.add(i)
    if None in finishes:
        return  # the client has gone away
    if include_usage:
        yield reply.chunk([], with_usage=True)
    yield "data: [DONE]\n\n"


def create_app(scheduler, model_name, api_key=None, strict_context=False, strict_model_name=False,
               max_body_bytes=DEFAULT_MAX_BODY_BYTES, body_timeout=DEFAULT_BODY_TIMEOUT_S):
    relays = {}  # one per event loop (tests start several)
    tool_stats = {"tool_calls": 0, "garbled_tool_calls": 0}  # answers' tool calls, and those returned as text

    async def check_key(request: Request):
        if not api_key:
            return
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not given:
            raise APIError(401, "Missing API key: send the header 'Authorization: Bearer <key>'", code="invalid_api_key")
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided", code="invalid_api_key")

    # with a key the schema needs it too, and the browser pages (which cannot send one) are off
    docs = {"docs_url": None, "redoc_url": None, "openapi_url": None} if api_key else {}
    app = FastAPI(title="MiniMind OpenAI-compatible API", **docs)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])
    engine = scheduler.engine
    tokens = TokenText(engine)
    started = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request, exc):  # (after a 408 the rest of the body may still come: the connection ends)
        return exc.response({"Connection": "close"} if exc.status == 408 else None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):  # unknown paths and methods, in the same error schema
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        headers = dict(exc.headers or {})
        if "Allow" in headers:  # the methods of the path, in a stable order
            headers["Allow"] = ", ".join(sorted(m.strip() for m in headers["Allow"].split(",")))
        return APIError(exc.status_code, str(exc.detail), code=code).response(headers)

    @app.exception_handler(Abandoned)
    async def abandoned(request, exc):  # (already logged) nobody reads this answer
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def server_error(request, exc):  # logged by uvicorn; the client still gets the error schema
        return APIError(500, f"internal error: {type(exc).__name__}", type_="server_error").response()

    if api_key:
        @app.api_route("/openapi.json", methods=GET, include_in_schema=False, dependencies=[Depends(check_key)])
        async def openapi():
            return app.openapi()

    @app.api_route("/health", methods=GET)
    async def health():
        return {"status": "ok", "model": model_name, **scheduler.stats(), **tool_stats}

    @v1.api_route("/models", methods=GET, responses=error_responses(401))
    async def models():
        return {"object": "list",
                "data": [{"id": model_name, "object": "model", "created": started, "owned_by": "minimind",
                          "context_length": engine.max_len,
                          # one model per server: a request naming any other model gets this one
                          "answers_any_model_name": not strict_model_name, "features": model_features()}]}

    def check_model_name(body):
        if strict_model_name and body.get("model") not in (None, model_name):
            raise APIError(404, f"The model {short(body['model'])} does not exist; this server serves "
                           f"'{model_name}'", param="model", code="model_not_found")

    def prepare(raw):
        """The CPU work of a request, run off the event loop: JSON, validation, the chat template, tokenization."""
        body = parse_json(raw)
        messages, params, stream, include_usage = parse_request(body, vocab_size=engine.vocab_size)
        options = parse_tool_options(body)
        check_model_name(body)
        prompt_ids = engine.encode(messages, tools=options.tools, enable_thinking=options.enable_thinking,
                                   prefix=options.prefix)
        if not prompt_ids:
            raise bad("messages", "the messages make an empty prompt")
        if strict_context:
            limit = engine.max_len - (params.max_new_tokens if (params.max_new_tokens or -1) > 0 else 1)
            if len(prompt_ids) > limit:
                raise bad("messages", f"the prompt is {len(prompt_ids)} tokens; with max_tokens it must fit the "
                          f"context of {engine.max_len} tokens", "context_length_exceeded")
        return prompt_ids, params, stream, include_usage, options

    schema = {**CHAT_REQUEST_SCHEMA, "properties": {**CHAT_REQUEST_SCHEMA["properties"],
                                                    "logit_bias": logit_bias_schema(engine.vocab_size)}}
    chat_openapi = {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
    chat_responses = {200: {"description": "a chat.completion object, or with stream: true server-sent "
                            "chat.completion.chunk events ending with data: [DONE]",
                            "content": {"application/json": {"schema": {"type": "object"}},
                                        "text/event-stream": {"schema": {  # each event: data is a chunk or [DONE]
                                            "type": "object", "required": ["data"],
                                            "properties": {"data": {"type": "string"}}}}}},
                      **error_responses(400, 401, 404, 413, 500)}

    @v1.post("/chat/completions", openapi_extra=chat_openapi, responses=chat_responses)
    async def chat_completions(request: Request):
        raw = await read_body(request, max_body_bytes, body_timeout)
        prompt_ids, params, stream, include_usage, options = await asyncio.to_thread(prepare, raw)
        loop = asyncio.get_running_loop()
        relay = relays.get(loop) or relays.setdefault(loop, EventRelay(loop))
        queue = asyncio.Queue()
        req = scheduler.submit(prompt_ids, params, lambda delta, finish: relay.put(queue, (delta, finish)))
        if req.truncated:
            log.warning("prompt of %d tokens cut from the left by %d to fit the context of %d",
                        len(prompt_ids), req.truncated, engine.max_len)
        reply = Reply(model_name, req, tokens, options, tool_stats)
        events = generation(scheduler, req, queue, request)
        headers = {"X-Prompt-Tokens-Truncated": str(req.truncated)}
        if stream:
            return StreamingResponse(sse(reply, events, include_usage), media_type="text/event-stream",
                                     headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await whole_answer(reply, events, headers)

    def prepare_completion(raw):
        """prepare() for /v1/completions: each prompt's token ids, checked against the vocabulary (and with
        --strict-context against the context; else a prompt that fills it is cut from the left, as in chat, and
        an echo shows the tokens kept)."""
        body = parse_json(raw)
        prompts, params, stream, include_usage, echo = parse_completion_request(body, engine.vocab_size)
        check_model_name(body)
        room = params.max_new_tokens if params.max_new_tokens != -1 else 1
        ids = []
        for i, p in enumerate(prompts):
            name = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            x = engine.encode(p)
            if not x:
                raise bad(name, f"{name} is empty: there is nothing to continue")
            if min(x) < 0 or max(x) >= engine.vocab_size:
                raise bad(name, f"{name} holds token id {min(x) if min(x) < 0 else max(x)}; ids must lie in "
                          f"[0, {engine.vocab_size})", "invalid_value")
            if strict_context and len(x) + room > engine.max_len:
                raise bad(name, f"{name} is {len(x)} tokens; with max_tokens {room} it must fit the context "
                          f"of {engine.max_len} tokens", "context_length_exceeded")
            ids.append(x)
        return prompts, ids, params, stream, include_usage, echo

    @v1.post("/completions", openapi_extra={"requestBody": {"required": True, "content": {
              "application/json": {"schema": completion_request_schema(engine.vocab_size)}}}},
             responses={**chat_responses, 200: {**chat_responses[200], "description": (
                 "a text_completion object, or with stream: true server-sent text_completion chunks ending "
                 "with data: [DONE]")}})
    async def completions(request: Request):
        raw = await read_body(request, max_body_bytes)
        prompts, ids, params, stream, include_usage, echo = await asyncio.to_thread(prepare_completion, raw)
        loop = asyncio.get_running_loop()
        relay = relays.get(loop) or relays.setdefault(loop, EventRelay(loop))
        queues = [asyncio.Queue() for _ in ids]
        reqs = scheduler.submit_many(ids, params, [partial(lambda q, d, f: relay.put(q, (d, f)), q) for q in queues])
        truncated = sum(r.truncated for r in reqs)
        reply = TextReply(model_name, reqs, prompts, echo, tokens)
        events = merged([generation(scheduler, r, q, request) for r, q in zip(reqs, queues)])
        headers = {"X-Prompt-Tokens-Truncated": str(truncated)}
        if stream:
            return StreamingResponse(text_sse(reply, events, include_usage), media_type="text/event-stream",
                                     headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await whole_texts(reply, events, headers)

    app.include_router(v1)
    list_get_without_head(app)
    return app


GET = ["GET", "HEAD"]  # every path that answers GET answers HEAD too (the same headers, no body)


def list_get_without_head(app):
    """The schema lists the GET operations alone: HEAD is the same operation without its body."""
    build = app.openapi

    def openapi():
        with warnings.catch_warnings():  # GET and HEAD of a path are one operation: its id is not a duplicate
            warnings.filterwarnings("ignore", message="Duplicate Operation ID")
            schema = build()
        for operations in schema.get("paths", {}).values():
            operations.pop("head", None)
        return schema
    app.openapi = openapi


@script
def main():
    default_model = f"out/{weights_name('full_sft', requested_shape())}"
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.fill(
            f"The default --model is {default_model} (with --dim/--use_moe: out/full_sft_{{dim}}[_moe].pth, as "
            "3-full_sft.py names it). A prompt longer than the model's context (max_seq_len) is cut from the left "
            "by default: the newest tokens are kept, leaving room for the answer, and the response header "
            "X-Prompt-Tokens-Truncated says how many were dropped; --strict-context makes it a 400 error instead. "
            f"Sampling defaults when a request leaves them out: temperature {DEFAULTS.temperature}, top_p "
            f"{DEFAULTS.top_p}; max_tokens absent or -1 means up to the context limit, and an answer that reaches "
            f"the limit ends with finish_reason 'length'. Ranges: temperature {rule_range('temperature')} (0 greedy; "
            f"any tiny value is near-greedy, never an error), top_p {rule_range('top_p')}, top_k "
            f"{rule_range('top_k')}, repetition_penalty {rule_range('repetition_penalty')}, seed any integer "
            f"(taken modulo 2**64), frequency_penalty and presence_penalty {rule_range('frequency_penalty')} "
            "(OpenAI's: they count the tokens of the answer so far), logit_bias {token id: "
            f"{rule_range('logit_bias')}}}; others are a 400 error naming the field, and so "
            "is a field that asks for what the server does not do (response_format other than text, n > 1, tools, "
            "audio, ...). Messages: every system (or developer) message's text goes first, in order; a conversation "
            "ending with an assistant message gets a new assistant turn after it. Extensions to the OpenAI fields: top_k, "
            "repetition_penalty, ignore_eos. POST /v1/completions is OpenAI's legacy endpoint (prompt as text, texts, "
            f"token ids or lists of them; echo; logprobs {rule_range('logprobs')}; max_tokens default 16, 0 scores the "
            "prompt): what "
            "lm-evaluation-harness's local-completions model uses. Log-probabilities (there and with chat's logprobs "
            "/ top_logprobs) are the model's own log-softmax, before penalty and temperature. One model per server: a request naming any model is answered by this "
            "one (--strict-model-name: other names get 404 model_not_found). GET /health is open; /v1/* and "
            "/openapi.json need the key when one is set (/docs and /redoc are then off).",
            100))
    add_model_args(parser, default_model=default_model)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    parser.add_argument("--port", type=int, default=8998)
    parser.add_argument("--api-key", default=os.environ.get("MINIMIND_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1/* (default: env MINIMIND_API_KEY, else none)")
    parser.add_argument("--max-batch", type=int, default=16, help="requests decoded together; more wait in a queue")
    parser.add_argument("--strict-context", action="store_true",
                        help="reject a prompt over the context limit with 400 instead of cutting it from the left")
    parser.add_argument("--served-model-name", default=None, help="model id in responses (default: file name)")
    parser.add_argument("--strict-model-name", action="store_true",
                        help="answer only requests naming --served-model-name (or none); others get 404")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                        help="larger request bodies get 413 before they are read (default: %(default)s, 1 MiB)")
    parser.add_argument("--header-timeout", type=float, default=DEFAULT_HEADER_TIMEOUT_S,
                        help="seconds a client has to send its request headers; then the connection is closed "
                        "(default: %(default)s)")
    parser.add_argument("--body-timeout", type=float, default=DEFAULT_BODY_TIMEOUT_S,
                        help="seconds a client has to send the whole request body; then it gets 408 "
                        "(default: %(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.max_body_bytes < 1:
        parser.error("--max-body-bytes must be at least 1")
    if not (args.header_timeout > 0 and args.body_timeout > 0):
        parser.error("--header-timeout and --body-timeout must be greater than 0")
    if args.model == default_model and (args.dim or args.use_moe):  # the training stage's name for it
        args.model = f"out/{weights_name('full_sft', requested_shape(dim=args.dim, use_moe=args.use_moe))}"
    threads = single_torch_thread()  # only the scheduler's thread runs parallel kernels
    threads = args.threads or threads
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    model, tokenizer = load_from_flags(args)
    scheduler = Scheduler(Engine(model, tokenizer, max_batch=args.max_batch), threads=threads)
    name = args.served_model_name or Path(args.model.rstrip("/")).stem
    app = create_app(scheduler, name, api_key=args.api_key, strict_context=args.strict_context,
                     strict_model_name=args.strict_model_name, max_body_bytes=args.max_body_bytes,
                     body_timeout=args.body_timeout)
    log.info("serving %s (%.2fM parameters, context %d) on http://%s:%d/v1", name,
             sum(p.numel() for p in model.parameters()) / 1e6, model.config.max_seq_len, args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", http=with_header_timeout(args.header_timeout))


if __name__ == "__main__":
    main()
