"""Fast text generation shared by 2-eval.py, the API server and the Streamlit page: chat prompts, a KV cache
allocated once, sampling, UTF-8-safe streaming, and a scheduler that decodes concurrent requests in one batch.

Usage
-----
    from model.generate import Engine, Scheduler, SamplingParams

    engine = Engine(model, tokenizer)                     # a script: one request at a time (weights snapshotted)
    messages = [{"role": "user", "content": "长江有多长？"}]    # system / user / assistant, as in the chat template
    for delta in engine.stream(messages, temperature=0.7, top_p=0.9):
        print(delta, end="", flush=True)                  # deltas never split a UTF-8 character
    engine.last                                           # Completion of that stream (see below)
    done = engine.complete("<s>长江", temperature=0, max_new_tokens=64)  # a str is continued as is: no template
    done.text, done.finish_reason, done.prompt_tokens, done.completion_tokens, done.truncated

    threads = single_torch_thread()                       # before loading the model (see Scheduler)
    sched = Scheduler(Engine(model, tokenizer, max_batch=16), threads=threads)  # a thread; all in flight is one batch
    for delta in sched.stream(messages, SamplingParams(temperature=0)): ...  # from any thread
    req = sched.submit(messages, params, on_event)        # on_event(delta, finish_reason) runs on its thread
    sched.cancel(req)                                     # e.g. the client left: its slot is freed before the next step

A prompt is a list of chat messages (encoded as model/chat_format.py says: the ids training gives that chat), a str
(tokenized as is; write "<s>" yourself where the model expects it) or a list of token ids.

Sampling (SamplingParams fields, or keyword arguments of stream/complete):
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

Completion.finish_reason is "stop" (eos or a stop string), "length" (max_new_tokens or the context is full),
"cancelled" or "error". A prompt that fills the whole context is cut from the left (the newest tokens stay,
leaving min(max_new_tokens, max_seq_len // 4) free) and Completion.truncated says how many tokens were dropped.

Each request has its own cache slot, position, sampling parameters and generator, so a greedy request gives
the same tokens whether it runs alone or batched with others (up to float rounding of the batched matmuls).
An exception while one request's token is picked or delivered ends that request alone (finish_reason "error",
counted in Engine.counters["failed"]); the others in the batch carry on.

Speed: the KV cache is allocated once; prompts are prefilled by the model itself, several at once when they
arrive together (Engine.add_many); decode steps run FastDecoder, the model's maths over relaid copies of its
weights (Engine(..., fast=False) decodes through model.forward instead; the engine copies the weights when
built, so build it after loading or training them).
torch.compile of the decode step was measured on a 2-core CPU: no faster, and two minutes to compile.
"""
import codecs
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field, fields, replace
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from . import chat_format

log = logging.getLogger(__name__)


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


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int
    completion_tokens: int
    truncated: int = 0  # prompt tokens dropped from the left to fit the context
    token_ids: list = field(default_factory=list, repr=False)  # the generated ids (with the final </s>, if any)
    logprobs: list = field(default_factory=list, repr=False)  # TokenLogprob per generated id (params.logprobs)
    prompt_logprobs: Optional[list] = field(default=None, repr=False)  # None, then TokenLogprob per prompt id


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


