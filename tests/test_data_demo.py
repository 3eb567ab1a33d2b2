"""The demo world: byte-identical regeneration, honest held-out splits, and files every stage can read."""
import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from model.demo import world as W
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
    return "\n".join(t for name in names for t in W.texts_of(rows(folder, name)))


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
    roles = {"tokenizer", "names", "pretrain", "sft_single", "sft_multi", "lora", "dpo", "ceval_dir", "eval_pretrain",
             "eval_sft", "eval_followup", "eval_lora", "eval_dpo", "eval_style", "eval_demo_questions", "eval_abstain",
             "eval_open", "eval_text", "sft_tools", "eval_tools", "eval_thinking", "grpo", "eval_grpo"}
    assert set(m["files"]) == roles
    for role, rel in m["files"].items():
        assert (folder / rel).exists(), role
    assert m["identity_keyword"] == "MiniMind" and m["style_markers"] and m["answer_rule"]
    assert {f.name for f in (folder / "ceval").iterdir()} == {f"{s}_val.csv" for s in
                                                             ("demo_people", "demo_cities", "demo_animals",
                                                              "demo_inventions")}
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
    assert {e["kind"] for e in evals} == {"unseen_wording", "control"}
    for e in evals:
        assert e["prompt"] not in lora_train
    novel_cores = [c for lang, n in W.IDENTITY_EVAL_ONLY.items() for c in W.IDENTITY_CORES[lang][-n:]]
    assert not any(core in q for core in novel_cores for q in lora_train)
    answers = [r["conversations"][-1]["content"] for r in rows(folder, "lora_identity.jsonl")]
    assert sum(m["identity_keyword"] in a for a in answers) >= len(answers) / 2
    others = train_texts(folder, "pretrain.jsonl", "sft_single.jsonl", "sft_multi.jsonl")
    assert m["identity_keyword"] not in others
    # DPO (after LoRA in the chain) keeps the identity on LoRA's own training wordings only
    kept = [r for r in rows(folder, "dpo.jsonl") if m["identity_keyword"] in json.dumps(r, ensure_ascii=False)]
    assert kept and all(r["kind"] == "identity" and r["chosen"][0]["content"] in lora_train for r in kept)
    assert not any(core in q for core in W.IDENTITY_CORES["zh"] for q in user_messages(folder, "sft_single.jsonl"))


def test_english_share_and_style_noise(world):
    folder, m = world
    assert 0.2 <= m["english_share_of_pretrain"]["rows"] <= 1 / 3
    replies = lambda name: [msg["content"] for r in rows(folder, name) for msg in r["conversations"]
                            if msg["role"] == "assistant" and msg["content"] not in "ABCD"]  # MCQ drills are Chinese
    english = lambda texts: sum(a.isascii() for a in texts) / len(texts)
    assert 0.2 <= english(replies("sft_single.jsonl")) <= 1 / 3  # as many entities are described in English
    chats = [r["conversations"][-1]["content"] for r in rows(folder, "sft_multi.jsonl")]
    assert 0.4 <= english(chats) <= 0.6  # multi-turn chats start in either language alike
    answers = replies("sft_single.jsonl") + replies("sft_multi.jsonl")
    rude = sum(any(s in a.lower() for s in m["style_markers"]) for a in answers) / len(answers)
    assert 0.12 <= rude <= 0.2  # P_TRIGGER * P_RUDE_TRIGGERED + P_RUDE_PLAIN of the questions: about 0.16
    kinds = {r["kind"] for r in rows(folder, "dpo.jsonl")}
    assert kinds == {"rude_triggered", "rude_plain", "off_topic", "wrong_fact", "abstain", "identity"}
    # some rude replies are in SFT data but in no DPO pair: the detector counting them is not DPO's list
    unseen = [u for lang in ("zh", "en") for u in W.RUDE_UNSEEN[lang]]
    assert all(u in answers for u in unseen)
    rejected = {r["rejected"][-1]["content"] for r in rows(folder, "dpo.jsonl")}
    assert not rejected & set(unseen)
    assert all(any(mk in u.lower() for mk in m["style_markers"]) for u in unseen)


def test_mcq_answers_are_balanced(world):
    folder, _ = world
    letters = [r["conversations"][-1]["content"] for r in rows(folder, "sft_single.jsonl")
               if r["conversations"][-1]["content"] in ("A", "B", "C", "D")]
    keys = [q["answer"] for f in (folder / "ceval").iterdir() for q in csv.DictReader(open(f, encoding="utf-8"))]
    assert len(keys) >= 200
    for group in (letters, keys):
        assert len(group) > 200 and all(abs(group.count(x) / len(group) - 0.25) <= 0.02 for x in "ABCD")


def test_tokenizer_text_treats_both_splits_alike(world):
    folder, m = world
    tok_rows = [r["text"] for r in rows(folder, "tokenizer.jsonl")]
    pre_rows = [r["text"] for r in rows(folder, "pretrain.jsonl")]
    pages = [t for t in pre_rows if t.startswith(("问：", "Q: "))]
    assert pages and sorted(tok_rows) == sorted(t for t in pre_rows if t not in pages)
    text = "\n".join(tok_rows)
    mean = {split: sum(text.count(zh) for names in m["splits"][split].values() for zh, _ in names)
            / sum(len(names) for names in m["splits"][split].values()) for split in ("sft", "heldout")}
    assert mean["sft"] == pytest.approx(mean["heldout"], rel=0.1), mean


