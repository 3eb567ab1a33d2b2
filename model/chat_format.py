"""The chat format, stated once: how a conversation (system text, user turns, assistant turns with thinking and
tool calls, tool results) becomes text, which of its tokens are training targets, how a reply is read back, and the
Jinja template that renders the same text inside transformers, trl and llama.cpp.

    system texts      all of them first, joined by "\\n" (OpenAI's rule: a system message anywhere counts as
                      instruction for the whole chat), raw text without markers, as the seed had it
    tools offered     "<tools>\\n" + one line per function "name(param, ...): description" + "</tools>\\n"
    user turn         "<s>user\\n{content}</s>\\n<s>assistant\\n"     (the user turn opens the assistant's reply)
    assistant turn    "<think>{reasoning}</think>\\n" if it thought, then {content}, then per tool call
                      '<tool_call>{"name": NAME, "arguments": {...}}</tool_call>', then "</s>\\n"
    tool result       "<s>tool\\n{content}</s>\\n", and after the last of consecutive results "<s>assistant\\n"

Targets (what SFT learns): every assistant token up to and including its </s>; never the "\\n" after it, a system,
user or tool text, nor the empty "<think></think>\\n" that a thinking-off chat puts before each answer.

Thinking is a switch on one set of weights: enable_thinking None lets the model decide (a v1 model never thinks),
False renders "<think></think>\\n" before every answer that has no reasoning (and at the end of the generation
prompt), True ends the generation prompt with "<think>". A trailing assistant message gets a new assistant turn
after it in the generation prompt. Seed-v1 chats (system, user, assistant, no tools) render exactly as the seed's
template did. The markers <think>, <tool_call>, <tools> are plain text: the 6400-token v1 tokenizer encodes them as a
few byte-level pieces each. As special tokens they would cost new embedding rows (a vocabulary of 6400 + 6, rows a v1
checkpoint lacks and would have to be resized and trained for, and a new GGUF vocabulary) for a few tokens saved per
turn.
"""
import functools
import json
import re

BOS, EOS = "<s>", "</s>"
IGNORE = -100  # the label of a position that is not a target (cross_entropy's ignore_index)
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOLS_OPEN, TOOLS_CLOSE = "<tools>", "</tools>"
THINK_OFF = THINK_OPEN + THINK_CLOSE + "\n"  # the empty thought of an answer given without thinking
ROLES = ("system", "user", "assistant", "tool")
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names; no JSON escaping needed


class FormatError(ValueError):
    """A conversation or tool list the format cannot render."""


# ---------------------------------------------------------------------------------------------------------
# conversation -> text pieces (text, is_target); every renderer below is these pieces joined or encoded


def function_of(entry):
    """The function object of a tool or a tool call: OpenAI's {"type": "function", "function": {...}} or bare."""
    return entry["function"] if isinstance(entry.get("function"), dict) else entry


def tool_line(tool):
    f = function_of(tool)
    props = (f.get("parameters") or {}).get("properties") or {}
    line = f["name"] + "(" + ", ".join(props) + ")"
    return line + (": " + f["description"] if f.get("description") else "")


def tools_text(tools):
    return TOOLS_OPEN + "\n" + "".join(tool_line(t) + "\n" for t in tools) + TOOLS_CLOSE + "\n"


def call_text(call):
    """One tool call as the model writes it; arguments given as a JSON string are kept verbatim."""
    f = function_of(call)
    args = f.get("arguments")
    if not isinstance(args, str):
        args = json.dumps({} if args is None else args, ensure_ascii=False)
    return CALL_OPEN + '{"name": "' + f["name"] + '", "arguments": ' + args + "}" + CALL_CLOSE


def assistant_body(m):
    """The target text of an assistant turn before its </s>: thinking, content, tool calls."""
    reasoning = m.get("reasoning_content") or ""
    think = THINK_OPEN + reasoning + THINK_CLOSE + "\n" if reasoning else ""
    return think + (m.get("content") or "") + "".join(call_text(c) for c in m.get("tool_calls") or ())


