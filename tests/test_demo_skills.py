"""model/demo/skills.py: the tool and thinking stage's data keeps its held-out questions out of every training file,
and its measures count what the model did (a scripted model stands in for one)."""
import json

import pytest

from model import chat_format as cf
from model.demo import skills as S
from model.demo import tools as T
from model.demo import unknowns as U
from model.demo import world as W


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("world")
    manifest = W.generate(str(folder), seed=3, n_entities=64, rounds=2, repo_root=str(folder))
    text = {role: (folder / rel).read_text(encoding="utf-8") for role, rel in manifest["files"].items()
            if role != "ceval_dir"}
    # what GRPO trains on is its prompts and answers; "competitors" only tell the reward which answers are wrong
    text["grpo"] = "".join(json.dumps([r["conversations"], r["answer"]], ensure_ascii=False)
                           for r in map(json.loads, text["grpo"].splitlines()))
    return W.build_world(seed=3, n_entities=64), text


TRAINING = ("pretrain", "tokenizer", "names", "sft_single", "sft_multi", "sft_tools", "lora", "dpo", "grpo")


def test_encyclopedia_entities_exist_only_in_the_encyclopedia(data):
    world, text = data
    entries = T.encyclopedia(world)
    assert len(entries) == T.ENCYCLOPEDIA_PER_TYPE * len(W.TYPES)
    known = set(W.all_names(world)) | {n["zh"] for pair in U.unknown_names(world, 3) for _, n in pair}
    for e in entries:
        assert e["zh"] not in known
        assert T.lookup(world, e["zh"]).startswith(e["zh"]) and T.find(world, e["zh"])[0] is e
        assert e["zh"] not in text["pretrain"] and e["zh"] not in text["names"].split()
        trained_in = [role for role in TRAINING if e["zh"] in text[role]]
        assert trained_in == ([] if e["split"] == "heldout" else ["sft_tools"]), (e["zh"], trained_in)
    for _, n in U.unknown_names(world, 3)[1]:  # the evaluated unknown names: the encyclopedia has none of them
        assert T.lookup(world, n["zh"]) == T.NOT_FOUND["zh"].format(n=n["zh"])


def test_held_out_questions_are_in_no_training_file(data):
    world, text = data
    rows = [json.loads(line) for line in text["eval_tools"].splitlines()]
    kinds = {r["kind"] for r in rows}
    assert kinds == {"lookup", "arithmetic", "known"}
    held = {e["zh"] for e in T.encyclopedia(world) if e["split"] == "heldout"}
    for r in rows:
        if r["kind"] == "lookup":
            assert any(name in r["prompt"] for name in held)
        if r["kind"] == "arithmetic":
            expression = r["prompt"].split("等于")[0].split("是")[0].replace("请计算", "").rstrip("。？?.")
            expression = expression.split()[-1]
            assert f'"expression": "{expression}"' not in text["sft_tools"], expression
    persons = {e["zh"]: e for e in world["entities"]["person"]}
    for r in (json.loads(line) for line in text["eval_thinking"].splitlines()):
        name = next(n for n in persons if n in r["prompt"] or persons[n]["en"] in r["prompt"])
        assert persons[name]["split"] == "heldout"
        assert not any(persons[name]["zh"] in text[role] for role in TRAINING if role not in ("pretrain", "tokenizer",
                                                                                             "names"))


def test_stage_rows_are_valid_and_teach_each_lesson(data):
    world, text = data
    rows = [json.loads(line) for line in text["sft_tools"].splitlines()]
    for r in rows:
        cf.check_conversation(r["conversations"], "row")
    calls = [m["tool_calls"][0]["name"] for r in rows for m in r["conversations"] if m.get("tool_calls")]
    assert calls.count("lookup") > 100 and calls.count("calculate") == S.ARITHMETIC_ROWS["train"]
    assert sum("reasoning_content" in r["conversations"][-1] for r in rows) > 20
    assert sum(r.get("enable_thinking") is False for r in rows) > 10
    offered_not_called = [r for r in rows if r.get("tools") and not any(m.get("tool_calls") for m in r["conversations"])]
    assert len(offered_not_called) == S.KNOWN_WITH_TOOLS
    earlier = set(text["sft_single"].splitlines()) | set(text["sft_multi"].splitlines())
    replayed = [line for line in text["sft_tools"].splitlines() if line in earlier]
    assert len(replayed) > len(rows) * 0.25  # the earlier lessons are replayed beside the new ones
    assert not any(m in line.lower() for line in replayed for m in W.STYLE_MARKERS)  # only the polite ones


