"""model/chat_format.py: every renderer of the chat format (our pieces, the training encoder, generation's prompt,
transformers' apply_chat_template with the shipped tokenizer, llama.cpp's Jinja) gives the same text and the same
targets; v1 chats render as the seed's template did; replies are read back the same whole or in any deltas."""
import copy
import json

import pytest
from transformers import AutoTokenizer

from model import chat_format as cf
from model.convert import BadRecord, check_messages
from model.chat_format import IGNORE as IGNORE_INDEX
from model.dataset import ChatEncoder
from tiny_chat_model import SHIPPED_TOKENIZER

# the seed's template as it shipped before tools and thinking existed: v1 chats must render exactly as it did
V1_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<s>user\\n' + message['content'] + '</s>\\n<s>assistant\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + '</s>\\n' }}"
    "{% endif %}{% endfor %}"
)
TOOLS = [
    {"type": "function", "function": {"name": "lookup", "description": "查百科：一个名字的条目",
                                      "parameters": {"type": "object", "properties": {"name": {"type": "string"}},
                                                     "required": ["name"]}}},
    {"type": "function", "function": {"name": "calculate", "parameters": {
        "type": "object", "properties": {"expression": {"type": "string"}, "precision": {"type": "integer"}}}}},
]
V1_CHATS = [
    [{"role": "system", "content": "你是MiniMind。"}, {"role": "user", "content": "你好"},
     {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "1+1=?"}],
    [{"role": "user", "content": "长江有多长？"}, {"role": "assistant", "content": "约6300公里。"}],
    [{"role": "user", "content": "Hello 😀\n  two lines"}],
]
TOOL_CHATS = [
    [  # a lookup round trip (OpenAI's message shapes, content null beside the call), then thinking
        {"role": "system", "content": "你是MiniMind。"},
        {"role": "user", "content": "卡洛维是做什么的？"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"name": "卡洛维"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "卡洛维是一位画家。卡洛维出生在蒙莫城。"},
        {"role": "assistant", "content": "卡洛维是一位画家。"},
        {"role": "user", "content": "蒙莫城在哪个国家？"},
        {"role": "assistant", "reasoning_content": "蒙莫城位于索伦国。", "content": "索伦国。"},
    ],
    [  # two calls at once (arguments as objects, transformers' shape), two results, a system text in the middle
        {"role": "user", "content": "12*7 和 3+4 各是多少？"},
        {"role": "assistant", "content": "我来算一下。", "tool_calls": [
            {"type": "function", "function": {"name": "calculate", "arguments": {"expression": "12*7"}}},
            {"type": "function", "function": {"name": "calculate", "arguments": {"expression": "3+4"}}}]},
        {"role": "system", "content": "Answer briefly."},
        {"role": "tool", "tool_call_id": "a", "content": "84"},
        {"role": "tool", "tool_call_id": "b", "content": "7"},
        {"role": "assistant", "content": "84 和 7。"},
    ],
    [{"role": "user", "content": "Where was Lovi born?"},
     {"role": "assistant", "reasoning_content": "Lovi is a name I do not know.", "content": "",
      "tool_calls": [{"type": "function", "function": {"name": "lookup", "arguments": {"name": "Lovi"}}}]},
     {"role": "tool", "content": "Lovi was born in Momo City."}],
]
OPTIONS = [dict(), dict(enable_thinking=False), dict(enable_thinking=True)]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER)


def cases():
    for chat in V1_CHATS + TOOL_CHATS:
        for tools in (None, TOOLS):
            for options in OPTIONS:
                yield chat, tools, options


def test_v1_chats_render_as_the_seed_template_did(tok):
    for chat in V1_CHATS:
        for gen in (False, True) if chat[-1]["role"] == "user" else (False,):  # (a trailing answer now gets a new
            seed = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen,  # turn: OpenAI's rule)
                                           chat_template=V1_TEMPLATE)
            assert cf.render(chat, add_generation_prompt=gen) == seed
            assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen) == seed
    assert cf.render(V1_CHATS[0], add_generation_prompt=True) == (
        "你是MiniMind。<s>user\n你好</s>\n<s>assistant\n你好！</s>\n<s>user\n1+1=?</s>\n<s>assistant\n")


def test_every_renderer_gives_the_same_text(tok):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    assert tok.chat_template == cf.CHAT_TEMPLATE  # the shipped tokenizer carries the format's template
    n = 0
    for chat, tools, options in cases():
        for gen in (False, True):
            ours = cf.render(chat, tools, gen, **options)
            assert tok.apply_chat_template(chat, tools=tools, tokenize=False, add_generation_prompt=gen,
                                           **options) == ours
            llama = Jinja2ChatFormatter(cf.CHAT_TEMPLATE, eos_token="</s>", bos_token="<s>", add_generation_prompt=gen)
            assert llama(messages=copy.deepcopy(chat), tools=tools, **options).prompt == ours
            n += 1
    assert n == 2 * len(list(cases()))