def pieces(messages, tools=None, add_generation_prompt=False, enable_thinking=None, last_only=False):
    """(text, is_target) pieces of a conversation. Pieces are tokenized one by one for training (so a target
    boundary is a token boundary); last_only: only the final assistant turn is a target (DPO)."""
    out = []
    systems = [m.get("content") or "" for m in messages if m["role"] == "system"]
    if systems:
        out.append(("\n".join(systems), False))
    if tools:
        out.append((tools_text(tools), False))
    rest = [m for m in messages if m["role"] != "system"]
    for i, m in enumerate(rest):
        role, content = m["role"], m.get("content") or ""
        if role == "user":
            out += [(BOS, False), ("user\n", False), (content, False), (EOS, False), ("\n", False),
                    (BOS, False), ("assistant\n", False)]
        elif role == "tool":
            out += [(BOS, False), ("tool\n", False), (content, False), (EOS, False), ("\n", False)]
            if i + 1 == len(rest) or rest[i + 1]["role"] != "tool":
                out += [(BOS, False), ("assistant\n", False)]
        elif role == "assistant":
            target = not last_only or i == len(rest) - 1
            if enable_thinking is False and not m.get("reasoning_content"):
                out.append((THINK_OFF, False))
            out += [(assistant_body(m), target), (EOS, target), ("\n", False)]
    if add_generation_prompt:
        if not rest or rest[-1]["role"] == "assistant":
            out += [(BOS, False), ("assistant\n", False)]
        if enable_thinking is False:
            out.append((THINK_OFF, False))
        elif enable_thinking:
            out.append((THINK_OPEN, False))
    return [(text, target) for text, target in out if text]


def render(messages, tools=None, add_generation_prompt=False, enable_thinking=None):
    """The conversation as text (what the Jinja template renders)."""
    return "".join(text for text, _ in pieces(messages, tools, add_generation_prompt, enable_thinking))


def forced_call_prefix(name=None):
    """What the generation prompt ends with to make the answer a tool call (tool_choice "required" or a name). It
    stops where the tokenizer splits the same text in training (before the space), or the model would continue
    from a token boundary it never saw."""
    return CALL_OPEN + ('{"name": "' + name + '", "arguments":' if name else "")


class Encoder:
    """Token ids and loss labels of a conversation, piece by piece, so target positions are exact and training and
    generation see the same ids for the same chat."""

    FIXED = (BOS, EOS, "user\n", "assistant\n", "tool\n", "\n", THINK_OFF, THINK_OPEN)

    def __init__(self, tokenizer):
        vocab = tokenizer.get_vocab()
        if BOS not in vocab or EOS not in vocab:
            raise ValueError("the tokenizer needs the special tokens <s> and </s>")
        self.tok = tokenizer
        self.fixed = {text: self.encode(text) for text in self.FIXED}

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False)

    def __call__(self, messages, max_length=None, tools=None, add_generation_prompt=False, enable_thinking=None,
                 last_only=False):
        """(ids, labels) cut at max_length; labels are IGNORE where the token is not a target."""
        ids, labels = [], []
        for text, target in pieces(messages, tools, add_generation_prompt, enable_thinking, last_only):
            part = self.fixed.get(text) or self.encode(text)
            ids += part
            labels += part if target else [IGNORE] * len(part)
            if max_length is not None and len(ids) >= max_length:
                break
        return ids[:max_length], labels[:max_length]

    def prompt(self, messages, tools=None, enable_thinking=None, prefix=""):
        """Token ids of the generation prompt, optionally ending with a forced start of the answer."""
        ids = self(messages, tools=tools, add_generation_prompt=True, enable_thinking=enable_thinking)[0]
        return ids + (self.encode(prefix) if prefix else [])


@functools.lru_cache(maxsize=8)
def encoder_for(tokenizer):
    """One Encoder per tokenizer (its fixed pieces are encoded once)."""
    return Encoder(tokenizer)


# ---------------------------------------------------------------------------------------------------------
# the same format as a Jinja chat template (transformers' apply_chat_template, trl, the GGUF's llama.cpp)


def chat_template(generation_tags=False):
    """The Jinja template that renders what render() renders. generation_tags wraps every target in transformers'
    {% generation %} markers (return_assistant_tokens_mask, trl's assistant_only_loss)."""
    gen, end = ("{% generation %}", "{% endgeneration %}") if generation_tags else ("", "")
    call = ("{% for c in m.tool_calls %}{% set f = c.function if c.function is mapping else c %}"
            "{{ '<tool_call>{\"name\": \"' + f.name + '\", \"arguments\": ' }}"
            "{% if f.arguments is string %}{{ f.arguments }}"
            "{% elif f.arguments is defined and f.arguments is not none %}{{ f.arguments | tojson }}"
            "{% else %}{{ '{}' }}{% endif %}{{ '}</tool_call>' }}{% endfor %}")
    return (
        "{% set think_off = enable_thinking is defined and enable_thinking is false %}"
        "{% for m in messages if m.role == 'system' %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
        "{% if m.content %}{{ m.content }}{% endif %}{% endfor %}"
        "{% if tools %}{{ '<tools>\\n' }}{% for t in tools %}{% set f = t.function if t.function is mapping else t %}"
        "{{ f.name + '(' }}{% if f.parameters and f.parameters.properties %}"
        "{{ f.parameters.properties | join(', ') }}{% endif %}{{ ')' }}"
        "{% if f.description %}{{ ': ' + f.description }}{% endif %}{{ '\\n' }}{% endfor %}{{ '</tools>\\n' }}"
        "{% endif %}"
        "{% set rest = messages | rejectattr('role', 'equalto', 'system') | list %}"
        "{% for m in rest %}"
        "{% if m.role == 'user' %}{{ '<s>user\\n' }}{% if m.content %}{{ m.content }}{% endif %}"
        "{{ '</s>\\n<s>assistant\\n' }}"
        "{% elif m.role == 'tool' %}{{ '<s>tool\\n' }}{% if m.content %}{{ m.content }}{% endif %}{{ '</s>\\n' }}"
        "{% if loop.last or rest[loop.index0 + 1].role != 'tool' %}{{ '<s>assistant\\n' }}{% endif %}"
        "{% elif m.role == 'assistant' %}"
        "{% set r = m.reasoning_content if m.reasoning_content is defined and m.reasoning_content else '' %}"
        "{% if think_off and not r %}{{ '<think></think>\\n' }}{% endif %}" + gen +
        "{% if r %}{{ '<think>' + r + '</think>\\n' }}{% endif %}{% if m.content %}{{ m.content }}{% endif %}"
        "{% if m.tool_calls %}" + call + "{% endif %}{{ '</s>' }}" + end + "{{ '\\n' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{% if not rest or rest[-1].role == 'assistant' %}{{ '<s>assistant\\n' }}"
        "{% endif %}{% if think_off %}{{ '<think></think>\\n' }}{% elif enable_thinking %}{{ '<think>' }}"
        "{% endif %}{% endif %}"
    )