def test_arithmetic_is_judged_by_the_first_answers_last_number():
    row = {"kind": "arithmetic", "answer": "84"}
    assert S.right(row, "12*7等于84。") and S.right(row, "12*7 equals 84.")
    assert not S.right(row, "84-1等于83。") and not S.right(row, "不知道。") and not S.right(row, "12*7等于85。\n84")


def scripted(reply):
    """A stand-in model: reply(prompt text) -> its generated text, for every prompt of a batch."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained("model/minimind_tokenizer")
    return type("Engine", (), {"tokenizer": tok}), lambda batch: [reply(tok.decode(ids)) for ids in batch]


def test_tool_measures_count_calls_answers_and_abstentions(data):
    world, text = data
    rows = [json.loads(line) for line in text["eval_tools"].splitlines()]
    rows = {"tools": [r for r in rows if r["kind"] != "known"][:30] + [r for r in rows if r["kind"] == "arithmetic"][:10],
            "known": [r for r in rows if r["kind"] == "known"][:10]}
    unknown = [{"prompt": q, "lang": lang} for q, _, lang, kind in U.abstain_rows(world, 3, True)
               if kind == "unknown_name" and lang == "zh"][:8]
    counts = json.loads(json.dumps(W.sft_value_counts(world)))
    engine, never = scripted(lambda prompt: U.ABSTAIN["zh"])
    m = S.tool_measures(engine, world, rows, unknown, counts, complete=never)
    assert m["with_tools"]["value"] == m["without_tools"]["value"] == 0.0
    assert m["unneeded_calls"]["value"] == m["unknown_lookup"]["value"] == 0.0
    assert m["unknown_abstain_with_tools"]["value"] == 1.0

    def oracle(prompt):
        """Looks every question up (arithmetic: calculates), then answers from the tool's result."""
        question = prompt.split("<s>user\n")[-1].split("</s>")[0]
        if "<tools>" not in prompt:
            return U.ABSTAIN["zh"]
        if "<s>tool\n" in prompt:
            result = prompt.split("<s>tool\n")[-1].split("</s>")[0]
            row = next((r for r in rows["tools"] + rows["known"] if r["prompt"] == question), None)
            if row and row["kind"] == "arithmetic":
                return f"等于{result}。"
            if row and row["answer"] in result:
                return f"{row['answer']}。"
            return U.ABSTAIN["zh"]
        row = next((r for r in rows["tools"] if r["prompt"] == question), None)
        if row and row["kind"] == "arithmetic":
            expression = question.replace("请计算", "").split("等于")[0].split("是多少")[0].rstrip("。？")
            expression = expression.split()[-1].rstrip("?.")
            return cf.call_text({"name": "calculate", "arguments": {"expression": expression}})
        name = next((e["zh"] for e in T.encyclopedia(world) + [e for t in W.TYPES for e in world["entities"][t]]
                     if e["zh"] in question), question[:3])
        return cf.call_text({"name": "lookup", "arguments": {"name": name}})

    engine, complete = scripted(oracle)
    m = S.tool_measures(engine, world, rows, unknown, counts, complete=complete)
    assert m["with_tools"]["value"] == 1.0 and m["without_tools"]["value"] == 0.0
    assert m["unneeded_calls"]["value"] == 1.0 and m["known_right_with_tools"]["n"] == 10
    assert m["unknown_lookup"]["value"] == 1.0 and m["unknown_abstain_with_tools"]["value"] == 1.0
    assert m["with_tools"]["baseline"] < 0.5


def test_thinking_measures_judge_the_answer_after_the_thought(data):
    world, text = data
    rows = [json.loads(line) for line in text["eval_thinking"].splitlines()]
    answers = {r["prompt"]: r for r in rows}

    def model(prompt):
        row = answers[prompt.split("<s>user\n")[-1].split("</s>")[0]]
        if prompt.endswith(cf.THINK_OPEN):  # thinking on: the right middle step, then the answer
            return f"{row['city']}。</think>\n{row['answer']}。"
        return "不知道。"

    engine, complete = scripted(model)
    m = S.thinking_measures(engine, world, rows, complete=complete)
    assert m["with_thinking"]["value"] == 1.0 and m["direct"]["value"] == 0.0
    assert m["middle_step_right"]["value"] == 1.0 and 0 <= m["with_thinking"]["baseline"] < 0.6
