"""Log-probabilities as the engine records them and the server shows them (chat logprobs, the legacy
/v1/completions endpoint with echo): every value against a plain forward pass of the model."""
import json

import httpx
import openai
import pytest
import torch

from model.sampling import SamplingParams
from model.scheduler import Scheduler
from serving_helpers import HANG_GUARD_S, engine, live_server, paths, questions, tokenizer  # noqa: F401

TOL = 1e-4  # float32 rounding between a batched decode step and one full forward


def forward_logprobs(model, ids):
    """log_softmax of the model's logits at every position of ids: (len(ids), vocab)."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def check_entries(logp, ids, entries, first):
    """entries[i] scores ids[first + i] from position first + i - 1 of logp: the value and the top-k."""
    for i, e in enumerate(entries):
        pos, token = first + i - 1, ids[first + i]
        assert e.token == token and abs(e.logprob - logp[pos, token].item()) < TOL
        values = logp[pos].topk(len(e.top)).values.tolist()
        assert [round(v, 3) for _, v in e.top] == [round(v, 3) for v in values]
        assert all(abs(v - logp[pos, t].item()) < TOL for t, v in e.top)


def test_engine_logprobs_equal_a_forward_pass(engine):
    for temperature in (0, 0.9):  # sampled tokens get the model's own logprob too, not the tempered one
        done = engine.complete(questions(1)[0], temperature=temperature, seed=1, max_new_tokens=10, logprobs=3,
                               prompt_logprobs=2)
        prompt = engine.encode(questions(1)[0])
        ids = prompt + done.token_ids
        logp = forward_logprobs(engine.model, ids)
        assert done.prompt_logprobs[0] is None and len(done.prompt_logprobs) == len(prompt)
        check_entries(logp, ids, done.prompt_logprobs[1:], 1)
        assert len(done.logprobs) == len(done.token_ids)
        check_entries(logp, ids, done.logprobs, len(prompt))


def test_max_new_tokens_0_scores_the_prompt_without_generating(engine):
    ids = engine.encode(questions(2)[1])
    done = engine.complete(ids, max_new_tokens=0, prompt_logprobs=0)
    assert (done.finish_reason, done.completion_tokens, done.token_ids, done.text) == ("length", 0, [], "")
    check_entries(forward_logprobs(engine.model, ids), ids, done.prompt_logprobs[1:], 1)
    full = list(range(3, 3 + engine.max_len))  # a prompt filling the whole context still fits: nothing is added
    assert engine.complete(full, max_new_tokens=0, prompt_logprobs=0).truncated == 0
    assert engine.complete(full, max_new_tokens=1).truncated > 0
    with pytest.raises(ValueError, match="logprobs=21"):
        SamplingParams(logprobs=21)
    with pytest.raises(ValueError, match="max_new_tokens"):  # generating nothing is for scoring a prompt
        SamplingParams(max_new_tokens=0)


def test_prompt_logprobs_do_not_depend_on_the_batch(engine):
    """Prompts of different lengths prefilled together score as each does alone."""
    prompts = [engine.encode(m) for m in questions(4)]
    alone = [engine.complete(p, max_new_tokens=0, prompt_logprobs=1).prompt_logprobs for p in prompts]
    scheduler = Scheduler(engine.__class__(engine.model, engine.tokenizer, max_batch=4))
    try:
        done = []
        reqs = scheduler.submit_many(prompts, SamplingParams(max_new_tokens=0, prompt_logprobs=1),
                                     [lambda d, f: done.append(f) if f else None] * len(prompts))
        while len(done) < len(prompts):
            scheduler.thread.join(0.02)
    finally:
        scheduler.close()
    for req, ref in zip(reqs, alone):
        assert req.prompt_logprobs[0] is None
        assert all(a.token == b.token and abs(a.logprob - b.logprob) < TOL
                   for a, b in zip(req.prompt_logprobs[1:], ref[1:]))


# ---------------------------------------------------------------------------------------------------------
# through a live server


@pytest.fixture(scope="module")
def url(paths):
    with live_server(paths) as (_, url):
        yield url


def post(url, path, body):
    return httpx.post(url + path, json=body, timeout=HANG_GUARD_S)


@pytest.mark.slow
def test_chat_logprobs_equal_a_forward_pass_streaming_or_not(url, engine):
    messages = questions(2)[1]
    body = {"messages": messages, "temperature": 0, "max_tokens": 12, "logprobs": True, "top_logprobs": 3}
    choice = post(url, "/v1/chat/completions", body).json()["choices"][0]
    content = choice["logprobs"]["content"]
    prompt = engine.encode(messages)
    ids = prompt + engine.complete(messages, temperature=0, max_new_tokens=12).token_ids
    logp = forward_logprobs(engine.model, ids)
    generated = ids[len(prompt):len(prompt) + len(content)]
    assert b"".join(bytes(c["bytes"]) for c in content).decode() == choice["message"]["content"]
    for i, (c, token) in enumerate(zip(content, generated)):
        assert abs(c["logprob"] - logp[len(prompt) + i - 1, token].item()) < TOL
        assert len(c["top_logprobs"]) == 3 and c["top_logprobs"][0]["logprob"] >= c["logprob"] - TOL
        assert abs(c["top_logprobs"][0]["logprob"] - logp[len(prompt) + i - 1].max().item()) < TOL
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True},
                      timeout=HANG_GUARD_S) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    streamed = [c for chunk in chunks for ch in chunk["choices"] if ch["logprobs"] for c in ch["logprobs"]["content"]]
    assert streamed == content
    plain = post(url, "/v1/chat/completions", {"messages": messages, "logprobs": False, "top_logprobs": 0}).json()
    assert plain["choices"][0]["logprobs"] is None  # values that ask for nothing pass


@pytest.mark.slow
def test_completions_echo_with_max_tokens_0_scores_token_id_prompts(url, engine):
    prompts = [engine.encode(m) for m in questions(3)]
    body = {"prompt": prompts, "echo": True, "max_tokens": 0, "logprobs": 2, "temperature": 0}
    data = post(url, "/v1/completions", body).json()
    assert data["object"] == "text_completion" and [c["index"] for c in data["choices"]] == [0, 1, 2]
    assert data["usage"]["completion_tokens"] == 0
    assert data["usage"]["prompt_tokens"] == sum(map(len, prompts))
    for ids, choice in zip(prompts, data["choices"]):
        lp = choice["logprobs"]
        logp = forward_logprobs(engine.model, ids)
        assert choice["text"] == engine.tokenizer.decode(ids) and choice["finish_reason"] == "length"
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None and len(lp["tokens"]) == len(ids)
        for t in range(1, len(ids)):
            assert abs(lp["token_logprobs"][t] - logp[t - 1, ids[t]].item()) < TOL
            assert len(lp["top_logprobs"][t]) <= 2
            assert abs(max(lp["top_logprobs"][t].values()) - logp[t - 1].max().item()) < TOL
        assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    # a prompt over the context (4096) is cut from the left, as chat prompts are, and the echo shows what was kept
    r = post(url, "/v1/completions", {"prompt": list(range(3, 5000)), "echo": True, "max_tokens": 0, "logprobs": 0})
    kept = int(r.headers["X-Prompt-Tokens-Truncated"])
    lp = r.json()["choices"][0]["logprobs"]
    assert kept > 0 and len(lp["tokens"]) == 4997 - kept and lp["token_logprobs"][0] is None


@pytest.mark.slow
def test_completions_list_a_final_eos_as_lm_eval_reads_it(url, engine):
    """lm-eval's local-completions scores a prompt as every entry but the one generated token (echo, max_tokens 1):
    when that token is </s> it is listed too, or the prompt's last token would be dropped from the score."""
    ids = engine.encode(questions(1)[0][0]["content"])
    body = {"prompt": [ids], "echo": True, "max_tokens": 1, "logprobs": 1, "temperature": 0,
            "logit_bias": {str(engine.eos_id): 100}}  # the one token generated is </s>
    for stream in (False, True):
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": stream}, timeout=HANG_GUARD_S) as r:
            lines = [line[6:] if stream else line for line in r.iter_lines() if line.startswith("data: ") or not stream]
        choices = [c for e in lines if e and e != "[DONE]" for c in json.loads(e)["choices"]]
        lp = {k: [v for c in choices for v in c["logprobs"][k]] for k in choices[0]["logprobs"]}
        assert choices[-1]["finish_reason"] == "stop" and "".join(c["text"] for c in choices) == engine.tokenizer.decode(ids)
        assert len(lp["tokens"]) == len(ids) + 1 and lp["tokens"][-1] == "</s>"
        logp = forward_logprobs(engine.model, ids)
        assert abs(lp["token_logprobs"][-1] - logp[-1, engine.eos_id].item()) < TOL
        assert abs(lp["token_logprobs"][-2] - logp[-2, ids[-1]].item()) < TOL  # the prompt's last token, scored


