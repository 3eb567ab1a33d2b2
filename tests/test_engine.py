"""The generation engine: the static cache and batching against the plain model, prefill groups, sampling rules,
UTF-8-safe streaming text and stop strings, and the scheduler thread."""
from types import SimpleNamespace

import pytest
import torch

from model.checkpoint import load_model
from model.engine import Engine, Request
from model.sampling import SamplingParams, TextStream, sample_token
from model.scheduler import Scheduler
from serving_helpers import HELLO, engine, paths, questions, tokenizer, wait_until  # noqa: F401


def plain_greedy(model, ids, n, eos):
    """Greedy decoding by re-running the whole sequence each step: no cache at all."""
    ids, out = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            out.append(token)
            if token == eos:
                break
            ids.append(token)
    return out


def test_static_cache_matches_plain_forward(engine):
    plain_engine = Engine(engine.model, engine.tokenizer, fast=False)  # decode steps through model.forward
    for messages in questions(3):
        done = engine.complete(messages, temperature=0, max_new_tokens=24)
        ids = engine.encode(messages)
        assert done.token_ids == plain_greedy(engine.model, ids, 24, engine.eos_id)
        assert plain_engine.complete(messages, temperature=0, max_new_tokens=24).token_ids == done.token_ids
        assert done.prompt_tokens == len(ids) and done.completion_tokens == len(done.token_ids)
        assert done.finish_reason == ("stop" if done.token_ids[-1] == engine.eos_id else "length")


@pytest.mark.parametrize("use_moe,rows", [(False, 3), (False, 6), (True, 3), (True, 6)])
def test_fast_decoder_logits_equal_model_forward(use_moe, rows):
    """One batched decode step, rows at different positions: the fast decode model (its linear layers swapped)
    against the model itself (below 4 rows and from 4 on, SkinnyLinear multiplies in different layouts)."""
    from model.LMConfig import LMConfig
    from model.model import Transformer
    torch.manual_seed(0)
    model = Transformer(LMConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=300, max_seq_len=64,
                                 use_moe=use_moe)).eval()
    fast = Engine(model, None, max_batch=rows)
    for n in (5, 17, 9, 2, 12, 7)[:rows]:  # prompts of different lengths
        fast.add(fast.prepare(list(range(3, 3 + n)), SamplingParams(temperature=0, max_new_tokens=30,
                                                                      ignore_eos=True)))
    fast.step()
    tokens = torch.tensor([r.last_token for r in fast.active])
    positions = torch.tensor([r.n_cached for r in fast.active])
    window = int(positions.max()) + 1
    with torch.inference_mode():
        got = fast.decode(tokens, positions, window)
        fast.cache.decode(positions, window)  # the same step again, through the model (same cache contents)
        want = model(tokens[:, None], attention_mask=torch.arange(window)[None] <= positions[:, None],
                     position_ids=positions[:, None], cache=fast.cache, logits_to_keep=1).logits[:, -1]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_batched_steps_equal_each_request_alone(engine):
    """Requests join at different steps and leave when done; each one's tokens equal its solo run."""
    prompts = questions(6)
    params = [SamplingParams(temperature=0, max_new_tokens=12 + 5 * i, ignore_eos=i % 2 == 0) for i in range(6)]
    params[3] = SamplingParams(temperature=1.0, top_k=20, seed=11, max_new_tokens=20)  # sampled, seeded
    alone = [engine.complete(p, q).token_ids for p, q in zip(prompts, params)]

    reqs = [engine.prepare(p, q) for p, q in zip(prompts, params)]
    pending, steps = list(reqs), 0
    while pending or engine.active:
        if pending and len(engine.active) < engine.max_batch and steps % 3 == 0:
            engine.add(pending.pop(0))
        engine.step()
        steps += 1
    assert [r.token_ids for r in reqs] == alone
    assert steps < sum(len(a) for a in alone)  # decoding really was shared


def test_cancel_frees_the_slot(engine):
    stream = engine.stream(HELLO, temperature=0, ignore_eos=True)
    next(stream)
    assert len(engine.active) == 1
    stream.close()
    assert engine.active == [] and engine.last.finish_reason == "cancelled"


