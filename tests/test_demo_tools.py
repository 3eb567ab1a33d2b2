"""model/demo/tools.py: the demo world's lookup and calculate tools, the tool-use and two-hop thinking SFT rows they
make (valid chat-format rows the SFT dataset reads with tools and the thinking switch), and the client's tool loop."""
import json
import random
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model import chat_format as cf
from model.convert import check_messages
from model.demo import tools as T
from model.demo.world import build_world


@pytest.fixture(scope="module")
def world():
    return build_world(seed=3, n_entities=64)


def test_lookup_gives_an_entitys_facts_in_the_language_of_the_name(world):
    for etype, entities in world["entities"].items():
        for e in entities:
            entry = T.lookup(world, e["zh"])
            assert entry.startswith(e["zh"]) or e["zh"] in entry
            assert all(v["zh"] in entry for v in e["attrs"].values())
            if e["bilingual"]:
                english = T.lookup(world, e["en"].upper())  # names are matched without case
                assert all(v["en"] in english for v in e["attrs"].values())
    assert T.lookup(world, "无名氏") == "百科中没有“无名氏”的条目。"
    assert T.lookup(world, "Nobody") == "The encyclopedia has no entry for Nobody."


@pytest.mark.parametrize("expression,value", [
    ("12*7", "84"), ("2+3*4", "14"), ("(1+2)*3", "9"), ("-5+2", "-3"), ("7/2", "3.5"), ("1/3", "0.333333"),
    ("3 - - 2", "5"), ("１２", "12"), ("12×3÷4", "9"), ("（2+3）*2", "10"), ("1/0", "error: division by zero"),
    ("2**3", None), ("__import__('os')", None), ("", None), ("(1+2", "error: a ')' is missing"), ("1 2", None)])
def test_calculate_is_exact_arithmetic_and_never_eval(expression, value):
    out = T.calculate(expression)
    if value is None:
        assert out.startswith("error: ")
    else:
        assert out == value


@settings(max_examples=300, deadline=None, database=None)
@given(st.recursive(st.integers(0, 10 ** 6).map(str),
                    lambda inner: st.tuples(inner, st.sampled_from("+-*/"), inner).map(lambda t: f"({t[0]}{t[1]}{t[2]})"),
                    max_leaves=12))
def test_calculate_agrees_with_exact_fractions(expression):
    expected = None
    try:
        expected = eval(expression.replace("/", "*Fraction(1)/"), {"Fraction": Fraction})  # the test's reference only
    except ZeroDivisionError:
        assert T.calculate(expression) == "error: division by zero"
        return
    out = T.calculate(expression)
    if expected.denominator == 1:
        assert out == str(expected.numerator)
    else:
        assert abs(float(out) - float(expected)) <= 1e-6 * max(1, abs(float(expected)))


def test_conversations_are_valid_rows_of_the_format(world, tmp_path, tokenizer_dir=None):
    from transformers import AutoTokenizer
    from model.chat_format import IGNORE as IGNORE_INDEX
    from model.dataset import SFTDataset
    rng = random.Random(0)
    person = world["entities"]["person"][0]
    rows = [T.lookup_conversation(world, "person", "hobby", "zh", person, f"{person['zh']}有什么爱好？"),
            T.arithmetic_conversation(rng, "zh"), T.arithmetic_conversation(rng, "en", "3*(4+5)"),
            T.answer_without_tool("person", "hobby", "zh", person, f"{person['zh']}有什么爱好？"),
            T.thinking_conversation(world, person, "zh"), T.thinking_conversation(world, person, "zh", think=False)]
    for row in rows:
        check_messages(row["conversations"], "conversations")
    assert rows[2]["conversations"][2]["content"] == "27"
    question, middle, answer = T.two_hop(world, person, "zh")
    city = person["attrs"]["hometown"]["zh"]
    assert city in middle and answer in middle and middle.index(city) < middle.index(answer)
    path = tmp_path / "tools.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tok = AutoTokenizer.from_pretrained("model/minimind_tokenizer")
    ds = SFTDataset(str(path), tok, max_length=512)
    first = ds[0]
    assert tok.decode(first["input_ids"]) == cf.render(rows[0]["conversations"], T.TOOLS)
    targets = tok.decode([t for t, l in zip(first["input_ids"].tolist(), first["labels"].tolist()) if l != IGNORE_INDEX])
    assert targets.startswith('<tool_call>{"name": "lookup", "arguments": {"name": "') and "出生在" not in targets
    off = ds[5]
    assert tok.decode(off["input_ids"]).endswith("<s>assistant\n<think></think>\n" + rows[5]["conversations"][1]["content"]
                                                   + "</s>\n")


def scripted(answers, prompts):
    """A stand-in for the model: answers in order, each prompt it was given decoded into `prompts`."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained("model/minimind_tokenizer")

    def complete(batch):
        prompts.extend(tok.decode(ids) for ids in batch)
        return [answers.pop(0) for _ in batch]
    return type("Engine", (), {"tokenizer": tok}), complete


def test_tool_loop_runs_the_calls_and_sends_the_results_back(world):
    person = world["entities"]["person"][1]
    call = cf.call_text({"name": "lookup", "arguments": {"name": person["zh"]}})
    prompts = []
    engine, complete = scripted([call, "直接回答。", "他是一位" + person["attrs"]["profession"]["zh"] + "。"], prompts)
    ask = [[{"role": "user", "content": "问"}], [{"role": "user", "content": "另一个问题"}]]
    first, second = T.tool_loops(engine, world, ask, complete=complete)
    assert first["answer"].endswith(person["attrs"]["profession"]["zh"] + "。") and first["garbled"] == 0
    assert first["calls"] == [{"name": "lookup", "arguments": {"name": person["zh"]}}]
    assert second == {"answer": "直接回答。", "calls": [], "reasoning": "", "garbled": 0}
    assert "<tools>" in prompts[0] and T.lookup(world, person["zh"]) in prompts[2] and len(prompts) == 3
    engine, complete = scripted(['<tool_call>{"name": "lookup"</tool_call>'], [])
    assert T.tool_loop(engine, world, ask[0], complete=complete)["garbled"] == 1
    engine, complete = scripted(["<think>X出生在Y城。Y城位于Z国。</think>\nZ国。"], [])
    assert T.tool_loop(engine, world, ask[0], tools=None, complete=complete)["reasoning"] == "X出生在Y城。Y城位于Z国。"


def test_tool_loop_on_a_real_engine(world):
    """The batched loop drives the project's engine (a random tiny model: whatever it says, the loop ends)."""
    import torch
    from transformers import AutoTokenizer
    from model.engine import Engine
    from model.LMConfig import LMConfig
    from model.model import Transformer
    torch.manual_seed(0)
    engine = Engine(Transformer(LMConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=256)),
                    AutoTokenizer.from_pretrained("model/minimind_tokenizer"), max_batch=4)
    results = T.tool_loops(engine, world, [[{"role": "user", "content": f"{n}*3等于多少？"}] for n in range(6)],
                           max_new_tokens=8)
    assert len(results) == 6 and all(isinstance(r["answer"], str) and len(r["calls"]) <= 3 for r in results)
