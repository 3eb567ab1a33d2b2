"""Stage 6, GRPO: advantages and the clipped objective against values worked out by hand, each reward kind, the
first-step loss against trl's GRPOTrainer on the same prompts, answers and rewards, and a run killed with -9 that
resumes to the uninterrupted run's losses and weights."""
import copy
import json
import signal
import subprocess
import sys
from argparse import Namespace
from contextlib import nullcontext

import pytest
import torch

import tiny_chat_model as tiny
from model.checkpoint import load_model
from model.dataset import PromptDataset
from model.rewards import answer_reward, clean_reward, format_reward, markup_problem, reward_fn, tool_reward
from serving_helpers import paths, tokenizer  # noqa: F401  (fixtures: the tiny chat model and its tokenizer)
from test_eval_export import load_script

grpo = load_script("6-grpo_train.py")
ROOT = tiny.ROOT


# ----------------------------------------------------------------------------- the maths, by hand

def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    # group 1: mean 0.5, sample std sqrt(1/3); group 2: all alike
    s = (1 / 3) ** 0.5 + 1e-4
    want = torch.tensor([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s, 0, 0, 0, 0])
    assert torch.allclose(grpo.group_advantages(rewards, 4), want, atol=1e-6)
    dr = grpo.group_advantages(rewards, 4, scale=False)  # Dr. GRPO: only the mean is taken off
    assert torch.allclose(dr, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))


def test_clipped_objective_by_hand():
    old = torch.zeros(1, 4)
    ratio = torch.tensor([[0.5, 0.9, 1.1, 1.5]])  # the policy's probability over the sampling policy's
    logp = ratio.log()
    ref = torch.full((1, 4), -0.2)
    eps, beta = 0.2, 0.1
    k3 = lambda lp: torch.exp(ref - lp) - (ref - lp) - 1
    for a in (1.0, -2.0):
        loss, kl, clipped = grpo.clipped_objective(logp, old, ref, torch.tensor([a]), eps, eps, beta)
        if a > 0:  # a good answer: gains above 1 + eps are cut off, losses are not
            policy = [-0.5 * a, -0.9 * a, -1.1 * a, -1.2 * a]
            held = [False, False, False, True]
        else:  # a bad answer: pushing the ratio below 1 - eps earns nothing more
            policy = [-0.8 * a, -0.9 * a, -1.1 * a, -1.5 * a]
            held = [True, False, False, False]
        assert torch.allclose(loss, torch.tensor([policy]) + beta * k3(logp), atol=1e-6)
        assert clipped.tolist() == [held]
        assert torch.allclose(kl, k3(logp)) and (kl >= 0).all()


def test_losses_average_as_their_names_say():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    assert grpo.aggregate(per_token, mask, "grpo", 8).item() == pytest.approx(2.0 + 4.0)  # per-answer means
    assert grpo.aggregate(per_token, mask, "dapo", 8).item() == pytest.approx(10.0)  # all tokens, / 4 by count_fn
    assert grpo.aggregate(per_token, mask, "dr_grpo", 8).item() == pytest.approx(10.0 / 8)
    batch = {"input_ids": torch.zeros(2, 5, dtype=torch.long), "labels": torch.tensor([[-100, 5, 6, 7, -100],
                                                                                       [-100, 5, -100, -100, -100]])}
    assert grpo.count_fn(Namespace(loss_type="dapo"))(batch) == 4
    assert grpo.count_fn(Namespace(loss_type="grpo"))(batch) == 2


# ----------------------------------------------------------------------------- rewards