def test_tool_conversation_text():
    text = cf.render(TOOL_CHATS[0], TOOLS, add_generation_prompt=True, enable_thinking=False)
    assert text.startswith("你是MiniMind。<tools>\nlookup(name): 查百科：一个名字的条目\n"
                           "calculate(expression, precision)\n</tools>\n<s>user\n卡洛维是做什么的？</s>\n<s>assistant\n"
                           '<think></think>\n<tool_call>{"name": "lookup", "arguments": {"name": "卡洛维"}}</tool_call></s>\n'
                           "<s>tool\n卡洛维是一位画家。卡洛维出生在蒙莫城。</s>\n<s>assistant\n<think></think>\n卡洛维是一位画家。</s>\n")
    assert text.endswith("<s>assistant\n<think>蒙莫城位于索伦国。</think>\n索伦国。</s>\n<s>assistant\n<think></think>\n")
    two = cf.render(TOOL_CHATS[1])  # both results before the one assistant header; the system text goes first
    assert two.startswith("Answer briefly.<s>user\n")
    assert "<s>tool\n84</s>\n<s>tool\n7</s>\n<s>assistant\n84 和 7。</s>\n" in two


def test_targets_are_the_same_in_training_generation_and_transformers(tok):
    """Training ids are generation's ids; the targets are what transformers' {% generation %} mask marks."""
    encoder = ChatEncoder(tok)
    tagged = cf.chat_template(generation_tags=True)
    for chat, tools, options in cases():
        ids, labels = encoder(chat, 4096, tools=tools, **options)
        assert tok.decode(ids) == cf.render(chat, tools, **options)
        hf = tok.apply_chat_template(chat, tools=tools, chat_template=tagged, return_dict=True, tokenize=True,
                                     return_assistant_tokens_mask=True, **options)
        assert hf["input_ids"] == ids
        assert [t if m else IGNORE_INDEX for t, m in zip(hf["input_ids"], hf["assistant_masks"])] == labels
        prompt = cf.encoder_for(tok).prompt(chat, tools, options.get("enable_thinking"))
        assert prompt == tok.encode(cf.render(chat, tools, True, **options), add_special_tokens=False)
    targets = tok.decode([t for t, l in zip(*encoder(TOOL_CHATS[0], 4096, tools=TOOLS)) if l != IGNORE_INDEX])
    assert targets == ('<tool_call>{"name": "lookup", "arguments": {"name": "卡洛维"}}</tool_call></s>卡洛维是一位画家。</s>'
                       "<think>蒙莫城位于索伦国。</think>\n索伦国。</s>")  # tool results and prompts are not targets
    off = encoder(TOOL_CHATS[0][:5], 4096, enable_thinking=False)
    assert "<think></think>" not in tok.decode([t for t, l in zip(*off) if l != IGNORE_INDEX])


def test_generation_prompt_options():
    chat = [{"role": "user", "content": "hi"}]
    assert cf.render(chat, add_generation_prompt=True) == "<s>user\nhi</s>\n<s>assistant\n"
    assert cf.render(chat, add_generation_prompt=True, enable_thinking=True).endswith("<s>assistant\n<think>")
    after_answer = chat + [{"role": "assistant", "content": "hello"}]  # a trailing answer: a new turn follows
    assert cf.render(after_answer, add_generation_prompt=True).endswith("hello</s>\n<s>assistant\n")
    assert cf.forced_call_prefix() == "<tool_call>"
    assert cf.forced_call_prefix("lookup") == '<tool_call>{"name": "lookup", "arguments":'


def test_training_data_check_accepts_the_format_and_names_problems():
    for chat in TOOL_CHATS[:2]:
        out = check_messages(chat, "conversations")
        assert cf.render(out) == cf.render(chat)
    bad = [
        ([{"role": "user", "content": "q"}, {"role": "tool", "content": "r"}], "a tool message cannot follow"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [
            {"name": "x y", "arguments": {}}]}], "function name"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [
            {"name": "f", "arguments": "{oops"}]}], "not valid JSON"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": 3}],
         "reasoning_content"),
        (TOOL_CHATS[2], "last message must be the assistant's"),
    ]
    for chat, problem in bad:
        with pytest.raises(BadRecord, match=problem):
            check_messages(chat, "conversations")