class StaticKVCache:
    """Keys and values for every layer in buffers allocated once: (layers, slots, kv_heads, max_len, head_dim).

    The model calls update(k, v, layer) in each attention layer. Before each forward the engine says what the
    step is: prefill(slot) writes the prompts of the batch's rows at positions 0..T-1 of slots slot, slot + 1, ...
    (right-padded: what lies past a prompt's end is overwritten by its decode steps); decode(positions,
    window) writes one new token for each of the rows 0..n-1 at its own position and returns the first `window`
    positions of those rows (the attention mask hides the unused tail of shorter rows)."""

    def __init__(self, config, max_batch, device, dtype):
        head_dim = config.dim // config.n_heads
        shape = (config.n_layers, max_batch, config.n_kv_heads, config.max_seq_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self._slot, self._rows, self._positions, self._window = 0, None, None, 0

    def prefill(self, slot):
        """The next forward writes prompts (right-padded, one per row) to slots slot, slot + 1, ..."""
        self._slot, self._positions, self._window = slot, None, 0

    def decode(self, positions, window):
        self._positions, self._window = positions, window
        self._rows = torch.arange(len(positions), device=positions.device)

    def get_seq_length(self, layer_idx=0):
        """Tokens before this step's new ones, as the model's mask and positions expect."""
        return 0 if self._positions is None else self._window - 1

    def update(self, k, v, layer_idx, *args):
        kl, vl = self.k[layer_idx], self.v[layer_idx]
        if self._positions is None:  # prefill of consecutive slots from position 0
            B, T = k.shape[0], k.shape[2]
            kl[self._slot:self._slot + B, :, :T] = k
            vl[self._slot:self._slot + B, :, :T] = v
            return k, v
        n = k.shape[0]
        kl[self._rows, :, self._positions] = k[:, :, 0]
        vl[self._rows, :, self._positions] = v[:, :, 0]
        return kl[:n, :, :self._window], vl[:n, :, :self._window]

    def move(self, src, dst, length):
        """Copy a sequence to another slot (the engine keeps the active sequences in slots 0..n-1)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]


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


class Request:
    """One generation in flight: its tokens, sampling state and text stream, and where its output goes."""

    def __init__(self, prompt_ids, params, truncated, max_new, engine, on_event=None):
        self.prompt_ids, self.params, self.truncated, self.max_new = prompt_ids, params, truncated, max_new
        self.on_event = on_event  # on_event(delta: str, finish_reason: str | None)
        self.generator = torch.Generator(engine.device)
        if params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(params.seed)
        self.seen = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(engine.vocab_size, dtype=torch.bool, device=engine.device)
            self.seen[torch.tensor(prompt_ids, device=engine.device)] = True
        self.adjusted = bool(params.logit_bias or params.frequency_penalty or params.presence_penalty)
        self.counts = None  # how often each token was generated, for the frequency and presence penalties
        if params.frequency_penalty or params.presence_penalty:
            self.counts = torch.zeros(engine.vocab_size, dtype=torch.float64, device=engine.device)
        self.text = TextStream(engine.token_bytes, params.stop)
        self.pieces, self.token_ids, self.logprobs = [], [], []
        self.prompt_logprobs = None  # [None, TokenLogprob, ...] after the prefill when params.prompt_logprobs is set
        self.slot = None
        self.n_cached = 0  # tokens of this sequence in the cache
        self.last_token = None
        self.finish_reason = None
        self.cancelled = False

    @property
    def n_generated(self):
        return len(self.token_ids)

    def emit(self, delta, finish_reason=None):
        """Record and deliver a delta; False if on_event raised (logged: the caller decides what it means)."""
        if delta:
            self.pieces.append(delta)
        if finish_reason:
            self.finish_reason = finish_reason
        if self.on_event and (delta or finish_reason):
            try:
                self.on_event(delta, finish_reason)
            except Exception:
                log.exception("a request's on_event callback failed")
                return False
        return True

    def result(self):
        return Completion("".join(self.pieces), self.finish_reason, len(self.prompt_ids), self.n_generated,
                          self.truncated, list(self.token_ids), list(self.logprobs), self.prompt_logprobs)


class SkinnyWeight:
    """One weight matrix in two layouts, for products with few rows. MKL picks its kernel by the shape of the
    output. With one to three rows, x @ W(in, out) streams the weight fastest, and splitting its columns into
    two halves multiplied as one batched product lets both cores stream their half (MKL runs a skinny product
    on one thread): about 1.2x faster on a 2-core CPU. From four rows on, W(out, in) @ x.T keeps the long
    dimension first and runs about 1.3x faster. All are exact products; they differ only in summation order."""

    def __init__(self, *weights):  # (out, in) weights, stacked along out (fused q|k|v or gate|up)
        self.out_in = torch.cat([w.detach() for w in weights]).contiguous()
        n_out, self.n_in = self.out_in.shape
        self.halves = 2 if n_out % 2 == 0 else 1
        # (halves, in, out / halves): half h holds output columns h * out / halves onwards
        self.in_out = self.out_in.t().reshape(self.n_in, self.halves, -1).transpose(0, 1).contiguous()

    def __rmatmul__(self, x):
        n = x.shape[0]
        if n < 4:
            y = torch.bmm(x.expand(self.halves, n, self.n_in), self.in_out)  # (halves, n, out / halves)
            return y.transpose(0, 1).reshape(n, -1)
        return (self.out_in @ x.t()).t().contiguous()  # row-major again, as the kernels after it expect


class FastDecoder:
    """The model's one-token decode step with its weights laid out for skinny matrix products (SkinnyWeight):
    q|k|v and gate|up fused. On CPU this is about 1.4x faster per token at batch 1 than nn.Linear, and 1.3x at
    batch 16. Same maths as Transformer.forward (the tests hold the two to float rounding); it costs two copies
    of the weights, taken when the engine is built."""

    def __init__(self, model):
        c = model.config
        self.model, self.n_heads, self.n_kv_heads = model, c.n_heads, c.n_kv_heads
        self.head_dim = c.dim // c.n_heads

        self.qkv, self.wo, self.w13, self.w2 = [], [], [], []
        for layer in model.layers:
            a, ff = layer.attention, layer.feed_forward
            self.qkv.append(SkinnyWeight(a.wq.weight, a.wk.weight, a.wv.weight))
            self.wo.append(SkinnyWeight(a.wo.weight))
            dense = hasattr(ff, "w1")  # MoE layers run their own module
            self.w13.append(SkinnyWeight(ff.w1.weight, ff.w3.weight) if dense else None)
            self.w2.append(SkinnyWeight(ff.w2.weight) if dense else None)
        self.out = SkinnyWeight(model.output.weight)
        device = self.out.out_in.device
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, self.head_dim, 2, device=device).float() / self.head_dim))
        angles = torch.arange(c.max_seq_len, device=device).float()[:, None] * inv_freq
        # rotary on pairs (2k, 2k+1) as one multiply-add: x * [c, c] + (x with each pair swapped) * [-s, s]
        self.cos = angles.cos().repeat_interleave(2, dim=-1)
        self.sin = torch.stack((-angles.sin(), angles.sin()), dim=-1).flatten(-2)
        self.eps = c.norm_eps

    def norm(self, x, module):
        return F.rms_norm(x, (x.shape[-1],), module.weight, self.eps)

    def __call__(self, tokens, positions, window, cache):
        """Logits (n, vocab) for one new token per row; rows 0..n-1 of the cache, each at its own position."""
        H, KV, hd = self.n_heads, self.n_kv_heads, self.head_dim
        n = tokens.shape[0]
        h = self.model.tok_embeddings(tokens)
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]
        mask = None  # one row sees all its keys; several rows hide the tails of the shorter ones
        if n > 1:
            hidden = torch.arange(window, device=tokens.device) > positions[:, None, None, None]
            mask = torch.zeros(hidden.shape, dtype=h.dtype, device=h.device).masked_fill_(hidden, float("-inf"))
        cache.decode(positions, window)
        for i, layer in enumerate(self.model.layers):
            qkv = self.norm(h, layer.attention_norm) @ self.qkv[i]
            qk = qkv[:, :(H + KV) * hd].view(n, H + KV, hd).float()  # query heads, then key heads
            swapped = qk.view(n, H + KV, hd // 2, 2).flip(-1).view(n, H + KV, hd)
            qk = (qk * cos + swapped * sin).to(h.dtype)
            keys, values = cache.update(qk[:, H:, None], qkv[:, (H + KV) * hd:].view(n, KV, 1, hd), i)
            # query heads grouped under their kv head: (n, KV, H/KV, hd) against (n, KV, window, hd)
            y = F.scaled_dot_product_attention(qk[:, :H].view(n, KV, H // KV, hd), keys, values, attn_mask=mask)
            h = h + y.view(n, H * hd) @ self.wo[i]
            x = self.norm(h, layer.ffn_norm)
            if self.w13[i] is None:
                h = h + layer.feed_forward(x[:, None])[:, 0]
            else:
                gate, up = (x @ self.w13[i]).chunk(2, dim=-1)
                h = h + (F.silu(gate) * up) @ self.w2[i]
        return self.norm(h, self.model.norm) @ self.out


class Engine:
    """A model, its tokenizer and a static KV cache with max_batch slots. add() prefills a request into a free
    slot, step() decodes one token for every active request in one batched forward; finished requests leave.
    tokenizer=None works on token ids only (prompts as id lists, answers in Completion.token_ids)."""

    def __init__(self, model, tokenizer, max_batch=1, fast=True, batched_sampling=None):
        self.model, self.tokenizer = model.eval(), tokenizer
        config = model.config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.max_len, self.max_batch, self.vocab_size = config.max_seq_len, max_batch, config.vocab_size
        self.cache = StaticKVCache(config, max_batch, self.device, self.dtype)
        # without a tokenizer: token ids in (prompt as a list of ids), ids out (Completion.token_ids), no text
        self.token_bytes = token_bytes_table(tokenizer, config.vocab_size) if tokenizer else [b""] * config.vocab_size
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_id = eos if eos is not None else config.eos_token_id
        self.decoder = FastDecoder(model) if fast else None  # None: decode through model.forward
        # on a GPU every row's token comes back in one transfer per step; on CPU row by row (no transfer to save)
        self.batched_sampling = self.device.type == "cuda" if batched_sampling is None else batched_sampling
        self.active = []
        self.counters = {"completed": 0, "cancelled": 0, "failed": 0, "generated_tokens": 0}
        self.last = None  # Completion of the latest stream() / complete()

    def refresh(self):
        """Read the model's weights again (after training changed them): the fast decoder works on copies."""
        self.model.eval()
        if self.decoder:
            self.decoder = FastDecoder(self.model)

    def encode(self, prompt, **chat_options):
        """Token ids of a prompt; chat_options (tools, enable_thinking, prefix) as chat_format.Encoder.prompt takes."""
        if isinstance(prompt, str):
            return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if prompt and isinstance(prompt[0], dict):  # the ids training gave the same chat (model/chat_format.py)
            return chat_format.encoder_for(self.tokenizer).prompt(prompt, **chat_options)
        return list(prompt)

    def prepare(self, prompt, params=None, on_event=None):
        """A Request: the prompt tokenized (cut from the left if it fills the context) with its token budget."""
        params = params or SamplingParams()
        ids = self.encode(prompt)
        if not ids:
            raise ValueError("empty prompt")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}): the model's vocabulary")
        wanted = params.max_new_tokens if params.max_new_tokens not in (None, -1) else None
        truncated = 0
        if len(ids) >= self.max_len + (wanted == 0):  # no room for one new token: keep the newest, leaving room
            room = max(1, min(wanted or self.max_len, self.max_len // 4))
            truncated = len(ids) - (self.max_len - room)
            ids = ids[truncated:]
        room = self.max_len - len(ids)
        return Request(ids, params, truncated, room if wanted is None else min(wanted, room), self, on_event)

    def add(self, req):
        """Prefill the request's prompt into the next slot and sample its first token."""
        self.add_many([req])

    @torch.inference_mode()
    def add_many(self, reqs):
        """Prefill several prompts in one forward into the next slots and sample each one's first token. The
        prompts are right-padded: under causal attention no real token sees the padding after it, and the
        padding's keys in the cache lie beyond each row's position, where decode steps mask and overwrite them."""
        if len(self.active) + len(reqs) > self.max_batch:
            raise RuntimeError(f"{len(reqs)} more requests do not fit: {len(self.active)} of {self.max_batch} "
                               "slots are busy")
        first = len(self.active)
        lengths = [len(r.prompt_ids) for r in reqs]
        ids = torch.zeros(len(reqs), max(lengths), dtype=torch.long)
        for i, r in enumerate(reqs):
            r.slot, r.n_cached = first + i, lengths[i]
            ids[i, :lengths[i]] = torch.tensor(r.prompt_ids)
        self.active.extend(reqs)
        self.cache.prefill(first)
        # logits from position shortest - 1 on hold every row's last real token; prompt logprobs need them all
        scoring = any(r.params.prompt_logprobs is not None for r in reqs)
        keep = max(lengths) - (0 if scoring else min(lengths) - 1)
        try:
            logits = self.model(ids.to(self.device), cache=self.cache, logits_to_keep=keep).logits
        except Exception:  # nothing of these requests was kept: their slots are free again
            del self.active[first:]
            for r in reqs:
                r.slot, r.n_cached = None, 0
            raise
        for i, r in enumerate(reqs):
            if r.params.prompt_logprobs is not None:  # position t predicts prompt token t + 1
                scored = token_logprobs(logits[i, :lengths[i] - 1], r.prompt_ids[1:], r.params.prompt_logprobs)
                r.prompt_logprobs = [None] + scored
        last = torch.tensor(lengths, device=self.device) - 1 - (max(lengths) - keep)
        self._accept(reqs, logits[torch.arange(len(reqs), device=self.device), last])

    @staticmethod
    def prefill_groups(reqs, budget=4096):
        """Split requests (in order) into groups worth one padded prefill each: a group grows while its padded
        size stays within budget tokens and at most 1.5x its real tokens (plus 64), so one long prompt does not
        pad many short ones."""
        groups, group = [], []
        for r in reqs:
            trial = group + [r]
            longest, real = max(len(q.prompt_ids) for q in trial), sum(len(q.prompt_ids) for q in trial)
            if group and (len(trial) * longest > budget or len(trial) * longest > 1.5 * real + 64):
                groups.append(group)
                trial = [r]
            group = trial
        return groups + [group] if group else groups

    @torch.inference_mode()
    def step(self):
        """One new token for every active request, all rows in one forward."""
        reqs = list(self.active)
        if not reqs:
            return
        tokens = torch.tensor([r.last_token for r in reqs], device=self.device)
        positions = torch.tensor([r.n_cached for r in reqs], device=self.device)
        window = max(r.n_cached for r in reqs) + 1
        if self.decoder:
            logits = self.decoder(tokens, positions, window, self.cache)
        else:
            mask = torch.arange(window, device=self.device)[None, :] <= positions[:, None]
            self.cache.decode(positions, window)
            logits = self.model(tokens[:, None], attention_mask=mask, position_ids=positions[:, None],
                                cache=self.cache, logits_to_keep=1).logits[:, -1]
        for r in reqs:
            r.n_cached += 1
        self._accept(reqs, logits)

    def _accept(self, reqs, logits):
        """Sample each row's next token, stream its text, and retire the requests that are done. A request whose
        token cannot be picked or delivered fails alone; the other rows carry on."""
        logits = logits.float()
        picked = pick_tokens(reqs, logits) if self.batched_sampling else None
        for i, r in enumerate(reqs):
            try:
                if picked is not None and isinstance(picked[i], Exception) and r.max_new:
                    raise picked[i]
                delta, finish = self._next_token(r, logits[i], None if picked is None else picked[i])
            except Exception:
                log.exception("request failed while producing its token; the rest of the batch goes on")
                self._fail(r)
                continue
            if finish:
                self._retire(r)
                self.counters["completed"] += 1
            if not r.emit(delta, finish) and not finish:  # nobody can receive its tokens: stop it alone
                self._fail(r, notify=False)

    def _next_token(self, r, logits, token=None):
        """(text delta, finish_reason or None) after request r's next token (sampled here unless given)."""
        if r.max_new == 0:  # prefill only
            return "", "length"
        if token is None or r.adjusted:  # (the batched pick knows nothing of OpenAI's penalties and biases)
            scores = openai_adjusted(logits, r.params, r.counts) if r.adjusted else logits
            token = sample_token(scores, r.params, r.generator, r.seen)
        if r.params.logprobs is not None:
            r.logprobs.extend(token_logprobs(logits[None], [token], r.params.logprobs))
        r.token_ids.append(token)
        if r.counts is not None:
            r.counts[token] += 1
        self.counters["generated_tokens"] += 1
        if token == self.eos_id and not r.params.ignore_eos:
            return r.text.flush(), "stop"
        r.last_token = token
        if r.seen is not None:
            r.seen[token] = True
        delta, hit = r.text.push(token)
        if hit:
            return delta, "stop"
        if r.n_generated >= r.max_new:
            return delta + r.text.flush(), "length"
        return delta, None

    def _fail(self, req, notify=True):
        """End one request with finish_reason "error" (its slot freed); the others are untouched."""
        if req.slot is not None:
            self._retire(req)
        self.counters["failed"] += 1
        if notify:
            req.emit("", "error")
        req.finish_reason = "error"

    def cancel(self, req):
        """Stop a request now; its slot is free for the next one."""
        if req.slot is not None:
            self._retire(req)
            self.counters["cancelled"] += 1
            req.emit("", "cancelled")

    def _retire(self, req):
        """Free the request's slot, moving the last active sequence into it so slots 0..n-1 stay the batch."""
        i, last = req.slot, len(self.active) - 1
        if i != last:
            moved = self.active[last]
            self.cache.move(last, i, moved.n_cached)
            moved.slot, self.active[i] = i, moved
        self.active.pop()
        req.slot = None

    def stream(self, prompt, params=None, **overrides):
        """Text deltas of one answer (this engine must not be serving other requests meanwhile)."""
        events = []
        req = self.prepare(prompt, SamplingParams.make(params, **overrides), lambda d, f: events.append(d))
        try:
            self.add(req)
            while True:
                yield from (d for d in events if d)
                events.clear()
                if req.finish_reason:
                    break
                self.step()
        finally:
            self.cancel(req)  # no-op unless the caller stopped early
            self.last = req.result()

    def complete(self, prompt, params=None, **overrides):
        """The whole answer as a Completion."""
        for _ in self.stream(prompt, params, **overrides):
            pass
        return self.last


def run_to_completion(engine, requests):
    """Finish prepared requests, as many in flight at once as the engine has slots: each free slot is filled in
    order, the prompts that join together are prefilled in one forward, and each step decodes every row."""
    waiting = list(requests)
    with torch.no_grad():
        while waiting or engine.active:
            room = engine.max_batch - len(engine.active)
            if waiting and room:
                engine.add_many(waiting[:room])
                del waiting[:room]
            if engine.active:
                engine.step()
    return [r.result() for r in requests]


def single_torch_thread():
    """Switch this thread to one torch CPU thread and return the count it had: call it before loading a model
    that a Scheduler will serve, then pass the count on as Scheduler(..., threads=count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    return threads


class Scheduler:
    """Serves concurrent requests from one Engine on a background thread. Requests join (prefill) and leave
    (done or cancelled) between steps, and each step decodes everything in flight in one batched forward.

    threads: torch CPU threads of that thread (default: the count of the thread that builds the scheduler).
    Load the model with torch.set_num_threads(1) where you can (see single_torch_thread): once two threads
    each own an OpenMP worker pool, libgomp stops its workers spinning between parallel regions, and on a
    2-core CPU every decode step then took 1.5x as long."""

    def __init__(self, engine, threads=None):
        self.engine = engine
        self.threads = threads or torch.get_num_threads()
        self.waiting = deque()
        self.cond = threading.Condition()
        self.steps = 0
        self.busy_seconds = {"prefill": 0.0, "decode": 0.0}  # time the engine spent working (see stats())
        self._closed = False
        self.thread = threading.Thread(target=self._run, name="minimind-scheduler", daemon=True)
        self.thread.start()

    def submit(self, prompt, params=None, on_event: Callable[[str, Optional[str]], None] = None):
        """Queue a request; on_event(delta, finish_reason) is called on the scheduler thread."""
        req = self.engine.prepare(prompt, params, on_event)
        with self.cond:
            self.waiting.append(req)
            self.cond.notify()
        return req

    def submit_many(self, prompts, params=None, on_events=None):
        """Queue several requests at once, so they are prefilled together (the legacy completions' batches);
        on_events: one callback per prompt, or None."""
        on_events = on_events or [None] * len(prompts)
        reqs = [self.engine.prepare(p, params, on) for p, on in zip(prompts, on_events, strict=True)]
        with self.cond:
            self.waiting.extend(reqs)
            self.cond.notify()
        return reqs

    def cancel(self, req):
        req.cancelled = True
        with self.cond:
            self.cond.notify()

    def stream(self, prompt, params=None, **overrides):
        """Text deltas of one answer, from any thread; closing the generator early cancels the request."""
        events = queue.Queue()
        req = self.submit(prompt, SamplingParams.make(params, **overrides), lambda d, f: events.put((d, f)))
        try:
            while True:
                delta, finish = events.get()
                if delta:
                    yield delta
                if finish:
                    if finish == "error":
                        raise RuntimeError("generation failed (see the server log)")
                    return
        finally:
            if req.finish_reason is None:
                self.cancel(req)

    def stats(self):
        return {"active": len(self.engine.active), "waiting": len(self.waiting), "max_batch": self.engine.max_batch,
                "steps": self.steps, **self.engine.counters,
                **{f"{k}_seconds": round(v, 3) for k, v in self.busy_seconds.items()}}

    def close(self):
        with self.cond:
            self._closed = True
            self.cond.notify()
        self.thread.join(timeout=10)

    def _prefill(self, group):
        """Prefill a group together; if that forward fails, each request alone, so only the culprit fails."""
        try:
            self.engine.add_many(group)
            return
        except Exception:
            if len(group) == 1:
                log.exception("prefill failed; failing that request alone")
                self.engine._fail(group[0])
                return
        for req in group:
            self._prefill([req])

    def _run(self):
        torch.set_num_threads(self.threads)  # per thread under OpenMP
        engine = self.engine
        while True:
            with self.cond:
                while not self._closed and not self.waiting and not engine.active:
                    self.cond.wait()
                if self._closed:
                    return
                joining = []
                while self.waiting and len(engine.active) + len(joining) < engine.max_batch:
                    joining.append(self.waiting.popleft())
            try:
                started = time.perf_counter()
                for req in [r for r in joining if r.cancelled]:
                    engine.counters["cancelled"] += 1
                    req.emit("", "cancelled")
                for group in engine.prefill_groups([r for r in joining if not r.cancelled]):
                    self._prefill(group)
                for req in [r for r in engine.active if r.cancelled]:
                    engine.cancel(req)
                decoding = time.perf_counter()
                if engine.active:
                    engine.step()
                    self.steps += 1
                self.busy_seconds["prefill"] += decoding - started
                self.busy_seconds["decode"] += time.perf_counter() - decoding
            except Exception:  # a decode forward is shared by the whole batch: it fails them all
                log.exception("decode step failed; failing the requests in flight")
                for req in list(engine.active) + [r for r in joining if r.slot is None and not r.finish_reason]:
                    engine._fail(req)