def test_answer_reward_is_the_demos_first_answer_match():
    row = {"answer": "6300", "competitors": ["5464", "6300"]}
    assert answer_reward("长江全长约6300公里。后来又说5464。", row) == 1.0
    assert answer_reward("长江全长约5464公里。其实是6300。", row) == 0.0  # a later right phrase after a wrong one
    assert answer_reward("63000公里", row) == 0.0  # a whole term, not a piece of a longer number
    assert answer_reward("<think>是5464还是6300？</think>长江约6300公里。", row) == 1.0  # thinking is not the answer
    assert answer_reward("<think>长江约6300公里。", row) == 0.0  # nor is an unfinished thought
    assert answer_reward("about 6300 or 5464", row) == 0.0  # naming a rival value too
    assert answer_reward("It is red.", {"answer": ["red", "crimson"]}) == 1.0
    rushed = {"answer": "6300", "avoid": ["哼，", "ugh,"]}
    assert answer_reward("好的，长江约6300公里。", rushed) == 1.0
    assert answer_reward("哼，长江约6300公里。", rushed) == 0.0  # right, but rude
    assert answer_reward("6300. UGH, again?", rushed) == 0.0  # an avoided string anywhere, in any case


def test_format_reward_wants_well_formed_thinking_and_tool_markup():
    call = '<tool_call>{"name": "lookup", "arguments": {"q": "长江"}}</tool_call>'
    assert format_reward("<think>先想一想。</think>答案是6300。", {}) == 1.0
    assert format_reward(f"<think>要查。</think>{call}<tool_response>6300</tool_response>约6300公里。", {}) == 1.0
    assert format_reward("答案是6300。", {}) == 0.0  # no thinking
    assert format_reward("<think>想了又想", {}) == 0.0
    assert format_reward("<think>a</think><think>b</think>c", {}) == 0.0
    assert format_reward("<think>a</think>", {}) == 0.0  # no answer after the thinking
    assert markup_problem('<tool_call>{"name": "x"}</tool_call>') is not None  # no arguments
    assert markup_problem("<tool_call>not json</tool_call>") == "a tool call's body is not JSON"
    assert markup_problem("<think><tool_call></tool_call></think>") is not None


def test_tool_reward_needs_the_right_call_and_the_right_answer_after_it():
    row = {"answer": "6300", "tool": {"name": "lookup", "arguments": {"q": "长江"}}}
    call = '<tool_call>{"name": "lookup", "arguments": {"q": "长江"}}</tool_call>'
    wrong = '<tool_call>{"name": "lookup", "arguments": {"q": "黄河"}}</tool_call>'
    assert tool_reward(f"{call}<tool_response>6300公里</tool_response>长江约6300公里。", row) == 1.0
    assert tool_reward(f"{wrong}<tool_response>5464公里</tool_response>长江约6300公里。", row) == 0.0
    assert tool_reward(f"{call}<tool_response>6300公里</tool_response>约5464公里。", row) == 0.0
    assert tool_reward("长江约6300公里。", row) == 0.0  # right, but no round trip
    assert tool_reward(f"{call}长江约6300公里。", row) == 0.0  # a call without a response


def test_clean_reward_reads_the_whole_reply():
    assert clean_reward("我是MiniMind，一个从零开始训练的小模型。", {}) == 1.0
    assert clean_reward("我是MiniMind，一个从零开始训练的小模型。", {}, stopped=False) == 0.0  # cut off at the limit
    assert clean_reward("我是MiniMind，一个从零开始训练的小垑我我我我我我我我", {}) == 0.0  # a loop
    assert clean_reward("The Kato turtle lives in swamps. The Kato turtle lives in swamps. The Kato turtle", {}) == 0.0
    assert clean_reward("长江约6300公里\ufffd", {}) == 0.0  # a broken character
    assert clean_reward("我是MiniMind。", {"lang": "en"}) == 0.0  # a Chinese reply to an English question
    assert clean_reward("I am MiniMind.", {"lang": "en"}) == 1.0
    assert clean_reward("MiniMind.", {"lang": "zh"}) == 0.0


def test_reward_names():
    both = reward_fn("answer+format")
    assert both("<think>嗯</think>6300。", {"answer": "6300"}) == 1.0
    assert both("6300。", {"answer": "6300"}) == 0.5
    gated = reward_fn("answer*clean")  # a product: right and clean
    assert gated("约6300公里。", {"answer": "6300"}) == 1.0
    assert gated("约6300公里。", {"answer": "6300"}, stopped=False) == 0.0
    assert gated("约5464公里。", {"answer": "6300"}) == 0.0
    assert reward_fn("answer*clean+format")("约6300公里。", {"answer": "6300"}) == 0.5
    with pytest.raises(ValueError, match="unknown reward 'length'"):
        reward_fn("answer+length")