def test_context_limit_and_left_truncation(paths, tokenizer):
    model = load_model(paths[0])
    model.config.max_seq_len = 48
    small = Engine(model, tokenizer)
    done = small.complete(HELLO, temperature=0, ignore_eos=True)  # max_new_tokens None: until the context is full
    assert done.finish_reason == "length" and done.prompt_tokens + done.completion_tokens == 48
    assert small.complete(HELLO, temperature=0, max_new_tokens=-1, ignore_eos=True).completion_tokens == \
        done.completion_tokens
    long_prompt = list(range(3, 103))  # 100 tokens: more than the context
    cut = small.complete(long_prompt, temperature=0, ignore_eos=True)
    assert cut.truncated == 100 - (48 - 12) and cut.prompt_tokens == 36 and cut.completion_tokens == 12
    cut = small.complete(long_prompt, temperature=0, max_new_tokens=5, ignore_eos=True)
    assert cut.prompt_tokens == 43 and cut.completion_tokens == 5
    # the kept tokens are the newest ones: same answer as giving only those
    assert cut.token_ids == small.complete(long_prompt[-43:], temperature=0, max_new_tokens=5,
                                           ignore_eos=True).token_ids


def test_text_stream_holds_back_partial_utf8_and_stop_strings():
    table = [b"", b"\xe4", b"\xbd", b"\xa0", b"ab", b"S", b"TO", b"P!", b"x", b"\xf0\x9f\x98", b"\x80", b"\xff"]
    s = TextStream(table)
    assert [s.push(i)[0] for i in (1, 2, 3, 4, 9, 10)] == ["", "", "你", "ab", "", "😀"]
    assert s.push(11)[0] == "\ufffd"  # an invalid byte becomes U+FFFD at once, never a broken character
    s = TextStream(table, stop=("STOP",))
    assert [s.push(i) for i in (4, 5, 8)] == [("ab", False), ("", False), ("Sx", False)]  # "S" held, then released
    assert [s.push(i) for i in (5, 6, 7)] == [("", False), ("", False), ("", True)]  # "STOP" across three tokens
    s = TextStream(table, stop=("你",))
    assert [s.push(i) for i in (4, 1, 2, 3)] == [("ab", False), ("", False), ("", False), ("", True)]
    s = TextStream(table)
    s.push(1)
    assert s.flush() == "\ufffd"  # an answer that ends inside a character


def test_sampling_rules():
    logits = torch.tensor([2.0, 1.0, -1.0, 0.5])
    greedy = SamplingParams(temperature=0)
    assert sample_token(logits, greedy) == 0
    seen = torch.tensor([True, False, False, False])
    assert sample_token(logits, SamplingParams(temperature=0, repetition_penalty=4.0), seen=seen) == 1
    g = torch.Generator().manual_seed(0)
    assert {sample_token(logits, SamplingParams(temperature=2.0, top_k=1), g) for _ in range(20)} == {0}
    assert {sample_token(logits, SamplingParams(temperature=2.0, top_p=0.01), g) for _ in range(20)} == {0}
    assert {sample_token(logits, SamplingParams(temperature=2.0, top_k=2), g) for _ in range(200)} == {0, 1}
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)


def test_seeded_sampling_is_reproducible(engine):
    runs = [engine.complete(HELLO, temperature=1.5, seed=s, max_new_tokens=30, ignore_eos=True).token_ids
            for s in (1, 1, 2, 3, 4)]
    assert runs[0] == runs[1]
    assert any(r != runs[0] for r in runs[2:])


def test_prefill_together_equals_prefill_alone(engine):
    """Prompts of different lengths prefilled in one padded forward: the same first-token logits and the same
    greedy answers as each prompt prefilled and decoded alone."""
    prompts = questions(engine.max_batch)
    params = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True)
    alone, first_logits = [], []
    for prompt in prompts:
        req = engine.prepare(prompt, params)
        with torch.inference_mode():
            first_logits.append(engine.model(torch.tensor([req.prompt_ids])).logits[0, -1])
        alone.append(engine.complete(prompt, params).token_ids)
    reqs = [engine.prepare(p, params) for p in prompts]
    assert len({len(r.prompt_ids) for r in reqs}) > 1  # really padded
    logits = {}
    real_accept = engine._accept
    engine._accept = lambda rs, lg: (logits.update(zip([id(r) for r in rs], lg.clone())), real_accept(rs, lg))
    try:
        engine.add_many(reqs)
    finally:
        engine._accept = real_accept
    for r, want in zip(reqs, first_logits):
        torch.testing.assert_close(logits[id(r)], want, rtol=1e-4, atol=1e-5)
    while engine.active:
        engine.step()
    assert [r.token_ids for r in reqs] == alone