@pytest.mark.slow
def test_completions_prompt_forms_streaming_and_the_sdk(url, engine):
    text = engine.tokenizer.apply_chat_template(questions(1)[0], tokenize=False, add_generation_prompt=True)
    ids = engine.encode(text)
    alone = engine.complete(text, temperature=0, max_new_tokens=8)
    for prompt, n in ((text, 1), ([text, text], 2), (ids, 1), ([ids, ids], 2)):
        data = post(url, "/v1/completions", {"prompt": prompt, "temperature": 0, "max_tokens": 8}).json()
        assert [c["text"] for c in data["choices"]] == [alone.text] * n
    nothing = post(url, "/v1/completions", {"prompt": text, "max_tokens": 0}).json()  # asks for no tokens
    assert nothing["choices"][0]["text"] == "" and nothing["usage"]["completion_tokens"] == 0
    body = {"prompt": [text, ids[:5]], "temperature": 0, "max_tokens": 6, "echo": True, "logprobs": 1}
    whole = post(url, "/v1/completions", body).json()["choices"]
    with httpx.stream("POST", url + "/v1/completions", timeout=HANG_GUARD_S,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["usage"]["completion_tokens"] > 0
    for i, ref in enumerate(whole):
        parts = [c for e in events[:-2] for c in json.loads(e)["choices"] if c["index"] == i]
        assert "".join(c["text"] for c in parts) == ref["text"] and parts[-1]["finish_reason"] == ref["finish_reason"]
        joined = {k: [v for c in parts for v in c["logprobs"][k]] for k in ref["logprobs"]}
        assert joined == ref["logprobs"]
    sdk = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=HANG_GUARD_S)
    done = sdk.completions.create(model="any", prompt=text, temperature=0, max_tokens=8, logprobs=2)
    assert done.choices[0].text == alone.text and len(done.choices[0].logprobs.tokens) == len(alone.token_ids)


