"""The demo world's two tools (lookup in its encyclopedia, safe arithmetic), the SFT conversations that teach calling
them and thinking through two-hop questions, and the tool loop run as a client runs it: the demo's measure of what a
tool and a written-down middle step give a tiny model."""
import inspect
import json
import random
import re
from fractions import Fraction
from pathlib import Path

from .. import chat_format
from ..engine import run_to_completion
from ..sampling import SamplingParams
from .world import (ANIMAL_KINDS, INVENTION_KINDS, SCHEMA, TYPES, Names, _value, attrs_of, build_world,
                    canonical_answer, languages)

TOOLS = [
    {"type": "function", "function": {
        "name": "lookup", "description": "查百科 / look a name up in the encyclopedia",
        "parameters": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}}},
    {"type": "function", "function": {
        "name": "calculate", "description": "算术 / arithmetic: + - * / ( )",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}},
]
NOT_FOUND = {"zh": "百科中没有“{n}”的条目。", "en": "The encyclopedia has no entry for {n}."}


# ---------------------------------------------------------------------------------------------------------
# the tools


def load_world(data_dir="dataset/demo"):
    """The world a demo data folder was generated from, rebuilt from the seed and parameters of its manifest."""
    path = Path(data_dir) / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        accepted = inspect.signature(build_world).parameters
        params = {k: v for k, v in (manifest.get("params") or {}).items() if k in accepted}
        return build_world(seed=manifest["seed"], **params)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: cannot rebuild the demo world ({type(e).__name__}: {e}); "
                         "python data_process.py demo writes it") from None


ENCYCLOPEDIA_PER_TYPE = 16  # entities per type that exist only in the encyclopedia, never in pretraining text
ENCYCLOPEDIA_HELDOUT = 6  # of those per type, the ones no training row names (the tool measure's questions)


def encyclopedia(world):
    """The entities only the encyclopedia knows: made-up names no entity of the world and no unknown name of the
    abstention lessons has (so lookup finds them and only them), with facts drawn like the world's. Chinese only;
    a reference (a hometown, an inventor) names an SFT entity. Built once per world, from its seed alone."""
    if "encyclopedia" not in world:
        from .unknowns import unknown_names
        rng = random.Random(f"minimind-demo-encyclopedia-{world['seed']}")
        names = Names(rng)
        stems = [(c["zh"][:-1], c["en"][:-4]) for c in world["countries"]]
        stems += [(e["zh"] if e["type"] == "person" else e["zh"][:-1], e["en"].split(" ")[0])
                  for t in TYPES for e in world["entities"][t]]
        train, evaluated = unknown_names(world, world["seed"])
        stems += [(n["zh"] if t == "person" else n["zh"][:-1], n["en"].split(" ")[0]) for t, n in train + evaluated]
        for zh, en in stems:
            names.used_zh.add(zh)
            names.used_en.add(en.lower())
        entries = []
        for etype in TYPES:
            for i in range(ENCYCLOPEDIA_PER_TYPE):
                zh, en = names.stem(3 if etype == "person" else 2)
                if etype != "person":
                    kind = rng.choice({"animal": ANIMAL_KINDS, "invention": INVENTION_KINDS}.get(etype, [("城", "City")]))
                    zh, en = zh + kind[0], f"{en} {kind[1]}"
                e = {"type": etype, "zh": zh, "en": en, "bilingual": False, "attrs": {},
                     "split": "heldout" if i < ENCYCLOPEDIA_HELDOUT else "sft"}
                for attr in attrs_of(etype):
                    values = SCHEMA[etype][attr]["values"]
                    e["attrs"][attr] = (rng.choice(world["pools"][values]["sft"]) if isinstance(values, str)
                                        else _value(rng.choice(values)))
                entries.append(e)
        world["encyclopedia"] = entries
    return world["encyclopedia"]


def find(world, name):
    """(entity, language of the name) for a name as the world or its encyclopedia writes it, or (None, language)."""
    lang = "zh" if re.search(r"[\u4e00-\u9fff]", name) else "en"
    key = name.strip().lower()
    for e in [e for etype in TYPES for e in world["entities"][etype]] + encyclopedia(world):
        if key in (e["zh"], e["en"].lower()):
            return e, ("en" if key == e["en"].lower() else "zh")
    return None, lang