def test_prefill_groups_limit_padding():
    owner = SimpleNamespace(device="cpu", vocab_size=8, token_bytes=[b""] * 8)

    def req(n):
        return Request(list(range(n)), SamplingParams(), 0, 1, owner)

    similar = [req(n) for n in (20, 22, 25, 19)]
    assert [len(g) for g in Engine.prefill_groups(similar)] == [4]
    mixed = [req(n) for n in (10, 12, 400, 11, 9)]  # the long prompt would pad the short ones 40x
    assert [[len(r.prompt_ids) for r in g] for g in Engine.prefill_groups(mixed)] == [[10, 12], [400], [11, 9]]
    many = [req(300) for _ in range(16)]  # a group stays within the token budget
    assert [len(g) for g in Engine.prefill_groups(many, budget=4096)] == [13, 3]
    assert Engine.prefill_groups([]) == []


def test_scheduler_stream_and_cancel(engine):
    sched = Scheduler(Engine(engine.model, engine.tokenizer, max_batch=2))
    try:
        expected = engine.complete(HELLO, temperature=0, max_new_tokens=20).text
        assert "".join(sched.stream(HELLO, temperature=0, max_new_tokens=20)) == expected
        stats = sched.stats()  # the engine's busy time, which bench_serve reports per step
        assert stats["steps"] >= 1 and stats["prefill_seconds"] > 0 and stats["decode_seconds"] > 0
        stream = sched.stream(HELLO, temperature=0, ignore_eos=True)
        next(stream)
        stream.close()
        wait_until(lambda: sched.stats()["cancelled"] == 1, "the closed stream is cancelled")
        assert sched.stats()["active"] == 0
    finally:
        sched.close()


# ---------------------------------------------------------------- OpenAI's penalties, logit_bias, message order


def test_openai_penalties_and_logit_bias_follow_the_documented_formula():
    from model.sampling import openai_adjusted
    logits = torch.tensor([1.0, 2.0, 3.0, 0.5])
    counts = torch.tensor([0.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    p = SamplingParams(frequency_penalty=0.5, presence_penalty=1.5, logit_bias={0: 10, 3: -100})
    assert openai_adjusted(logits, p, counts).tolist() == [11.0, 2.0 - 1.0 - 1.5, 3.0 - 0.5 - 1.5, -99.5]
    with pytest.raises(ValueError, match="frequency_penalty"):
        SamplingParams(frequency_penalty=2.5)
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={1: 101})


def test_frequency_penalty_and_logit_bias_change_what_is_generated(engine, monkeypatch):
    plain = engine.complete(HELLO, SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True))
    first = plain.token_ids[0]
    banned = engine.complete(HELLO, SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True,
                                                   logit_bias={first: -100}))
    assert banned.token_ids[0] != first and first not in banned.token_ids
    forced = engine.complete(HELLO, SamplingParams(temperature=0, max_new_tokens=5, ignore_eos=True,
                                                   logit_bias={7: 100}))
    assert forced.token_ids == [7] * 5
    # the frequency penalty grows with each repeat: a token forced by a bias of 100 keeps its place for many
    # tokens (2 x count must outweigh the bias) and then loses it
    forced = SamplingParams(temperature=0, max_new_tokens=100, ignore_eos=True, logit_bias={7: 100})
    assert engine.complete(HELLO, forced).token_ids == [7] * 100
    paced = engine.complete(HELLO, SamplingParams.make(forced, frequency_penalty=2)).token_ids
    first_other = next(i for i, t in enumerate(paced) if t != 7)
    assert 20 <= first_other < 100, paced
    # the presence penalty sees, at each step, how often each token is in the answer so far (prompt excluded)
    from model import engine as generation
    seen_counts, real = [], generation.openai_adjusted
    monkeypatch.setattr(generation, "openai_adjusted", lambda x, p, c: seen_counts.append(c.clone()) or real(x, p, c))
    ids = engine.complete(HELLO, SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True,
                                                presence_penalty=-2)).token_ids
    assert len(seen_counts) == 10
    for step, counts in enumerate(seen_counts):
        assert counts.tolist() == torch.bincount(torch.tensor(ids[:step], dtype=torch.long),
                                                 minlength=counts.numel()).double().tolist()


def test_system_messages_anywhere_and_a_trailing_assistant_follow_openais_rule():
    from model.chat_format import render
    messages = [{"role": "user", "content": "Q1"}, {"role": "system", "content": "S1"},
                {"role": "assistant", "content": "A1"}, {"role": "system", "content": "S2"}]
    prompt = lambda m: render(m, add_generation_prompt=True)
    assert prompt(messages) == "S1\nS2<s>user\nQ1</s>\n<s>assistant\nA1</s>\n<s>assistant\n"
    assert prompt([{"role": "user", "content": "Q"}]) == "<s>user\nQ</s>\n<s>assistant\n"