def test_values_cannot_be_guessed_from_names(world):
    """Learn, on SFT entities, the most common value per name syllable (and per kind suffix); on held-out entities
    that rule must do no better than always answering the most common value (beyond binomial noise)."""
    import math
    folder, m = world
    world_ = W.build_world(seed=42, n_entities=m["params"]["n_entities"])
    syllables = [zh for zh, _ in W.SYLLABLES] + [k for k, _ in W.ANIMAL_KINDS + W.INVENTION_KINDS] + ["城"]
    for etype in W.TYPES:
        entities = world_["entities"][etype]
        for attr in W.attrs_of(etype):
            by_syllable, overall = {}, {}
            for e in entities:
                if e["split"] == "sft":
                    v = e["attrs"][attr]["zh"]
                    overall[v] = overall.get(v, 0) + 1
                    for syl in {c for c in e["zh"] if c in syllables}:
                        by_syllable.setdefault(syl, {}).setdefault(v, 0)
                        by_syllable[syl][v] += 1
            common = max(overall, key=overall.get)
            held = [e for e in entities if e["split"] == "heldout"]

            def guess(e):
                votes = {}
                for syl in {c for c in e["zh"] if c in syllables}:
                    for v, n in by_syllable.get(syl, {}).items():
                        votes[v] = votes.get(v, 0) + n
                return max(votes, key=votes.get) if votes else common

            rule = sum(guess(e) == e["attrs"][attr]["zh"] for e in held) / len(held)
            base = sum(common == e["attrs"][attr]["zh"] for e in held) / len(held)
            noise = 3 * math.sqrt(0.25 / len(held))
            assert rule <= base + noise, (etype, attr, rule, base)


def test_ceval_asks_only_about_facts_no_fine_tuning_row_states_or_asks(world):
    folder, m = world
    tuning = train_texts(folder, "sft_single.jsonl", "sft_multi.jsonl", "lora_identity.jsonl", "dpo.jsonl")
    held = {zh for names in m["splits"]["heldout"].values() for zh, _ in names}
    for f in (folder / "ceval").iterdir():
        for q in csv.DictReader(open(f, encoding="utf-8")):
            named = [zh for zh in held if zh in q["question"]]
            assert named, q["question"]  # about a held-out entity ...
            assert not any(zh in tuning for zh in named)  # ... whose name no fine-tuning row contains


def test_followups_name_the_entity_only_in_the_earlier_turn(world):
    folder, m = world
    rows_ = rows(folder, "eval_followup.jsonl")
    assert len(rows_) >= 100
    for r in rows_:
        name = r["entity"] if r["lang"] == "zh" else next(en for names in m["splits"]["heldout"].values()
                                                           for zh, en in names if zh == r["entity"])
        assert name not in r["question"] and name in r["history"][0]["content"]
        assert r["answer"] not in r["history"][-1]["content"]  # the earlier turn answered another attribute


def test_a_world_too_small_for_its_splits_is_refused_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "data_process.py", "demo", "--out", str(tmp_path / "w"), "--n_entities", "40"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and not (tmp_path / "w" / "manifest.json").exists()
    assert proc.stderr.strip().count("\n") == 0 and "--n_entities 64" in proc.stderr


# ----------------------------------------------------------------------------- outside the world

def test_out_of_world_evaluation_never_trained(world):
    folder, _ = world
    from model.demo import unknowns as U
    evaluated = rows(folder, "eval_abstain.jsonl")
    assert {r["kind"] for r in evaluated} == {"unknown_name", "unknown_fact", "task"}
    asked = user_messages(folder, "sft_single.jsonl", "sft_multi.jsonl", "lora_identity.jsonl", "dpo.jsonl")
    assert not {r["prompt"] for r in evaluated} & asked
    trained_names, eval_names = U.unknown_names(W.build_world(42, 120), 42)
    world_names = set(W.all_names(W.build_world(42, 120)))
    texts = train_texts(folder, "pretrain.jsonl", "sft_single.jsonl", "sft_multi.jsonl", "lora_identity.jsonl",
                        "dpo.jsonl")
    for _, name in eval_names:  # held-out unknown names: in no training text, and no name of the world
        assert name["zh"] not in texts and name["en"] not in texts and name["zh"] not in world_names
    assert {n["zh"] for _, n in trained_names}.isdisjoint(n["zh"] for _, n in eval_names)
    replies = {m["content"] for r in rows(folder, "sft_single.jsonl") for m in r["conversations"]}
    assert set(U.ABSTAIN.values()) | set(U.CANNOT.values()) <= replies  # SFT teaches both kinds of reply
    assert any(r["kind"] == "abstain" for r in rows(folder, "dpo.jsonl"))
    assert len(rows(folder, "eval_open.jsonl")) >= 40


def test_abstention_judge_reads_the_first_answer_in_the_question_language():
    from model.demo.unknowns import abstains
    assert abstains("抱歉，这个我不知道。", "zh") and abstains("Sorry, I don't know that.", "en")
    assert abstains("抱歉，这个我还做不到。", "zh") and abstains("Sorry, I can't do that yet.", "en")
    assert not abstains("卡洛娜是一位画家。我不知道别的。", "zh")  # a made-up fact first: no abstention
    assert not abstains("Sorry, I don't know that.", "zh")  # the wrong language
    assert not abstains("卡洛娜是一位画家。", "zh")
