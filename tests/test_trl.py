"""trl as an independent reference for our DPO and SFT losses: its DPOTrainer and SFTTrainer run on our model
(with activation checkpointing, trl's default; fp32) and their first-batch losses equal ours on the same batch."""
import copy
import json
import math
from contextlib import nullcontext

import pytest
import torch
from datasets import Dataset

import tiny_chat_model as tiny
from model import batching
from model.checkpoint import load_model
from model.chat_format import chat_template, render as render_chat
from model.dataset import DPODataset, SFTDataset, collate_pad
from test_eval_export import load_script
from serving_helpers import paths, tokenizer  # noqa: F401  (fixtures: the tiny chat model and its tokenizer)

# demo-like preference pairs: a polite correct answer against a rude one or a wrong fact; one multi-turn prompt
PAIRS = [
    ([{"role": "user", "content": "长江有多长？"}], "长江全长约6300公里，是中国第一长河。", "自己查去。"),
    ([{"role": "user", "content": "世界上最高的山是什么？"}], "珠穆朗玛峰，海拔8848.86米。", "泰山，海拔1545米。"),
    ([{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！我是MiniMind。"},
      {"role": "user", "content": "数一数"}], "一二三四五。", "不想数。"),
    ([{"role": "user", "content": "Hello"}], "Hi! Nice to meet you.", "Go away."),
]
CONVERSATIONS = [
    [{"role": "system", "content": "你是一个乐于助人的助手。"}, {"role": "user", "content": "长江有多长？"},
     {"role": "assistant", "content": "长江全长约6300公里。"}, {"role": "user", "content": "泰山呢？"},
     {"role": "assistant", "content": "泰山海拔1545米。😀"}],
] + [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in tiny.CONVERSATIONS[:3]]

# our template with trl's {% generation %} markers around what our SFT trains: each answer and its </s>
TAGGED_TEMPLATE = chat_template(generation_tags=True)


@pytest.fixture()
def reference_and_policy(paths):
    """The trained tiny chat model as reference, and a perturbed copy as policy: their log-ratios are not zero,
    so the DPO loss is not the log 2 it is when policy and reference are one model."""
    reference = load_model(paths[0]).eval().requires_grad_(False)
    policy = copy.deepcopy(reference).requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return reference, policy


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def config(cls, tmp_path, n, **extra):
    """One step over one batch of n, in fp32 as our stage scripts run on a CPU without bf16 units (trl's default
    is bf16 autocast, which accelerate applies to the reference model's forward too)."""
    return cls(output_dir=str(tmp_path / "trl_out"), per_device_train_batch_size=n, max_steps=1, learning_rate=1e-4,
               logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
               dataloader_num_workers=0, seed=0, **extra)


def first_loss(trainer):
    trainer.train()
    return next(entry for entry in trainer.state.log_history if "loss" in entry)


def scored(ids, target):
    """(token ids up to the last target, target flags): all that a sequence's log-probability depends on (ours
    also has the template's "\n" after the last </s>, an input no target sees)."""
    end = int(target.nonzero().max()) + 1
    return ids[:end].tolist(), target[:end].tolist()


def test_trl_dpo_loss_equals_ours(tmp_path, tokenizer, reference_and_policy):
    from trl import DPOConfig, DPOTrainer
    reference, policy = reference_and_policy
    beta, n = 0.1, len(PAIRS)
    # our side: 5-dpo_train.py's loss on the DPODataset batch 5-dpo_train.py would build
    rows = [{"chosen": p + [{"role": "assistant", "content": c}], "rejected": p + [{"role": "assistant", "content": r}]}
            for p, c, r in PAIRS]
    ours_batch = collate_pad([DPODataset(jsonl(tmp_path / "dpo.jsonl", rows), tokenizer)[i] for i in range(n)])
    dpo_loss_fn = load_script("5-dpo_train.py").dpo_loss_fn
    with torch.no_grad():
        loss_sum, _, stats = dpo_loss_fn(reference, beta)(copy.deepcopy(policy), ours_batch, nullcontext())
    ours = loss_sum.item() / n
    assert abs(ours - math.log(2)) > 1e-3  # policy and reference really differ

    # trl's side, from the prompt text and the answers (trl appends the </s> itself)
    data = Dataset.from_list([{"prompt": render_chat(p), "chosen": c, "rejected": r} for p, c, r in PAIRS])
    trainer = DPOTrainer(model=policy, ref_model=reference, args=config(DPOConfig, tmp_path, n, beta=beta),
                         train_dataset=data, processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))  # chosen rows then rejected rows, in trl's shuffled order
    sides = ("chosen", "rejected")
    ours_rows = [scored(ids, labels != -100) for s in sides
                 for ids, labels in zip(ours_batch[f"{s}_input_ids"], ours_batch[f"{s}_labels"])]
    theirs_rows = [scored(ids, mask.bool()) for ids, mask in zip(batch["input_ids"], batch["completion_mask"])]
    assert sorted(theirs_rows) == sorted(ours_rows)  # the same tokens, and the same of them carry the loss

    before = policy.tok_embeddings.weight.detach().clone()
    logged = first_loss(trainer)
    print(f"DPO first-batch loss: trl {logged['loss']:.8f}, ours {ours:.8f}, |difference| "
          f"{abs(logged['loss'] - ours):.2e}")
    assert abs(logged["loss"] - ours) <= 1e-5
    assert abs(logged["rewards/margins"] - stats["margin"].item() / n) <= 1e-5
    assert not torch.equal(before, policy.tok_embeddings.weight)  # trl took its optimizer step on our model


