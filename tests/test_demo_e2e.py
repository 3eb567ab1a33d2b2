"""The README's first command end to end (default settings, fewer held-out rows measured): every stage script runs
as a subprocess, and each stage's effect on held-out data must beat its computed trivial baseline (or the model
before that stage) by a margin, on the stage that taught it and on the final model of the chain. The margins are below
the report's targets: this run measures fewer rows, and a test must hold on any machine; the report card judges the
targets themselves. The letter form of the demo C-Eval is reported, not asserted (it stays at the best constant
letter at this size); the cloze form must beat it."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # the whole default demo: about ten minutes


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    proc = subprocess.run([sys.executable, "demo.py", "--out", str(out / "run"), "--data", str(out / "data"),
                           "--eval_limit", "160"], cwd=ROOT, capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "python 2-eval.py --model" in proc.stdout and "chat_openai_api.py" in proc.stdout
    assert "streamlit run fast_inference.py" in proc.stdout
    return out / "run", json.loads((out / "run" / "report.json").read_text())


def test_report_files_fields_and_losses(report):
    folder, r = report
    for name in ("report.md", "report_losses.png", "report_effects.png", "export/config.json"):
        assert (folder / name).is_file(), name
    s = r["stages"]
    for stage, key in [("pretrain", "fact_accuracy_new_wording"), ("sft", "heldout_baseline"), ("sft", "retention"),
                       ("sft_multi", "followup_before"), ("sft_multi", "followup_after"), ("lora", "leak_rate"),
                       ("dpo", "rude_after"), ("ceval_demo", "baseline")]:
        assert key in s[stage], (stage, key)
    for stage, key in [("sft", "heldout_accuracy"), ("lora", "identity_after"), ("dpo", "pref_acc_after")]:
        assert s[stage][f"{key}_n"] >= 40 and len(s[stage][f"{key}_ci95"]) == 2
    assert isinstance(s["ceval_demo"]["count"], int) and s["ceval_demo"]["count"] >= 200
    for stage in ("pretrain", "sft", "lora", "dpo"):  # multi-turn SFT starts from a model that already chats
        assert s[stage]["final_loss"] < s[stage]["first_loss"], stage
    tok = r["tokenizer"]  # the tokenizer favours neither split
    assert abs(tok["tokens_per_name_sft"] - tok["tokens_per_name_heldout"]) < 0.35


def test_pretraining_stores_facts(report):
    p = report[1]["stages"]["pretrain"]
    assert p["fact_accuracy"] >= p["fact_baseline"] + 0.5
    assert p["fact_accuracy_new_wording"] >= p["fact_baseline"] + 0.3


def test_sft_answers_about_entities_it_never_saw_and_keeps_their_facts(report):
    s = report[1]["stages"]["sft"]
    assert s["heldout_accuracy"] >= s["heldout_baseline"] + 0.3
    assert s["heldout_accuracy"] >= s["heldout_accuracy_before_sft"] + 0.3
    assert s["retention"] >= s["retention_baseline"] + 0.5


def test_multi_turn_sft_resolves_the_pronoun(report):
    m = report[1]["stages"]["sft_multi"]
    assert m["followup_after"] >= m["followup_before"] + 0.2
    assert m["followup_after"] >= m["followup_baseline"] + 0.2


def test_lora_gives_the_identity_without_leaking_it(report):
    lora = report[1]["stages"]["lora"]
    assert lora["identity_before"] <= 0.1 and lora["identity_after"] >= lora["identity_before"] + 0.8
    assert lora["leak_rate"] <= 0.1


def test_dpo_prefers_the_chosen_answers_and_stops_being_rude(report):
    dpo = report[1]["stages"]["dpo"]
    assert dpo["pref_acc_after"] >= dpo["pref_acc_before"] + 0.2
    assert dpo["pref_acc_after"] >= dpo["pref_baseline_longer_or_shorter"] + 0.1
    assert dpo["rude_after"] <= dpo["rude_before"] - 0.3



def test_the_final_model_is_the_chain_end_and_keeps_every_lesson(report):
    folder, r = report
    s = r["stages"]
    final = s["final"]
    assert Path(final["checkpoint"]).name == "grpo_128.pth" and Path(final["checkpoint"]).is_file()
    for key in ("heldout_accuracy", "followup", "identity", "leak_rate", "rude_rate", "abstention", "wrong_abstention",
                "loop_rate", "demo_questions"):
        for stage in ("sft", "sft_multi", "lora", "dpo", "grpo", "final"):
            assert f"{key}_n" in s[stage] and len(s[stage][f"{key}_ci95"]) == 2, (stage, key)
    assert final["heldout_accuracy"] >= final["heldout_baseline"] + 0.3
    assert final["heldout_accuracy"] >= s["sft"]["heldout_accuracy"] - 0.3  # (the report judges the 0.05 target)
    assert final["followup"] >= s["sft"]["followup"] + 0.15  # the multi-turn lesson survives the later stages
    assert final["identity"] >= s["sft_multi"]["identity"] + 0.7 and final["leak_rate"] <= 0.1
    assert final["rude_rate"] <= s["sft_multi"]["rude_rate"] - 0.3


def test_it_says_what_it_does_not_know(report):
    s = report[1]["stages"]
    for stage in ("sft", "final"):  # an always-abstain rule would score 1.0 on both: both must hold
        assert s[stage]["abstention"] >= 0.6, stage
        assert s[stage]["wrong_abstention"] <= 0.2, stage


def test_loops_are_rare_and_the_transcript_is_in_the_report(report):
    folder, r = report
    assert r["stages"]["final"]["loop_rate"] <= 0.15
    assert len(r["stages"]["transcript"]) >= 10
    md = (folder / "report.md").read_text(encoding="utf-8")
    assert "A conversation with the final model" in md and "你好，你是谁？" in md


def test_grpo_ends_the_chain_with_its_measures(report):
    folder, r = report
    g = r["stages"]["grpo"]
    for key in ("pass1_before", "pass1_after", "pass8_before", "pass8_after"):
        assert g[f"{key}_n"] >= 40 and len(g[f"{key}_ci95"]) == 2, key
    assert g["task"] == "heldout_qa"
    assert len(g["reward_curve"]) == g["steps"] and 0 <= g["kl_final"] < 0.5  # the KL leash held
    assert g["pass8_before"] >= g["pass1_before"] + 0.1  # 8 samples find answers 1 does not: RL has room
    assert g["reward"] == "answer*clean" and g["replay"]
    assert g["pass1_after"] >= g["pass1_before"] + 0.05  # +0.097 on this seed, +0.108 to +0.249 on seeds 1-5
    assert g["clean_after"] >= max(0.9, g["clean_before"] - 0.05)  # the whole replies stay whole
    assert "## GRPO" in (folder / "report.md").read_text(encoding="utf-8")


def test_the_optional_tools_stage_is_measured_and_reported(tmp_path):
    """demo.py --tools_stage on a small quick world: the stage joins the chain before GRPO and the report has its
    measures (with and without tools, unneeded calls, thinking and direct) on its checkpoint and the final model."""
    proc = subprocess.run([sys.executable, "demo.py", "--out", str(tmp_path / "run"), "--data", str(tmp_path / "data"),
                           "--tools_stage", "--n_entities", "64", "--scale", "0.1", "--eval_limit", "40",
                           "--grpo_steps", "20"], cwd=ROOT, capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((tmp_path / "run" / "report.json").read_text())
    s = r["stages"]
    for stage in ("tools", "final"):
        for key in ("with_tools", "without_tools", "unneeded_calls", "unknown_lookup", "with_thinking", "direct"):
            where = s["thinking"] if stage == "tools" and key in ("with_thinking", "direct") else s[stage]
            assert f"{key}_n" in where and len(where[f"{key}_ci95"]) == 2, (stage, key)
    assert s["tools"]["with_tools_n"] > 100 and s["thinking"]["with_thinking_n"] >= 8  # 4 held-out persons x 2 wordings
    labels = {t["measure"] for t in r["targets"]}
    assert {"tools.with_tools", "thinking.with_thinking", "final.with_tools"} <= labels
    assert "## Tools and thinking" in (tmp_path / "run" / "report.md").read_text(encoding="utf-8")


def test_ceval_both_methods(report):
    c = report[1]["stages"]["ceval_demo"]
    assert c["letter_accuracy_n"] >= 200 and c["cloze_accuracy_n"] == c["letter_accuracy_n"]
    assert c["cloze_accuracy"] >= c["baseline"] + 0.15  # the knowledge is there when the options' text is scored
