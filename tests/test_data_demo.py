"""The demo world: byte-identical regeneration, honest held-out splits, and files every stage can read."""
import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from model import demo_world as W
from model.convert import check_messages

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    manifest = W.generate(str(out), seed=42, repo_root=str(out))
    return out, manifest


def rows(folder, name):
    return [json.loads(line) for line in open(folder / name, encoding="utf-8")]


def train_texts(folder, *names):
    return "\n".join(t for name in names for t in W._texts(rows(folder, name)))


def user_messages(folder, *names):
    out = set()
    for name in names:
        for r in rows(folder, name):
            for key in ("conversations", "chosen", "rejected"):
                out |= {m["content"] for m in r.get(key, []) if m["role"] == "user"}
    return out


def test_regeneration_is_byte_identical(world, tmp_path):
    first, manifest = world
    proc = subprocess.run([sys.executable, str(ROOT / "data_process.py"), "demo", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, check=True)
    assert "content sha256" in proc.stdout
    second = json.loads((tmp_path / "manifest.json").read_text(encoding="utf-8"))
    assert second["content_sha256"] == manifest["content_sha256"]
    names = sorted(p.relative_to(first).as_posix() for p in first.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    for name in names:
        if name != "manifest.json":
            assert (first / name).read_bytes() == (tmp_path / name).read_bytes(), name
    # only the folder-relative paths may differ between the two manifests
    assert {**second, "files": None} == {**manifest, "files": None}


def test_another_seed_gives_another_world(tmp_path, world):
    m = W.generate(str(tmp_path), seed=7, n_entities=80, repo_root=str(tmp_path))
    assert m["content_sha256"] != world[1]["content_sha256"]


def test_manifest_lists_every_role(world):
    folder, m = world
    roles = {"tokenizer", "pretrain", "sft_single", "sft_multi", "lora", "dpo", "ceval_dir", "eval_pretrain",
             "eval_sft", "eval_lora", "eval_dpo", "eval_style", "eval_demo_questions"}
    assert set(m["files"]) == roles
    for role, rel in m["files"].items():
        assert (folder / rel).exists(), role
    assert m["identity_keyword"] == "MiniMind" and m["style_markers"] and m["answer_rule"]
    assert {f.name for f in (folder / "ceval").iterdir()} == {f"{s}_val.csv" for s in
                                                             ("demo_people", "demo_cities", "demo_animals",
                                                              "demo_inventions", "demo_common_sense")}
    for name, size in m["sizes"].items():
        text = (folder / name).read_text(encoding="utf-8")
        assert size["chars"] == len(text) and size["rows"] > 0


def test_every_training_row_is_a_valid_chat(world):
    folder, _ = world
    for name in ("sft_single.jsonl", "sft_multi.jsonl", "lora_identity.jsonl"):
        for r in rows(folder, name):
            check_messages(r["conversations"], name)
    for name in ("dpo.jsonl", "eval_dpo.jsonl"):
        for r in rows(folder, name):
            assert check_messages(r["chosen"], "c")[:-1] == check_messages(r["rejected"], "r")[:-1]
            assert r["chosen"][-1] != r["rejected"][-1]
    assert max(len(r["conversations"]) for r in rows(folder, "sft_multi.jsonl")) >= 6


def test_heldout_entities_never_reach_fine_tuning_data(world):
    folder, m = world
    text = train_texts(folder, "sft_single.jsonl", "sft_multi.jsonl", "lora_identity.jsonl", "dpo.jsonl")
    held = [pair for names in m["splits"]["heldout"].values() for pair in names]
    trained = [pair for names in m["splits"]["sft"].values() for pair in names]
    assert held and not {tuple(p) for p in held} & {tuple(p) for p in trained}
    for zh, en in held:
        assert zh not in text, zh
        assert not re.search(rf"\b{re.escape(en)}\b", text), en
    pretrain = train_texts(folder, "pretrain.jsonl")
    assert all(zh in pretrain for zh, _ in held), "held-out facts must be in the pretraining text"


def test_heldout_prompts_never_appear_in_training_text(world):
    folder, _ = world
    pretrain = train_texts(folder, "pretrain.jsonl")
    evals = rows(folder, "eval_pretrain.jsonl")
    assert {r["kind"] for r in evals} == {"new_context", "new_wording", "real_fact"}
    for r in evals:
        assert r["prompt"] not in pretrain, r["prompt"]
        assert r["answer"] in pretrain
    asked = user_messages(folder, "sft_single.jsonl", "sft_multi.jsonl", "lora_identity.jsonl", "dpo.jsonl")
    for r in rows(folder, "eval_sft.jsonl"):
        assert r["question"] not in asked and r["question"] not in pretrain  # nor in its question-answer pages
    for r in rows(folder, "eval_dpo.jsonl"):
        assert r["chosen"][-2]["content"] not in asked
    for r in rows(folder, "eval_style.jsonl"):
        assert r["prompt"] not in asked
    for r in rows(folder, "eval_demo_questions.jsonl"):
        assert r["question"] not in asked and r["keywords"]
    for f in (folder / "ceval").iterdir():
        for q in csv.DictReader(open(f, encoding="utf-8", newline="")):
            assert q["question"] not in asked and q["answer"] in "ABCD"
            assert W.format_mcq(q["question"], [q[k] for k in "ABCD"]) not in asked


def test_identity_only_in_the_lora_set(world):
    folder, m = world
    lora_train = user_messages(folder, "lora_identity.jsonl")
    evals = rows(folder, "eval_lora.jsonl")
    assert {e["kind"] for e in evals} == {"novel_wording", "recombined", "control"}
    for e in evals:
        assert e["prompt"] not in lora_train
    novel_cores = W.IDENTITY_CORES["zh"][-4:] + W.IDENTITY_CORES["en"][-3:]
    assert not any(core in q for core in novel_cores for q in lora_train)
    answers = [r["conversations"][-1]["content"] for r in rows(folder, "lora_identity.jsonl")]
    assert sum(m["identity_keyword"] in a for a in answers) > len(answers) / 2
    others = train_texts(folder, "pretrain.jsonl", "sft_single.jsonl", "sft_multi.jsonl", "dpo.jsonl")
    assert m["identity_keyword"] not in others
    assert not any(core in q for core in W.IDENTITY_CORES["zh"] for q in user_messages(folder, "sft_single.jsonl"))


def test_english_share_and_style_noise(world):
    folder, m = world
    assert 0.2 <= m["english_share_of_pretrain"]["rows"] <= 1 / 3
    answers = [msg["content"] for name in ("sft_single.jsonl", "sft_multi.jsonl") for r in rows(folder, name)
               for msg in r["conversations"] if msg["role"] == "assistant" and msg["content"] not in "ABCD"]
    english = sum(a.isascii() for a in answers) / len(answers)  # of free-text answers (MCQ drills are Chinese)
    assert 0.2 <= english <= 1 / 3
    rude = sum(any(s in a.lower() for s in m["style_markers"]) for a in answers) / len(answers)
    assert 0.15 <= rude <= 0.2
    kinds = {r["kind"] for r in rows(folder, "dpo.jsonl")}
    assert kinds == {"rude_triggered", "rude_plain", "wrong_fact"}


def test_mcq_answers_are_balanced(world):
    folder, _ = world
    letters = [r["conversations"][-1]["content"] for r in rows(folder, "sft_single.jsonl")
               if r["conversations"][-1]["content"] in ("A", "B", "C", "D")]
    assert len(letters) > 200 and all(letters.count(x) > len(letters) / 6 for x in "ABCD")
