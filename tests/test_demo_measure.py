"""The demo's measuring rules: first answers only, whole terms only, baselines computed from the rows, honest
intervals, balanced answer keys, the unseen-wording filter, and pretraining rows packed without losing a token."""
import json
import random

import pytest
import torch

from model.demo import measure as M
from model.demo import world as W


# ----------------------------------------------------------------------------- the matcher

@pytest.mark.parametrize("output, first", [
    ("卡洛娜是一位画家。她还是诗人。", "卡洛娜是一位画家。"),
    ("The Kalo bird is coloured red. It is blue too.", "The Kalo bird is coloured red."),
    ("答案是画家\n其实是医生", "答案是画家"),
    ("It lives in 3.5 km of caves! yes", "It lives in 3.5 km of caves!"),
    ("no end mark at all", "no end mark at all"),
    ("画家</s>医生", "画家"),
])
def test_first_answer_stops_at_the_first_sentence(output, first):
    assert M.first_answer(output) == first


def test_a_right_value_after_a_wrong_first_answer_is_wrong():
    assert not M.is_correct("卡洛娜是一位医生。卡洛娜是一位画家。", "画家", ["医生", "画家", "诗人"])
    assert M.is_correct("卡洛娜是一位画家。卡洛娜是一位医生。", "画家", ["医生", "画家", "诗人"])


def test_whole_terms_only():
    assert not M.has_term("The Kalo bird is coloured grey.", "red")
    assert M.has_term("The Kalo bird is Red.", "red")
    assert not M.has_term("it costs 1000 coins", "100")
    assert M.has_term("It boils at 100 degrees", "100")
    assert M.has_term("水的沸点是100摄氏度", "100")  # digits next to Chinese characters are a whole term


def test_an_answer_naming_two_values_is_not_correct():
    assert not M.is_correct("卡洛娜是一位画家或医生。", "画家", ["医生", "画家"])
    # a rival containing the expected value (or contained in it) is no rival
    assert M.is_correct("The Kalo wagon is made of gold.", "gold", ["gold", "golden", "iron"])


# ----------------------------------------------------------------------------- statistics and baselines

def test_wilson_interval_contains_the_estimate_and_narrows_with_n():
    lo, hi = M.wilson(30, 100)
    assert lo < 0.3 < hi
    lo2, hi2 = M.wilson(300, 1000)
    assert hi2 - lo2 < hi - lo
    assert M.wilson(0, 50)[0] == 0.0 and M.wilson(0, 50)[1] > 0.0


def test_baselines_are_computed_from_the_sft_answers():
    counts = {"person.profession": {"zh": {"画家": 6, "医生": 3, "诗人": 1}, "en": {}}}
    rows = [{"type": "person", "attr": "profession", "lang": "zh", "answer": a} for a in ("画家", "医生", "厨师", "画家")]
    base = M.value_baselines(rows, counts)
    assert base["most_common_value"] == pytest.approx(0.5)  # 画家 on rows 1 and 4
    assert base["random_sft_entity"] == pytest.approx((0.6 + 0.3 + 0 + 0.6) / 4)


def test_length_baseline_and_tied_preferences():
    sums = torch.tensor([[-3.0, -8.0, -2.0], [-6.0, -4.0, -2.0]])
    counts = torch.tensor([[3, 8, 2], [6, 2, 2]])
    pref = M.likelihood_preference((sums, counts), ["a", "b", "a"])
    # per token: chosen -1, -1, -1 vs rejected -1, -2, -1 -> a tie, a win, a tie
    assert pref["value"] == pytest.approx((0.5 + 1 + 0.5) / 3, abs=1e-4)
    assert pref["by_kind"] == {"a": 0.5, "b": 1.0}
    assert M.length_baseline((sums, counts)) == pytest.approx(max((0 + 1 + 0.5) / 3, 1 - (0 + 1 + 0.5) / 3))


def test_rude_or_evasive_detector_is_not_the_training_list():
    values = ["画家", "医生"]
    markers = W.STYLE_MARKERS
    assert M.rude_or_evasive(W.RUDE_UNSEEN["zh"][0], markers, values) == "rude"  # never shown to DPO, still caught
    assert M.rude_or_evasive("嗯嗯，这个嘛。", markers, values) == "evasive"  # names no value: evasive
    assert M.rude_or_evasive("好的，卡洛娜是一位医生。", markers, values) == ""  # wrong, but answered politely


# ----------------------------------------------------------------------------- the world's keys and wordings

def test_balanced_letters():
    for n in (200, 201, 202, 203):
        letters = W.balanced_letters(random.Random(n), n)
        counts = [letters.count(x) for x in "ABCD"]
        assert max(counts) - min(counts) <= 1 and len(letters) == n


def test_unseen_identity_wordings_never_occur_in_training(tmp_path):
    W.generate(str(tmp_path), seed=3, n_entities=80, repo_root=str(tmp_path))
    train = [json.loads(l) for l in open(tmp_path / "lora_identity.jsonl", encoding="utf-8")]
    seen = {W.normalize_wording(r["conversations"][0]["content"]) for r in train}
    unseen = [json.loads(l) for l in open(tmp_path / "eval_lora.jsonl", encoding="utf-8")]
    unseen = [r for r in unseen if r["kind"] == "unseen_wording"]
    assert len(unseen) >= 40
    assert not {W.normalize_wording(r["prompt"]) for r in unseen} & seen
    assert W.normalize_wording("你好，你是谁？") == W.normalize_wording("你是谁") == "你是谁"