def test_trl_conversational_dpo_also_trains_the_newline(tokenizer):
    """From chat messages trl cuts the completion after the prompt's assistant header, so it also scores the
    "\\n" our template puts after </s>; ours scores the answer and </s> only (generation stops at </s>)."""
    from trl.trainer.dpo_trainer import _tokenize
    prompt, chosen, _ = PAIRS[0]
    full = _tokenize(tokenizer, prompt + [{"role": "assistant", "content": chosen}])["input_ids"]
    head = _tokenize(tokenizer, prompt, add_generation_prompt=True)["input_ids"]
    assert full[:len(head)] == head
    ours = tokenizer.encode(chosen, add_special_tokens=False) + [tokenizer.eos_token_id]
    assert full[len(head):] == ours + tokenizer.encode("\n", add_special_tokens=False)


def test_trl_sft_assistant_mask_and_loss_equal_ours(tmp_path, paths, tokenizer):
    from trl import SFTConfig, SFTTrainer
    from trl.chat_template_utils import is_chat_template_stop_token_trained
    tagged = copy.deepcopy(tokenizer)
    tagged.chat_template = TAGGED_TEMPLATE
    for conv in CONVERSATIONS:  # only the markers differ from the shipped template
        assert tagged.apply_chat_template(conv, tokenize=False) == tokenizer.apply_chat_template(conv, tokenize=False)
    assert is_chat_template_stop_token_trained(tagged)  # trl's own check: </s> is inside the assistant mask

    dataset = SFTDataset(jsonl(tmp_path / "sft.jsonl", [{"conversations": c} for c in CONVERSATIONS]), tokenizer)
    model = load_model(paths[0])
    trainer = SFTTrainer(model=model, args=config(SFTConfig, tmp_path, len(CONVERSATIONS), assistant_only_loss=True),
                         train_dataset=Dataset.from_list([{"messages": c} for c in CONVERSATIONS]),
                         processing_class=tagged)
    for i in range(len(CONVERSATIONS)):
        row, ours = trainer.train_dataset[i], dataset[i]
        assert row["input_ids"] == ours["input_ids"].tolist()
        assert row["labels"] == ours["labels"].tolist()  # trl folds its assistant mask into labels (-100 elsewhere)

    ours_batch = collate_pad([dataset[i] for i in range(len(CONVERSATIONS))])
    with torch.no_grad():
        loss_sum, _, _ = batching.token_loss(copy.deepcopy(model).eval(), ours_batch, nullcontext())
    ours_loss = loss_sum.item() / batching.token_count(ours_batch)
    logged = first_loss(trainer)
    print(f"SFT first-batch loss: trl {logged['loss']:.8f}, ours {ours_loss:.8f}, |difference| "
          f"{abs(logged['loss'] - ours_loss):.2e}")
    assert abs(logged["loss"] - ours_loss) <= 1e-5