@pytest.mark.slow
@pytest.mark.parametrize("body,param", [
    ({}, "prompt"), ({"prompt": ""}, "prompt"), ({"prompt": []}, "prompt"), ({"prompt": [[]]}, "prompt[0]"),
    ({"prompt": ["a", 1]}, "prompt[1]"), ({"prompt": [1, "a"]}, "prompt[1]"), ({"prompt": [10 ** 6]}, "prompt"),
    ({"prompt": [-1]}, "prompt"), ({"prompt": "a", "logprobs": 21}, "logprobs"),
    ({"prompt": "a", "logprobs": True}, "logprobs"), ({"prompt": "a", "echo": 1}, "echo"),
    ({"prompt": "a", "suffix": "b"}, "suffix"), ({"prompt": "a", "best_of": 2}, "best_of"),
    ({"prompt": "a", "max_tokens": -2}, "max_tokens"), ({"prompt": "a", "n": 2}, "n"), ({"prompt": "\ud800"}, "prompt"),
    ({"prompt": "a", "temperature": 3}, "temperature"), ({"prompt": "a", "stream": "yes"}, "stream"),
])
def test_bad_completion_requests_name_their_field(url, body, param):
    r = httpx.post(url + "/v1/completions", content=json.dumps(body), timeout=HANG_GUARD_S,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


@pytest.mark.slow
def test_chat_top_logprobs_needs_logprobs(url):
    r = post(url, "/v1/chat/completions", {"messages": questions(1)[0], "top_logprobs": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