REPLIES = [  # (generated text, start, tools offered?) -> (reasoning, content, calls, garbled count)
    ("你好！", "", True, ("", "你好！", [], 0)),
    ("<think>想一想</think>\n答案是6。", "", True, ("想一想", "答案是6。", [], 0)),
    ("想一想</think>\n答案", "<think>", True, ("想一想", "答案", [], 0)),
    ("答案", cf.THINK_OFF, True, ("", "答案", [], 0)),
    ('<tool_call>{"name": "lookup", "arguments": {"name": "卡洛"}}</tool_call>', "", True,
     ("", "", [{"name": "lookup", "arguments": {"name": "卡洛"}}], 0)),
    (' {"expression": "2*3"}}</tool_call>', cf.forced_call_prefix("calculate"), True,
     ("", "", [{"name": "calculate", "arguments": {"expression": "2*3"}}], 0)),
    ('<tool_call>{"name": "lookup", "arguments": {"name": </tool_call>', "", True,
     ("", '<tool_call>{"name": "lookup", "arguments": {"name": </tool_call>', [], 1)),
    ('<tool_call>{"name": "weather", "arguments": {}}</tool_call>', "", True,
     ("", '<tool_call>{"name": "weather", "arguments": {}}</tool_call>', [], 1)),
    ('先查<tool_call>{"name": "lookup", "arguments": {"name": "X"}}', "", True,
     ("", '先查<tool_call>{"name": "lookup", "arguments": {"name": "X"}}', [], 1)),
    ('<tool_call>{"name": "lookup", "arguments": {}}</tool_call>', "", False,
     ("", '<tool_call>{"name": "lookup", "arguments": {}}</tool_call>', [], 0)),
    ("<thin", "", True, ("", "<thin", [], 0)),
    ("a <tool_ca", "", True, ("", "a <tool_ca", [], 0)),
]


@pytest.mark.parametrize("text,start,offered,expected", REPLIES)
def test_replies_read_back_whole_and_in_any_deltas(text, start, offered, expected):
    tools = TOOLS if offered else None
    reasoning, content, calls, problems = cf.read_reply(text, tools, start)
    assert (reasoning, content, calls, len(problems)) == expected
    for cut in range(len(text) + 1):  # every split into two deltas, and one character at a time
        for deltas in ([text[:cut], text[cut:]], list(text)):
            reader = cf.ReplyReader(tools, start)
            events = [e for d in deltas for e in reader.feed(d)] + reader.close()
            assert "".join(t for k, t in events if k == "reasoning") == reasoning
            assert "".join(t for k, t in events if k == "content") == content
            assert [c for k, c in events if k == "call"] == calls
            assert all(cf.CALL_OPEN not in t for k, t in events if k == "content") or expected[3] or not offered


def test_call_arguments_render_back_as_the_model_wrote_them():
    call = {"name": "lookup", "arguments": {"name": "卡洛"}}
    text = cf.call_text(call)
    assert cf.read_reply(text, TOOLS)[2] == [call]
    as_openai = {"type": "function", "function": {"name": "lookup",
                                                  "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}
    assert cf.call_text(as_openai) == text


def test_forced_call_prefix_ends_on_a_token_boundary_training_has(tok):
    for name, args in (("lookup", {"name": "卡洛维"}), ("calculate", {"expression": "12*7"})):
        trained = tok.encode(cf.call_text({"name": name, "arguments": args}), add_special_tokens=False)
        for prefix in (cf.forced_call_prefix(), cf.forced_call_prefix(name)):
            ids = tok.encode(prefix, add_special_tokens=False)
            assert trained[:len(ids)] == ids


def v1_encoder(tok, messages, max_length, last_only=False):
    """The training encoder as it was before tools and thinking (kept here as the reference for v1 chats)."""
    enc = lambda text: tok.encode(text, add_special_tokens=False) if text else []  # noqa: E731
    bos, eos = tok.convert_tokens_to_ids("<s>"), tok.convert_tokens_to_ids("</s>")
    ids, labels = [], []
    for n, m in enumerate(messages):
        if m["role"] == "system":
            part, target = enc(m["content"]), False
        elif m["role"] == "user":
            part = [bos] + enc("user\n") + enc(m["content"]) + [eos] + enc("\n") + [bos] + enc("assistant\n")
            target = False
        else:
            part, target = enc(m["content"]) + [eos], not last_only or n == len(messages) - 1
        ids += part
        labels += part if target else [IGNORE_INDEX] * len(part)
        if m["role"] == "assistant":
            ids, labels = ids + enc("\n"), labels + [IGNORE_INDEX] * len(enc("\n"))
        if len(ids) >= max_length:
            break
    return ids[:max_length], labels[:max_length]


def test_v1_chats_encode_to_the_ids_and_targets_they_had(tok):
    encoder = ChatEncoder(tok)
    chats = V1_CHATS + [[{"role": "system", "content": "  系统\n"}, {"role": "user", "content": "\n\n开头是换行"},
                         {"role": "assistant", "content": " 空格开头 😀"}, {"role": "user", "content": "再问"},
                         {"role": "assistant", "content": "再答"}]]
    for chat in chats:
        for max_length, last_only in ((4096, False), (4096, True), (9, False)):
            assert encoder(chat, max_length, last_only=last_only) == v1_encoder(tok, chat, max_length, last_only)
