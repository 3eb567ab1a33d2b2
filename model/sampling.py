"""Sampling: parameters and their rules, the distribution a token is drawn from, log-probabilities, text streaming.

What each parameter accepts, the penalties, temperature, top-k and top-p, tokens' log-probabilities, and text
deltas that never split a UTF-8 character nor show a stop string.

Sampling (SamplingParams fields, or keyword arguments of Engine.stream / Engine.complete):
    temperature         0 = greedy (argmax), else logits / temperature, at most 2 default 0.7
    top_k               keep the k most likely tokens, 0 = off                   default 0
    top_p               keep the smallest set with probability >= top_p, 1 = off default 0.9
    repetition_penalty  divide positive / multiply negative logits of tokens already in prompt or answer, 1 = off,
                        at most 10
    frequency_penalty   OpenAI's: subtract penalty x (times the token is in the answer so far), -2..2, 0 = off
    presence_penalty    OpenAI's: subtract penalty from each token already in the answer, -2..2, 0 = off
    logit_bias          OpenAI's: (token id, bias) pairs added to those logits, -100..100 (-100 bans in effect)
    max_new_tokens      None or -1: until the context (config.max_seq_len) is full; 0 (with prompt_logprobs):
                        prefill only
    stop                strings that end the answer (not included in it); the eos token </s> always does
    seed                per-request torch.Generator seed in [-2**63, 2**64); None = random
    ignore_eos          keep going after </s> (benchmarks: a fixed number of tokens)
    logprobs            None = off; k in 0..20: each generated token's log-probability and the k most likely
                        tokens at its position (Completion.logprobs)
    prompt_logprobs     None = off; k in 0..20: the same for every prompt token after the first
                        (Completion.prompt_logprobs)
Log-probabilities are the model's own: log_softmax of its float32 logits, before penalty, temperature, top-k/p.
Any accepted values give a finite distribution (sampling_probs): the penalty and temperature are applied in
float64 to logits shifted so the best one is 0, so 1e-300 as temperature or penalty is merely near-greedy.
"""
import codecs
from dataclasses import dataclass, fields, replace
from typing import NamedTuple, Optional

import torch


# What each sampling parameter accepts, stated once: SamplingParams, the command-line flags (model/cli.py) and
# the API server's request checks all test values against these rules. (None, where a field allows it, means
# "not set" and is not checked.)
SAMPLING_RULES = {
    "temperature": (lambda v: 0 <= v <= 2, "between 0 and 2"),
    "top_p": (lambda v: 0 < v <= 1, "greater than 0 and at most 1"),
    "top_k": (lambda v: v >= 0, "0 (off) or more"),
    "repetition_penalty": (lambda v: 0 < v <= 10, "greater than 0 and at most 10"),
    "frequency_penalty": (lambda v: -2 <= v <= 2, "between -2 and 2"),
    "presence_penalty": (lambda v: -2 <= v <= 2, "between -2 and 2"),
    "logit_bias": (lambda v: all(-100 <= b <= 100 for _, b in v), "between -100 and 100 for each token"),
    "max_new_tokens": (lambda v: v == -1 or v >= 1, "-1 (up to the context limit) or at least 1"),
    "seed": (lambda v: -2**63 <= v < 2**64, "within [-2**63, 2**64)"),
    "logprobs": (lambda v: 0 <= v <= 20, "between 0 and 20"),
    "prompt_logprobs": (lambda v: 0 <= v <= 20, "between 0 and 20"),
}


def sampling_problem(name, value):
    """None when `value` is acceptable for the sampling parameter `name`, else "must be RULE"."""
    ok, rule = SAMPLING_RULES[name]
    return None if ok(value) else f"must be {rule}"


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple = ()  # (token id, bias) pairs
    max_new_tokens: Optional[int] = None
    stop: tuple = ()
    seed: Optional[int] = None
    ignore_eos: bool = False
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(s for s in (self.stop or ()) if s))
        if isinstance(self.logit_bias, dict):
            object.__setattr__(self, "logit_bias", tuple((int(k), float(v)) for k, v in self.logit_bias.items()))
        for name in SAMPLING_RULES:
            value = getattr(self, name)
            if name == "max_new_tokens" and value == 0 and self.prompt_logprobs is not None:
                continue  # prefill only: the prompt is scored, nothing generated
            if value is not None and (why := sampling_problem(name, value)):
                raise ValueError(f"{name}={value!r} {why}")

    @classmethod
    def make(cls, params=None, **overrides):
        """params with keyword overrides; unknown keywords are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown sampling parameter(s): {', '.join(sorted(unknown))}")
        return replace(params or cls(), **overrides)


class TokenLogprob(NamedTuple):
    """One token's log-probability under the model and the k most likely tokens at its position."""
    token: int
    logprob: float
    top: list  # [(token id, logprob)], most likely first


def token_logprobs(logits, tokens, k):
    """TokenLogprob for each row of float logits (n, vocab) and its token: log_softmax, gathered, top-k."""
    logp = logits.float().log_softmax(-1)
    picked = logp.gather(-1, torch.as_tensor(tokens, dtype=torch.long, device=logp.device)[:, None])[:, 0].tolist()
    values, ids = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
    return [TokenLogprob(t, lp, list(zip(i, v))) for t, lp, i, v in zip(tokens, picked, ids.tolist(), values.tolist())]




