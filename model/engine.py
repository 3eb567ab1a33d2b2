"""The generation engine: a KV cache allocated once, prompts prefilled together, all in flight decoded in one batch.

Shared by 2-eval.py, the API server and the Streamlit page: chat prompts, prefill of several prompts in one
forward, and decode steps of one token for every request in flight in one batched forward.

Usage
-----
    from model.engine import Engine
    from model.sampling import SamplingParams

    engine = Engine(model, tokenizer)                     # one request at a time (weights snapshotted)
    messages = [{"role": "user", "content": "长江有多长？"}]    # system / user / assistant, as in the chat template
    for delta in engine.stream(messages, temperature=0.7, top_p=0.9):
        print(delta, end="", flush=True)                  # deltas never split a UTF-8 character
    engine.last                                           # Completion of that stream (see below)
    done = engine.complete("<s>长江", temperature=0, max_new_tokens=64)  # a str is continued as is: no template
    done.text, done.finish_reason, done.prompt_tokens, done.completion_tokens, done.truncated
    batch = Engine(model, tokenizer, max_batch=16)        # many prompts, up to 16 decoding at once
    done = run_to_completion(batch, [batch.prepare(p, params) for p in prompts])  # their Completions, in order

Concurrent requests from other threads: model/scheduler.py. Sampling parameters: model/sampling.py.

A prompt is a list of chat messages (encoded as model/chat_format.py says: the ids training gives that chat), a str
(tokenized as is; write "<s>" yourself where the model expects it) or a list of token ids.

Completion.finish_reason is "stop" (eos or a stop string), "length" (max_new_tokens or the context is full),
"cancelled" or "error". A prompt that fills the whole context is cut from the left (the newest tokens stay,
leaving min(max_new_tokens, max_seq_len // 4) free) and Completion.truncated says how many tokens were dropped.

Each request has its own cache slot, position, sampling parameters and generator, so a greedy request gives
the same tokens whether it runs alone or batched with others (up to float rounding of the batched matmuls).
An exception while one request's token is picked or delivered ends that request alone (finish_reason "error",
counted in Engine.counters["failed"]); the others in the batch carry on.

Speed: the KV cache is allocated once; prompts are prefilled by the model itself, several at once when they
arrive together (Engine.add_many); decode steps run the same forward over a copy of the model whose linear
layers are laid out for products with few rows (model/fast_decode.py; Engine(..., fast=False) decodes through
the model as it is; the engine copies the weights when built, so build it after loading or training them, or
call refresh()).
torch.compile of the decode step was measured on a 2-core CPU: no faster, and two minutes to compile.
"""
import logging
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import chat_format
from .fast_decode import decode_model
from .sampling import SamplingParams, TextStream, openai_adjusted, pick_tokens, sample_token, token_bytes_table, \
    token_logprobs

log = logging.getLogger(__name__)


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


class Engine:
    """A model, its tokenizer and a static KV cache with max_batch slots. add() prefills a request into a free
    slot, step() decodes one token for every active request in one batched forward; finished requests leave.
    tokenizer=None works on token ids only (prompts as id lists, answers in Completion.token_ids)."""

    def __init__(self, model, tokenizer, max_batch=1, fast=True, batched_sampling=None):
        self.model, self.tokenizer, self.fast = model.eval(), tokenizer, fast
        config = model.config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.max_len, self.max_batch, self.vocab_size = config.max_seq_len, max_batch, config.vocab_size
        self.cache = StaticKVCache(config, max_batch, self.device, self.dtype)
        # without a tokenizer: token ids in (prompt as a list of ids), ids out (Completion.token_ids), no text
        self.token_bytes = token_bytes_table(tokenizer, config.vocab_size) if tokenizer else [b""] * config.vocab_size
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_id = eos if eos is not None else config.eos_token_id
        self.decoder = decode_model(model) if fast else model  # the model that runs decode steps
        # on a GPU every row's token comes back in one transfer per step; on CPU row by row (no transfer to save)
        self.batched_sampling = self.device.type == "cuda" if batched_sampling is None else batched_sampling
        self.active = []
        self.counters = {"completed": 0, "cancelled": 0, "failed": 0, "generated_tokens": 0}
        self.last = None  # Completion of the latest stream() / complete()

    def refresh(self):
        """Read the model's weights again (after training changed them): the fast decode model works on copies."""
        self.decoder = decode_model(self.model) if self.fast else self.model.eval()

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
        logits = self.decode(tokens, positions, max(r.n_cached for r in reqs) + 1)
        for r in reqs:
            r.n_cached += 1
        self._accept(reqs, logits)

    def decode(self, tokens, positions, window):
        """Logits (n, vocab) for one new token in each of the cache's rows 0..n-1, each at its own position; the
        first `window` positions hold every row's keys (one row sees them all; several rows hide the tails of
        the shorter ones)."""
        mask = None if len(tokens) == 1 else torch.arange(window, device=self.device)[None, :] <= positions[:, None]
        self.cache.decode(positions, window)
        return self.decoder(tokens[:, None], attention_mask=mask, position_ids=positions[:, None], cache=self.cache,
                            logits_to_keep=1).logits[:, -1]

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
                self.fail(r)
                continue
            if finish:
                self._retire(r)
                self.counters["completed"] += 1
            if not r.emit(delta, finish) and not finish:  # nobody can receive its tokens: stop it alone
                self.fail(r, notify=False)

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

    def fail(self, req, notify=True):
        """End one request with finish_reason "error" (its slot freed); the others are untouched."""
        if req.slot is not None:
            self._retire(req)
        self.counters["failed"] += 1
        if notify:
            req.emit("", "error")
        req.finish_reason = "error"

    def cancel(self, req):
        """Stop a request now: its slot is free for the next one (a request never added ends at once)."""
        if req.finish_reason:
            return
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
            if req.slot is not None:  # the caller stopped early
                self.cancel(req)
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