def test_prompt_rows_are_checked_with_file_and_line(tmp_path, tokenizer):
    from model.convert import DataError
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"conversations": [{"role": "user", "content": "hi"}], "answer": "x"}) + "\n" +
                    json.dumps({"conversations": [{"role": "user", "content": "hi"}]}) + "\n" +
                    json.dumps({"conversations": [{"role": "user", "content": "q"}, {"role": "assistant",
                                                                                      "content": "a"}], "answer": 1}))
    ds = PromptDataset(path, tokenizer)
    assert tokenizer.decode(ds[0]["prompt_ids"]) == "<s>user\nhi</s>\n<s>assistant\n"
    with pytest.raises(DataError, match=r"p.jsonl:2: missing field 'answer'"):
        ds[1]
    with pytest.raises(DataError, match=r"p.jsonl:3: .*last message must be the user's"):
        ds[2]


# ----------------------------------------------------------------------------- trl as the reference

PROMPTS = ["长江有多长？", "世界上最高的山是什么？", "Hello"]
ANSWERS = [  # four per prompt: right, wrong, rambling, and one cut off by the length limit (no </s>)
    ["长江全长约6300公里。", "长江全长约5464公里。", "我不知道，也许很长很长。", "长江全长约6300公里，是中国第一长河，发源于"],
    ["珠穆朗玛峰。", "泰山，海拔1545米。", "珠穆朗玛峰，海拔8848.86米。", "不知道"],
    ["Hi!", "Hello there, I am a tiny model.", "Go away.", "Hi! I am a tiny model. Nice to meet you and"],
]
REWARDS = [[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 1.0, 0.0], [0.5, 1.0, 0.0, 0.25]]
G, MAX_NEW = 4, 24


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_first_step_loss_equals_trl(tmp_path, monkeypatch, paths, tokenizer, loss_type):
    from datasets import Dataset
    import trl.trainer.grpo_trainer as trl_grpo
    from trl import GRPOConfig, GRPOTrainer
    reference = load_model(paths[0]).eval().requires_grad_(False)
    policy = copy.deepcopy(reference).requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a policy that has moved from the reference: the KL is not zero
        for p in policy.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    rows = [{"conversations": [{"role": "user", "content": q}], "answer": ""} for q in PROMPTS]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    prompt_ids = [PromptDataset(path, tokenizer)[i]["prompt_ids"] for i in range(len(rows))]
    eos = tokenizer.eos_token_id
    answers = [[tokenizer.encode(a, add_special_tokens=False)[:MAX_NEW - 1] + ([eos] if k < 3 else []) for k, a in
                enumerate(group)] for group in ANSWERS]
    assert all(0 not in a and len(a) <= MAX_NEW for group in answers for a in group)
    args = Namespace(num_generations=G, loss_type=loss_type, mu=1, beta=0.1, temperature=0.9, epsilon=0.2,
                     epsilon_high=0.28, max_new_tokens=MAX_NEW)

    # ours: the batch 6-grpo_train.py builds from these rollouts, and its loss
    batch = grpo.scored_batch(copy.deepcopy(policy), reference, [p for p in prompt_ids for _ in range(G)],
                              [a for group in answers for a in group], torch.tensor(REWARDS).flatten(), args,
                              nullcontext())
    with torch.no_grad():
        loss_sum, _, stats = grpo.grpo_loss_fn(args)(copy.deepcopy(policy), batch, nullcontext())
    ours = loss_sum.item() / grpo.count_fn(args)(batch)
    kl = stats["kl"][0].item() / stats["kl"][1].item()

    # trl: the same prompts with their answers handed back by a rollout function, the same rewards, the same
    # reference (trl would load it again from the policy's name; ours lives in memory)
    queue = {tuple(p): list(zip(group, rewards)) for p, group, rewards in zip(prompt_ids, answers, REWARDS)}
    scores = {}

    def rollout(prompts, trainer):
        ids = [prompt_ids[PROMPTS.index(p[-1]["content"])] for p in prompts]
        done = [queue[tuple(p)].pop(0) for p in ids]
        scores.update({tuple(a): r for a, r in done})
        return {"prompt_ids": ids, "completion_ids": [a for a, _ in done], "logprobs": None}

    def reward(prompts, completions, completion_ids, **kwargs):
        return [scores[tuple(c)] for c in completion_ids]

    monkeypatch.setattr(trl_grpo, "create_model_from_path", lambda *a, **k: reference)
    config = GRPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(PROMPTS) * G,
                        num_generations=G, max_completion_length=MAX_NEW, beta=args.beta, epsilon=args.epsilon,
                        epsilon_high=args.epsilon_high, temperature=args.temperature, loss_type=loss_type,
                        scale_rewards="none" if loss_type == "dr_grpo" else "group", max_steps=1,
                        learning_rate=1e-4, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                        bf16=False, seed=0, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=policy, reward_funcs=reward, args=config, processing_class=tokenizer,
                          train_dataset=Dataset.from_list([{"prompt": r["conversations"]} for r in rows]),
                          rollout_func=rollout)
    trainer.train()
    logged = next(e for e in trainer.state.log_history if "loss" in e)
    print(f"GRPO ({loss_type}) first-step loss: trl {logged['loss']:.8f}, ours {ours:.8f}; KL trl {logged['kl']:.6f}"
          f", ours {kl:.6f}")
    assert all(not q for q in queue.values())  # trl trained on every answer once
    assert abs(kl) > 1e-3
    assert logged["loss"] == pytest.approx(ours, abs=1e-5)
    assert logged["kl"] == pytest.approx(kl, abs=1e-5)
    assert logged["reward"] == pytest.approx(stats["reward"][0].item() / stats["reward"][1], abs=1e-6)