FINITE = 1e300  # penalised logits are clamped to +-FINITE: far inside float64, so differences stay finite


def penalized_logits(logits, params, seen=None, check=True):
    """One row of logits in float64 after the repetition penalty (divide positive, multiply negative logits of
    the tokens in `seen`), clamped to a finite range: no penalty, however extreme, can make an inf.
    check=False leaves the NaN test (a host sync) to the caller."""
    x = logits.to(torch.float64, copy=True)
    if check and torch.isnan(x).any():
        raise FloatingPointError("the model produced NaN logits")
    if params.repetition_penalty != 1.0 and seen is not None:
        p = params.repetition_penalty
        x = torch.where(seen, torch.where(x > 0, x / p, x * p), x)
    return x.clamp_(-FINITE, FINITE)


def sampling_probs(logits, params, seen=None, check=True):
    """The distribution a sampled token is drawn from (temperature > 0): repetition penalty, temperature, top-k,
    top-p. Float64, finite and summing to 1 for any accepted SamplingParams: the best logit is shifted to 0
    before dividing by the temperature, so exp() never overflows and the best token keeps weight 1."""
    x = penalized_logits(logits, params, seen, check)
    x = (x - x.max()) / params.temperature  # a tiny temperature sends the others to -inf, never the best to NaN
    if 0 < params.top_k < x.numel():
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = x.softmax(-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > params.top_p  # the nucleus was full before this token
        probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
        probs /= probs.sum()
    return probs


def openai_adjusted(logits, params, counts=None):
    """Logits after OpenAI's adjustments, in float64: logit_bias added, then frequency_penalty x count and
    presence_penalty x (count > 0) subtracted, where count is how often each token was generated so far."""
    x = logits.to(torch.float64, copy=True)
    if params.logit_bias:
        ids, bias = zip(*params.logit_bias)
        x[list(ids)] += torch.tensor(bias, dtype=torch.float64, device=x.device)
    if counts is not None:
        x -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
    return x


def pick_token(logits, params, generator=None, seen=None, check=True):
    """sample_token's choice as a 0-dim tensor on the logits' device (nothing copied to the host)."""
    if params.temperature == 0:
        if params.repetition_penalty == 1.0 or seen is None:
            return logits.argmax()
        return penalized_logits(logits, params, seen, check).argmax()
    return torch.multinomial(sampling_probs(logits, params, seen, check), 1, generator=generator)[0]


def sample_token(logits, params, generator=None, seen=None):
    """One token id from one row of logits: greedy (argmax) at temperature 0, else drawn from sampling_probs
    with the request's own generator."""
    return int(pick_token(logits, params, generator, seen))


def pick_tokens(reqs, logits):
    """Every row's token with one host transfer (the GPU path): a list of ids, or of the exception that row
    raised. NaN rows are replaced before sampling (on a GPU, sampling NaNs is a device assert that ends the
    process) and fail alone."""
    bad = torch.isnan(logits).any(-1)
    logits = torch.where(bad[:, None], 0.0, logits)
    greedy = logits.argmax(-1)
    picked, errors = [], {}
    for i, r in enumerate(reqs):
        try:
            plain = r.params.temperature == 0 and (r.params.repetition_penalty == 1.0 or r.seen is None)
            picked.append(greedy[i] if plain else pick_token(logits[i], r.params, r.generator, r.seen, False))
        except Exception as e:
            errors[i] = e
            picked.append(greedy[i])
    values = torch.stack([*picked, *bad.long()]).tolist()  # the one host transfer of the step
    n = len(reqs)
    return [errors.get(i) or (FloatingPointError("the model produced NaN logits") if values[n + i] else values[i])
            for i in range(n)]


def _byte_decoder():
    """GPT-2's table from the printable characters byte-level BPE writes tokens in back to raw bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def token_bytes_table(tokenizer, vocab_size):
    """The raw bytes of every token id (b"" for special tokens and ids the tokenizer does not have)."""
    to_byte = _byte_decoder()
    special = set(tokenizer.all_special_ids)
    n = min(vocab_size, len(tokenizer))
    table = []
    for i, tok in enumerate(tokenizer.convert_ids_to_tokens(list(range(n)))):
        if tok is None or i in special:
            table.append(b"")
        elif all(c in to_byte for c in tok):
            table.append(bytes(to_byte[c] for c in tok))
        else:  # not a byte-level token (an added word): its text
            table.append(tokenizer.convert_tokens_to_string([tok]).encode())
    return table + [b""] * (vocab_size - n)


class TextStream:
    """Token ids in, text deltas out. Holds back an incomplete UTF-8 character and any tail that may be the
    start of a stop string, so a delta is always valid text and a stop string is never shown."""

    def __init__(self, token_bytes, stop=()):
        self.token_bytes, self.stop = token_bytes, stop
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self.held = ""

    def push(self, token_id):
        """(delta, hit_stop) after one more token."""
        text = self.held + self.utf8.decode(self.token_bytes[token_id])
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.held = ""
            return text[:min(hits)], True
        keep = _stop_prefix_len(text, self.stop)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep], False

    def flush(self):
        text, self.held = self.held + self.utf8.decode(b"", final=True), ""
        return text


def _stop_prefix_len(text, stops):
    """Length of the longest tail of text that is the beginning of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