def lookup(world, name):
    """The encyclopedia entry of an entity: its canonical facts in the language of the name (Chinese when the
    entity is not described in English)."""
    e, lang = find(world, name)
    if e is None:
        return NOT_FOUND[lang].format(n=name.strip())
    lang = lang if lang in languages(e) else "zh"
    sep = "" if lang == "zh" else " "
    return sep.join(canonical_answer(e["type"], attr, lang, e) for attr in attrs_of(e["type"]))


def calculate(expression):
    """The value of + - * / and parentheses over decimal numbers, exactly (fractions), parsed here: no eval. A bad
    expression gives a one-line error text, as a tool result."""
    try:
        value = _Arithmetic(expression).parse()
    except ValueError as e:
        return f"error: {e}"
    except ZeroDivisionError:
        return "error: division by zero"
    if value.denominator == 1:
        return str(value.numerator)
    return f"{float(value):.6f}".rstrip("0").rstrip(".")


class _Arithmetic:
    """Recursive descent: sum := product (('+'|'-') product)*, product := unary (('*'|'/') unary)*,
    unary := '-' unary | '(' sum ')' | number."""

    TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d+)?)|(.))")
    MAX_TOKENS = 200

    def __init__(self, text):
        text = text.replace("×", "*").replace("÷", "/").replace("（", "(").replace("）", ")")
        self.tokens = [num or op for num, op in self.TOKEN.findall(text) if num or op.strip()]
        if not self.tokens or len(self.tokens) > self.MAX_TOKENS:
            raise ValueError("an expression of 1 to 200 numbers and operators is expected")
        self.i = 0

    def parse(self):
        value = self.sum()
        if self.i != len(self.tokens):
            raise ValueError(f"unexpected {self.tokens[self.i]!r}")
        return value

    def peek(self):
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self):
        self.i += 1
        return self.tokens[self.i - 1]

    def sum(self):
        value = self.product()
        while self.peek() in ("+", "-"):
            value = value + self.product() if self.take() == "+" else value - self.product()
        return value

    def product(self):
        value = self.unary()
        while self.peek() in ("*", "/"):
            value = value * self.unary() if self.take() == "*" else value / self.unary()
        return value

    def unary(self):
        token = self.peek()
        if token == "-":
            self.take()
            return -self.unary()
        if token == "(":
            self.take()
            value = self.sum()  # nesting is bounded by MAX_TOKENS, far below Python's recursion limit
            if self.peek() != ")":
                raise ValueError("a ')' is missing")
            self.take()
            return value
        if token is None or not token[0].isdigit():
            raise ValueError(f"a number is expected, got {token!r}" if token else "the expression ends too early")
        return Fraction(self.take())


def run_tool(world, call):
    """The result text of one tool call {"name", "arguments"} (what a client sends back as the tool message)."""
    args = call.get("arguments") or {}
    if call.get("name") == "lookup" and isinstance(args.get("name"), str):
        return lookup(world, args["name"]) if world else "error: no demo world is loaded"
    if call.get("name") == "calculate" and isinstance(args.get("expression"), str):
        return calculate(args["expression"])
    return f"error: no tool call {json.dumps(call, ensure_ascii=False)[:80]}"


# ---------------------------------------------------------------------------------------------------------
# SFT conversations: calling the tools, and thinking through two hops

ARITHMETIC = {"zh": ["{x}等于多少？", "请计算{x}。", "{x}是多少？"],
              "en": ["What is {x}?", "Calculate {x}.", "How much is {x}?"]}
ARITHMETIC_ANSWER = {"zh": "{x}等于{v}。", "en": "{x} equals {v}."}
TWO_HOP = {"zh": ["{n}出生的城市在哪个国家？", "{n}的家乡属于哪个国家？"],
           "en": ["In which country is the city where {n} was born?", "{n}'s hometown is in which country?"]}
TWO_HOP_ANSWER = {"zh": "{k}。", "en": "{k}."}


def tool_call(function, **arguments):
    return {"role": "assistant", "content": "", "tool_calls": [{"name": function, "arguments": arguments}]}


def lookup_conversation(world, etype, attr, lang, e, question_text):
    """Asked about an entity: call lookup with its name, read the entry, answer with the canonical sentence."""
    return {"tools": TOOLS, "conversations": [
        {"role": "user", "content": question_text},
        tool_call("lookup", name=e[lang]),
        {"role": "tool", "content": lookup(world, e[lang])},
        {"role": "assistant", "content": canonical_answer(etype, attr, lang, e)}]}