CHAT_TEMPLATE = chat_template()


# ---------------------------------------------------------------------------------------------------------
# checking a conversation (training data and API requests)


def check_call(call, where, names=None):
    """A tool call as {"name", "arguments": dict} (arguments may be a JSON string); a problem raises FormatError."""
    if not isinstance(call, dict):
        raise FormatError(f"{where} must be an object")
    f = function_of(call)
    name, args = f.get("name"), f.get("arguments")
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
        raise FormatError(f"{where}: the function name must be 1-64 letters, digits, '_' or '-', got {name!r:.60}")
    if names is not None and name not in names:
        raise FormatError(f"{where}: function {name!r} is not among the tools offered")
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError as e:
            raise FormatError(f"{where}: arguments are not valid JSON ({e})") from None
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise FormatError(f"{where}: arguments must be a JSON object")
    return {"name": name, "arguments": args}


def check_tools(tools, name):
    """Tools offered in a training row: a list of function definitions with valid, distinct names."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise FormatError(f"field '{name}' must be a list of function definitions")
    names = set()
    for i, tool in enumerate(tools):
        f = function_of(tool) if isinstance(tool, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not TOOL_NAME.fullmatch(f["name"]) \
                or f["name"] in names:
            raise FormatError(f"{name}[{i}] must be a function definition with a new name of 1-64 letters, digits, "
                              "'_' or '-'")
        if not isinstance(f.get("parameters") or {}, dict) or not isinstance(
                (f.get("parameters") or {}).get("properties") or {}, dict):
            raise FormatError(f"{name}[{i}].parameters must be a JSON Schema object")
        names.add(f["name"])
    return tools


def check_conversation(msgs, name, final="assistant"):
    """Plain messages of a training conversation: system anywhere; then user, assistant (optionally thinking and
    calling tools), tool results after a call, ...; ending with the assistant's turn. FormatError names the field."""
    if not isinstance(msgs, list) or not msgs:
        raise FormatError(f"field '{name}' must be a non-empty list of messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise FormatError(f"{name}[{i}] must be an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise FormatError(f"{name}[{i}].role must be one of {'/'.join(ROLES)}, got {role!r}")
        calls = m.get("tool_calls") if role == "assistant" else None
        if content is None and calls:
            content = ""
        if not isinstance(content, str):
            raise FormatError(f"{name}[{i}].content must be a string, got {type(content).__name__}")
        msg = {"role": role, "content": content}
        if role == "assistant":
            reasoning = m.get("reasoning_content")
            if reasoning is not None and not isinstance(reasoning, str):
                raise FormatError(f"{name}[{i}].reasoning_content must be a string")
            if reasoning:
                msg["reasoning_content"] = reasoning
            if calls is not None:
                if not isinstance(calls, list):
                    raise FormatError(f"{name}[{i}].tool_calls must be a list")
                if calls:
                    msg["tool_calls"] = [check_call(c, f"{name}[{i}].tool_calls[{j}]") for j, c in enumerate(calls)]
        out.append(msg)
    turns = [m for m in out if m["role"] != "system"]
    allowed, after = ("user",), "the start"
    for m in turns:
        if m["role"] not in allowed:
            raise FormatError(f"{name}: a {m['role']} message cannot follow {after} (expected {' or '.join(allowed)})")
        allowed = {"user": ("assistant",), "tool": ("tool", "assistant"),
                   "assistant": ("tool",) if m.get("tool_calls") else ("user",)}[m["role"]]
        after = "a tool call" if m.get("tool_calls") else f"a {m['role']} message"
    if final and (not turns or turns[-1]["role"] != final):
        raise FormatError(f"{name}: the last message must be the {final}'s")
    return out


# ---------------------------------------------------------------------------------------------------------
# reading a reply back: thinking, content and tool calls


class ReplyReader:
    """Splits generated text, fed in deltas, into ("reasoning", text), ("content", text) and ("call", dict) events,
    holding back what may be the start of a marker. A tool call is checked when its block closes: bad JSON, an
    unknown function or a block left open becomes plain content and is counted in self.garbled. With tools=None
    (none offered, or tool_choice "none") tool-call markers are plain text. `start` is the text the prompt already
    wrote of the answer ("<think>", "<think></think>\\n", a forced tool-call prefix)."""

    def __init__(self, tools=None, start=""):
        self.names = None if tools is None else {function_of(t)["name"] for t in tools}
        self.state, self.buf, self.call, self.garbled, self.problems = "begin", "", "", 0, []
        self.events = []
        self.feed(start)  # the prompt's part of the answer is read, not shown

    def feed(self, text):
        """Events for one more delta of generated text."""
        self.buf += text
        self._run(final=False)
        events, self.events = self.events, []
        return events

    def close(self):
        """Events for what is held back, at the end of generation."""
        self._run(final=True)
        if self.state == "call":  # a tool call the answer never closed
            self._garble(CALL_OPEN + self.call + self.buf, "the tool call was not closed")
            self.call, self.buf = "", ""
        elif self.buf:
            self._emit("reasoning" if self.state == "think" else "content", self.buf)
            self.buf = ""
        events, self.events = self.events, []
        return events

    def _emit(self, kind, text):
        if not text:
            return
        if self.events and self.events[-1][0] == kind and kind != "call":
            self.events[-1] = (kind, self.events[-1][1] + text)
        else:
            self.events.append((kind, text))

    def _garble(self, text, why):
        self.garbled += 1
        self.problems.append(why)
        self._emit("content", text)

    def _take_until(self, marker, final):
        """(text before marker, found); without the marker, keeps back a tail that may begin it."""
        at = self.buf.find(marker)
        if at >= 0:
            text, self.buf = self.buf[:at], self.buf[at + len(marker):]
            return text, True
        keep = 0 if final else _partial_tail(self.buf, marker)
        text, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        return text, False

    def _run(self, final):
        while True:
            if self.state == "begin":  # the answer may open with a thought
                if self.buf.startswith(THINK_OPEN):
                    self.buf, self.state = self.buf[len(THINK_OPEN):], "think"
                elif THINK_OPEN.startswith(self.buf) and not final:
                    return
                else:
                    self.state = "content"
            elif self.state == "think":
                text, found = self._take_until(THINK_CLOSE, final)
                self._emit("reasoning", text)
                if not found:
                    return
                self.state = "after_think"
            elif self.state == "after_think":  # the newline after </think> belongs to the format
                if not self.buf and not final:
                    return
                self.buf = self.buf[1:] if self.buf.startswith("\n") else self.buf
                self.state = "content"
            elif self.state == "content":
                if self.names is None:
                    self._emit("content", self.buf)
                    self.buf = ""
                    return
                text, found = self._take_until(CALL_OPEN, final)
                self._emit("content", text)
                if not found:
                    return
                self.state, self.call = "call", ""
            elif self.state == "call":
                text, found = self._take_until(CALL_CLOSE, final)
                self.call += text
                if not found:
                    return
                self._finish_call()
                self.state = "content"

    def _finish_call(self):
        raw, self.call = self.call, ""
        try:
            obj = json.loads(raw)
            if not isinstance(obj, dict) or set(obj) - {"name", "arguments"}:
                raise FormatError('expected {"name": ..., "arguments": {...}}')
            call = check_call(obj, "tool call", self.names)
        except (ValueError, FormatError) as e:
            self._garble(CALL_OPEN + raw + CALL_CLOSE, str(e).splitlines()[0])
            return
        self.events.append(("call", call))


def _partial_tail(text, marker):
    """Length of the longest tail of text that is a proper beginning of marker."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


def read_reply(text, tools=None, start=""):
    """(reasoning, content, calls, garbled problems) of a whole generated answer (`start`: see ReplyReader)."""
    reader = ReplyReader(tools, start)
    events = reader.feed(text) + reader.close()
    reasoning = "".join(t for k, t in events if k == "reasoning")
    content = "".join(t for k, t in events if k == "content")
    calls = [c for k, c in events if k == "call"]
    return reasoning, content, calls, reader.problems