# ----------------------------------------------------------------------------- packing

def test_packing_keeps_documents_whole_and_loses_no_token(tmp_path):
    from transformers import AutoTokenizer
    from model.dataset import PackedPretrainDataset, PretrainDataset, collate_pad
    tok = AutoTokenizer.from_pretrained("model/minimind_tokenizer")
    rng = random.Random(0)
    texts = ["长江很长。" * rng.randint(1, 12) for _ in range(60)] + ["".join(map(chr, range(0x4e00, 0x4ec8)))]  # cut
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    packed, plain = PackedPretrainDataset(path, tok, 64), PretrainDataset(path, tok, 64)
    assert len(packed) < len(plain)
    seen = []
    for i in range(len(packed)):  # each row is its documents, whole, one after another
        expected = [t for d in packed.documents(i) for t in plain[d]["input_ids"].tolist()]
        assert packed[i]["input_ids"].tolist() == expected
        seen += packed.documents(i)
    assert sorted(seen) == list(range(len(plain)))  # every document exactly once: nothing lost
    real = sum(len(packed[i]["input_ids"]) for i in range(len(packed)))
    assert real / (64 * len(packed)) > 0.9  # and the rows are nearly full
    bos, eos = tok.convert_tokens_to_ids(["<s>", "</s>"])
    for i in range(len(packed)):
        row = packed[i]
        assert len(row["input_ids"]) <= 64
        assert torch.equal(row["labels"], row["input_ids"])
        ids = row["input_ids"].tolist()
        assert ids[0] == bos and ids.count(bos) == len(packed.documents(i))  # rows start at a document
        cut = len(tok.encode(texts[packed.documents(i)[-1]], add_special_tokens=False)) + 2 > 64
        assert ids[-1] == eos or cut  # and end at one, unless the document was longer than a row
    batch = collate_pad([packed[0], packed[1]])
    assert batch["labels"][batch["input_ids"] == 0].eq(-100).all()  # padding carries no loss
    again = PackedPretrainDataset(path, tok, 64)  # from the token cache: the same rows
    assert [again.documents(i) for i in range(len(again))] == [packed.documents(i) for i in range(len(packed))]
    assert (tmp_path / "docs.jsonl.tok").exists()


# ----------------------------------------------------------------------------- loops and the chain

def test_loop_detector_counts_an_ngram_three_times():
    assert M.loops([1, 2, 3, 4] * 3)
    assert not M.loops([1, 2, 3, 4] * 2 + [5])
    assert M.loops([9, 1, 2, 3, 4, 7, 1, 2, 3, 4, 8, 1, 2, 3, 4])  # not adjacent, still a loop
    assert not M.loops(list(range(100)))
    assert not M.loops([5, 5, 5, 5, 6])  # the same 4 tokens overlap twice only


def test_report_judges_upper_bounds_and_cross_stage_comparisons():
    from model.demo.report import judge, TARGETS
    stages = {}
    for stage, key, target, versus in TARGETS:
        stages.setdefault(stage, {})[key] = abs(target) if target > 0 else 0.0
        for ref, _ in versus:
            ref_stage, ref_key = ref.split(".") if "." in ref else (stage, ref)
            stages.setdefault(ref_stage, {}).setdefault(ref_key, 0.0)
    stages["sft"]["heldout_accuracy"] = 0.9  # the final model must keep SFT's effect within 0.05
    stages["final"]["heldout_accuracy"] = 0.8
    stages["final"]["loop_rate"] = 0.06
    stages["pretrain"]["fact_baseline"] = 0.6  # 0.9 is not 0.40 above it
    verdicts = {label: met for label, _, _, _, met in judge(stages)}
    assert not verdicts["final.heldout_accuracy"] and not verdicts["final.loop_rate"]
    assert not verdicts["pretrain.fact_accuracy"]
    assert verdicts["lora.leak_rate"] and verdicts["sft.heldout_accuracy"] and verdicts["final.identity"]


def test_the_demo_trains_one_chain_and_hands_over_its_end():
    """Each training stage starts from the weights the stage before wrote; the final model is the last one's."""
    from pathlib import Path

    import demo
    from model.checkpoint import weights_name
    from model.LMConfig import LMConfig
    args = demo.parse_args([])
    files = {role: Path(f"data/{role}") for role in ("pretrain", "sft_single", "sft_multi", "lora", "dpo", "sft_tools",
                                                     "grpo")}
    name = lambda prefix: weights_name(prefix, LMConfig(dim=args.dim, n_layers=args.n_layers))
    chain = demo.training_chain(args, Path("out"), files, Path("tok"), 2000, name)
    assert [stage for stage, _, _ in chain] == ["pretrain", "sft", "sft_multi", "lora", "dpo", "grpo"]
    with_tools = demo.training_chain(demo.parse_args(["--tools_stage"]), Path("out"), files, Path("tok"), 2000, name)
    assert [stage for stage, _, _ in with_tools] == ["pretrain", "sft", "sft_multi", "lora", "dpo", "tools", "grpo"]
    for (_, _, before), (stage, cmd, _) in [*zip(chain, chain[1:]), *zip(with_tools, with_tools[1:])]:
        assert cmd[cmd.index("--init") + 1] == before, stage
    lora = next(cmd for stage, cmd, _ in chain if stage == "lora")
    assert "--merge" in lora  # the merged LoRA model, not a side branch, is what DPO starts from
    assert chain[-1][2].name == "grpo_128.pth"