def arithmetic_expression(rng):
    """A random expression of two or three small integers whose value a tiny model cannot know by heart."""
    ops = [rng.choice("+-*") for _ in range(rng.randint(1, 2))]
    nums = [rng.randint(2, 99) for _ in range(len(ops) + 1)]
    text = str(nums[0])
    for op, n in zip(ops, nums[1:]):
        text += op + str(n)
    return text


def arithmetic_conversation(rng, lang, expression=None):
    x = expression or arithmetic_expression(rng)
    value = calculate(x)
    return {"tools": TOOLS, "conversations": [
        {"role": "user", "content": rng.choice(ARITHMETIC[lang]).format(x=x)},
        tool_call("calculate", expression=x),
        {"role": "tool", "content": value},
        {"role": "assistant", "content": ARITHMETIC_ANSWER[lang].format(x=x, v=value)}]}


def answer_without_tool(etype, attr, lang, e, question_text):
    """Tools offered, a question the model knows from memory: answered directly (teaches not to over-call)."""
    return {"tools": TOOLS, "conversations": [{"role": "user", "content": question_text},
                                               {"role": "assistant", "content": canonical_answer(etype, attr, lang, e)}]}


def two_hop(world, e, lang, k=0):
    """(question, middle step, answer) of "in which country is the city where person e was born?"."""
    city_ref = e["attrs"]["hometown"]
    city = next(c for c in world["entities"]["city"] if c["zh"] == city_ref["zh"])
    country = city["attrs"]["country"]
    middle = canonical_answer("person", "hometown", lang, e) + ("" if lang == "zh" else " ") + \
        canonical_answer("city", "country", lang, city)
    return TWO_HOP[lang][k].format(n=e[lang]), middle, country[lang]


def thinking_conversation(world, e, lang, k=0, think=True):
    """A two-hop question answered after writing the middle step in <think> (think=True) or directly with
    thinking off (the same weights learn both: the switch is the format's enable_thinking)."""
    question, middle, answer = two_hop(world, e, lang, k)
    reply = {"role": "assistant", "content": TWO_HOP_ANSWER[lang].format(k=answer)}
    if think:
        reply["reasoning_content"] = middle
    return {"conversations": [{"role": "user", "content": question}, reply],
            **({} if think else {"enable_thinking": False})}


# ---------------------------------------------------------------------------------------------------------
# the tool loop, as a client runs it


def tool_loops(engine, world, chats, tools=TOOLS, enable_thinking=None, max_calls=3, max_new_tokens=64,
               complete=None):
    """Ask every chat (a message list), run the tools each model answer calls, send their results back, until it
    answers in text or has made max_calls calls; all chats of a round are decoded together (greedy). Returns per
    chat {"answer", "calls", "reasoning", "garbled"}: the final text answer, the calls made ({"name",
    "arguments"}), the last answer's thought and how many garbled calls came back as text. `complete` (a list of
    prompt id lists -> their generated texts) replaces the engine, e.g. in tests."""
    encoder = chat_format.encoder_for(engine.tokenizer)
    params = SamplingParams(temperature=0, top_p=1.0, max_new_tokens=max_new_tokens)
    if complete is None:
        def complete(prompts):
            return [c.text for c in run_to_completion(engine, [engine.prepare(p, params) for p in prompts])]
    start = {False: chat_format.THINK_OFF, True: chat_format.THINK_OPEN}.get(enable_thinking, "")
    chats = [list(c) for c in chats]
    results = [{"answer": "", "calls": [], "reasoning": "", "garbled": 0} for _ in chats]
    open_chats = list(range(len(chats)))
    while open_chats:
        texts = complete([encoder.prompt(chats[i], tools, enable_thinking) for i in open_chats])
        still_open = []
        for i, text in zip(open_chats, texts):
            reasoning, content, calls, problems = chat_format.read_reply(text, tools, start)
            result = results[i]
            result.update(answer=content, reasoning=reasoning, garbled=result["garbled"] + len(problems))
            if calls and len(result["calls"]) < max_calls:
                result["calls"] += calls
                chats[i].append({"role": "assistant", "content": content, "tool_calls": calls})
                chats[i] += [{"role": "tool", "content": run_tool(world, c)} for c in calls]
                still_open.append(i)
        open_chats = still_open
    return results


def tool_loop(engine, world, messages, **options):
    """tool_loops for one chat."""
    return tool_loops(engine, world, [messages], **options)[0]
