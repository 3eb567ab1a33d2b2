"""Rewards a program checks, for reinforcement learning (6-grpo_train.py): each scores one completion of one prompt
row (the JSONL row of the prompt file, with its checkable "answer") with a number in [0, 1], chosen by --reward.
Every reward is called as reward(completion, row, stopped): stopped is False when the sampler cut the reply off at
its token limit instead of the model ending it."""
import json
import math
import re

from .demo.measure import is_correct, loops

# The thinking and tool-call markup. Its one owner will be the chat-format module; until then this module reads
# only what its rewards need (markup_problem), and nothing else should parse it.
THINK = ("<think>", "</think>")
TOOL_CALL = ("<tool_call>", "</tool_call>")
TOOL_RESPONSE = ("<tool_response>", "</tool_response>")
TAG = re.compile(r"</?(think|tool_call|tool_response)>")
CJK = re.compile(r"[\u4e00-\u9fff]")


def expected_answers(row):
    """The row's "answer": one string, or a list of strings any of which is right."""
    answer = row["answer"]
    return [answer] if isinstance(answer, str) else [str(a) for a in answer]


def final_text(completion):
    """What the user reads as the answer: the text after the last closing markup tag (thinking, tool call or tool
    response), so a value named while thinking or in a tool call does not count as the answer."""
    if THINK[0] in completion and THINK[1] not in completion:
        return ""  # still thinking: no answer yet
    ends = [completion.rfind(close) + len(close) for _, close in (THINK, TOOL_CALL, TOOL_RESPONSE)
            if close in completion]
    return completion[max(ends):].lstrip() if ends else completion


def answer_reward(completion, row, stopped=True):
    """1 when the first answer names an expected value as a whole term and none of the row's "competitors" (the
    other values of the same attribute), as the demo's held-out measurements judge it, and the completion holds
    none of the row's "avoid" strings (case-insensitive)."""
    text = final_text(completion)
    if any(a.lower() in completion.lower() for a in row.get("avoid", ())):
        return 0.0
    competitors = row.get("competitors", ())
    return float(any(is_correct(text, a, competitors) for a in expected_answers(row)))


def markup_problem(completion):
    """None when the thinking and tool-call markup is well formed, else what is wrong: tags open and close in order
    without nesting, at most one <think> block and only at the start, and each tool call's body is JSON
    {"name": str, "arguments": {...}}."""
    open_tag, start, thinks = None, 0, 0
    for m in TAG.finditer(completion):
        name, closing = m.group(1), m.group(0).startswith("</")
        if not closing:
            if open_tag:
                return f"<{name}> inside <{open_tag}>"
            if name == "think":
                thinks += 1
                if thinks > 1 or completion[:m.start()].strip():
                    return "<think> must come once, at the start"
            open_tag, start = name, m.end()
            continue
        if open_tag != name:
            return f"</{name}> without its <{name}>"
        if name == "tool_call":
            try:
                call = json.loads(completion[start:m.start()])
            except ValueError:
                return "a tool call's body is not JSON"
            if not (isinstance(call, dict) and isinstance(call.get("name"), str)
                    and isinstance(call.get("arguments"), dict)):
                return 'a tool call must be {"name": ..., "arguments": {...}}'
        open_tag = None
    return f"<{open_tag}> is never closed" if open_tag else None


def tool_calls(completion):
    """The well-formed tool calls of a completion, in order, as {"name", "arguments"} dicts."""
    calls = []
    for body in re.findall(r"<tool_call>(.*?)</tool_call>", completion, flags=re.S):
        try:
            call = json.loads(body)
        except ValueError:
            continue
        if isinstance(call, dict) and isinstance(call.get("arguments"), dict):
            calls.append(call)
    return calls


def format_reward(completion, row, stopped=True):
    """1 when the completion thinks first (<think>...</think>), its markup is well formed, and an answer follows."""
    return float(completion.lstrip().startswith(THINK[0]) and markup_problem(completion) is None
                 and bool(final_text(completion).strip()))


def tool_reward(completion, row, stopped=True):
    """Tool round trip: 1 when the completion called the row's tool ("tool": {"name", "arguments"}) with the right
    arguments, its markup is well formed, and the answer after the tool's response is right."""
    want = row.get("tool")
    if not isinstance(want, dict) or markup_problem(completion) is not None:
        return 0.0
    called = any(c.get("name") == want.get("name") and c.get("arguments") == want.get("arguments")
                 for c in tool_calls(completion))
    answered = TOOL_RESPONSE[1] in completion and answer_reward(completion, row) == 1.0
    return float(called and answered)


def clean_reward(completion, row, stopped=True):
    """The whole reply, not just its first answer: 1 when the model ended it within the token limit, it holds no
    broken character (U+FFFD, a token cut inside a UTF-8 sequence), no 6 characters in a row come back three times
    (a loop), and it is in the row's "lang" when the row has one (zh: some Chinese; en: none). A right first
    answer followed by a run-on tail, or a Chinese reply to an English question, scores 0 here."""
    lang = (row or {}).get("lang")
    chinese = bool(CJK.search(completion))
    in_language = lang is None or chinese == (lang == "zh")
    return float(stopped and in_language and "\ufffd" not in completion and not loops(list(completion), n=6))


REWARDS = {"answer": answer_reward, "format": format_reward, "tool": tool_reward, "clean": clean_reward}


def reward_fn(names):
    """The reward of --reward: one name, several joined by "+" (their mean), and within a term names joined by "*"
    (their product, so each must hold), e.g. "answer+format" or "answer*clean"."""
    terms = [[n.strip() for n in term.split("*")] for term in names.split("+")]
    unknown = [n for term in terms for n in term if n not in REWARDS]
    if unknown:
        raise ValueError(f"--reward {names}: unknown reward {unknown[0]!r}; choose from {', '.join(REWARDS)} "
                         "(several joined by + for their mean or * for their product)")
    funcs = [[REWARDS[n] for n in term] for term in terms]

    def reward(completion, row, stopped=True):
        return sum(math.prod(f(completion, row, stopped) for f in term) for term in funcs) / len(funcs)
    return reward