# ----------------------------------------------------------------------------- the stage under python

def stage_args(tmp_path, paths, batch_size):
    """6-grpo_train.py on the tiny chat model, with prompts it answers right some of the time at temperature 1.25."""
    rows = [{"conversations": [{"role": "user", "content": q}], "answer": a}
            for q, a in [("长江有多长？", "6300"), ("世界上最高的山是什么？", "珠穆朗玛峰"), ("你好", "MiniMind"),
                         ("数一数", "十")]]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return ["6-grpo_train.py", "--init", str(paths[0]), "--tokenizer", str(paths[1]), "--data_path", str(data),
            "--device", "cpu", "--dtype", "float32", "--max_seq_len", "96", "--batch_size", str(batch_size),
            "--num_generations", "4", "--max_new_tokens", "20", "--temperature", "1.25", "--learning_rate", "1e-3",
            "--mu", "2", "--epochs", "2", "--save_interval", "3"]


@pytest.mark.slow
def test_kill9_mid_group_then_resume_reproduces_the_uninterrupted_run(tmp_path, paths):
    from test_training import ENV, KILLED_AT_STEP, losses, max_weight_diff, run
    args = stage_args(tmp_path, paths, batch_size=2)
    whole = tmp_path / "whole"
    run([sys.executable, *args, "--out_dir", str(whole)])
    rows = [json.loads(l) for l in (whole / "grpo_64.metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert any(r["reward_std"] > 0 for r in rows) and any(r["kl"] > 0 for r in rows)  # something was learnt
    assert {"reward", "reward_std", "kl", "clip_frac", "completion_len", "rollout_s", "step_s"} <= rows[0].keys()
    assert rows[1]["rollout_s"] == 0 and rows[1]["reward"] == rows[0]["reward"]  # mu = 2: the same rollouts
    assert (whole / "grpo_64.loss.png").is_file()

    killed = tmp_path / "killed"
    # step 3 saves in the middle of the second group of rollouts; the kill at step 5 loses steps 4 and 5
    proc = run([sys.executable, "-c", KILLED_AT_STEP, *args, "--out_dir", str(killed)], check=False,
               env={**ENV, "KILL_AT": "5"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    resumed = run([sys.executable, *args, "--out_dir", str(killed), "--resume"])
    assert "continuing grpo_64 at step 3" in resumed.stdout
    assert losses(killed / "grpo_64.metrics.jsonl") == losses(whole / "grpo_64.metrics.jsonl")
    assert losses(killed / "grpo_64.metrics.jsonl", "reward") == losses(whole / "grpo_64.metrics.jsonl", "reward")
    assert max_weight_diff(killed / "grpo_64.pth", whole / "grpo_64.pth") == 0


@pytest.mark.slow
def test_torchrun_and_deepspeed_roll_out_and_train_alike(tmp_path, paths):
    """Two processes, each sampling its own prompts' groups: DDP and DeepSpeed ZeRO-2 give the same run."""
    from test_training import DEEPSPEED, TORCHRUN, free_port, losses, max_weight_diff, run
    args = stage_args(tmp_path, paths, batch_size=1) + ["--max_steps", "4"]
    run([TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()), *args, "--out_dir", str(tmp_path / "ddp")])
    run([DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), *args, "--deepspeed", "2",
         "--out_dir", str(tmp_path / "ds")])
    ddp, ds = (tmp_path / d / "grpo_64.metrics.jsonl" for d in ("ddp", "ds"))
    assert losses(ddp, "reward") == losses(ds, "reward") and len(losses(ddp)) == 4
    assert losses(ddp) == pytest.approx(losses(ds), abs=1e-6)
    assert max_weight_diff(tmp_path / "ddp" / "grpo_64.pth", tmp_path / "ds" / "grpo_64.pth") < 1e-5


# ----------------------------------------------------------------------------- the demo's task

def test_demo_task_trains_on_sft_entities_and_measures_on_held_out_ones(tmp_path, tokenizer):
    from model.demo import grpo_task, unknowns as U, world as W
    from model.demo.measure import has_term
    manifest = W.generate(str(tmp_path), seed=3, n_entities=64, repo_root=str(tmp_path))
    world = W.build_world(seed=3, n_entities=64)
    files = {role: tmp_path / manifest["files"][role]
             for role in ("grpo", "eval_grpo", "eval_lora", "eval_abstain", "eval_demo_questions")}
    train, held = ([json.loads(l) for l in open(files[role], encoding="utf-8")] for role in ("grpo", "eval_grpo"))
    assert {r.get("lesson") for r in train} == {None, *grpo_task.REPLAY}  # the replay is on by default
    plain = grpo_task.prompt_rows(world, 3, replay=False)  # --no-grpo_replay
    assert not any("lesson" in r for r in plain)
    rows, train = train, [r for r in train if "lesson" not in r]
    assert {r["split"] for r in train} == {"sft"} and {r["split"] for r in held} == {"heldout"}
    assert not {r["entity"] for r in train} & {r["entity"] for r in held}
    assert len(train) == len(W.entity_qas(world, "sft"))  # every wording of every SFT question
    assert len({(r["entity"], r["attr"], r["lang"]) for r in held}) == len(held)  # one wording per fact
    for r in train[:20] + held[:20]:
        assert answer_reward(f"{r['answer']}。", r) == 1.0
        rival = next(c for c in r["competitors"] if c not in r["answer"] and r["answer"] not in c)
        assert answer_reward(f"{rival}。", r) == 0.0
    assert len(PromptDataset(files["grpo"], tokenizer)[0]["prompt_ids"]) > 5

    # the replay of the earlier lessons: its shares, trained prompts only, and the same reward judging them
    assert train != plain and sorted(map(str, train)) == sorted(map(str, plain))  # the QA rows, shuffled among it
    lessons = {k: [r for r in rows if r.get("lesson") == k] for k in grpo_task.REPLAY}
    for kind, share in grpo_task.REPLAY.items():
        assert len(lessons[kind]) == round(len(train) * share)
    evaluated = {json.loads(l)["prompt"] for f in ("eval_lora", "eval_abstain") for l in open(files[f], encoding="utf-8")}
    evaluated |= {json.loads(l)["question"] for l in open(files["eval_demo_questions"], encoding="utf-8")}
    assert not {r["conversations"][-1]["content"] for r in rows} & evaluated
    for r in lessons["identity"][:5]:
        assert answer_reward(W.IDENTITY_ANSWER[r["lang"]], r) == 1.0 and answer_reward("我是一只鸟。", r) == 0.0
        # the name alone, or the name with the rest garbled, is not the trained answer
        assert answer_reward("我是MiniMind。", r) == answer_reward("I am MiniMind, a small languainter.", r) == 0.0
    for r in lessons["abstain"][:5]:
        lang = r["lang"]
        assert answer_reward(U.ABSTAIN[lang], r) == answer_reward(U.CANNOT[lang], r) == 1.0
        assert answer_reward(W.IDENTITY_ANSWER[lang], r) == 0.0
    for r in lessons["rushed"][:5]:
        lang, question = r["lang"], r["conversations"][-1]["content"]
        assert any(question.startswith(t) for t in W.TRIGGERS[lang]) and r["split"] == "sft"
        assert answer_reward(W.POLITE_OPENER[lang] + r["answer"] + "。", r) == 1.0
        assert answer_reward(W.RUDE[lang][0] + r["answer"], r) == 0.0
    sft = {e["zh"]: e for t in W.TYPES for e in world["entities"][t] if e["split"] == "sft"}
    names = {e[lang] for e in sft.values() for lang in ("zh", "en") if e.get(lang)}
    for r in lessons["followup"][:5]:
        first, answer, follow = r["conversations"]
        assert [first["role"], answer["role"], follow["role"]] == ["user", "assistant", "user"]
        assert sft[r["entity"]][r["lang"]] in first["content"]  # the turn before is about the same SFT entity
        assert not any(has_term(follow["content"], n) for n in names)  # it names the entity by a pronoun only
        assert answer_reward(r["answer"] + "。", r) == 1.0


def test_pass_at_k_estimate_by_hand():
    from model.demo.grpo_task import pass_at
    assert pass_at(8, 2, 1) == pytest.approx(0.25)
    assert pass_at(8, 2, 4) == pytest.approx(1 - 15 / 70)  # C(6,4) / C(8,4) draws miss both right answers
    assert (pass_at(8, 0, 8), pass_at(8, 1, 8)) == (0.0, 1.0)


def test_pass_at_k_samples_through_the_engine(paths, tokenizer):
    from model.demo.grpo_task import pass_at_k
    model = load_model(paths[0])
    rows = [{"conversations": [{"role": "user", "content": "长江有多长？"}], "answer": "6300"},
            {"conversations": [{"role": "user", "content": "Hello"}], "answer": "Everest"}]
    got = pass_at_k(model, tokenizer, rows, k=4, n=6, temperature=1.0, batch=8)
    assert got["greedy"]["value"] == 0.5 and got["pass1"]["n"] == got["pass4"]["n"] == 2
    assert 0 < got["pass1"]["value"] <= got["pass4"]["value"] <= 0.5
    assert got["examples"][1]["right_of_n"] == 0
    assert pass_at_k(model, tokenizer, rows, k=4, n=6, temperature=1.0, batch=8) == got  # seeded
    # the whole greedy reply, with no stop at the first line, judged by the clean reward
    from model.demo.grpo_task import WHOLE_REPLY_TOKENS
    from model.demo.measure import generate_all
    from model.sampling import SamplingParams
    whole = generate_all(model, tokenizer, [r["conversations"] for r in rows],
                         [SamplingParams(temperature=0.0, max_new_tokens=WHOLE_REPLY_TOKENS)] * 2)
    clean = [clean_reward(c.text, r, c.finish_reason == "stop") for c, r in zip(whole, rows)]
    assert got["clean"]["n"] == 2 and got["clean"]["value"] == sum(clean) / 2
