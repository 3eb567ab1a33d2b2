"""The MiniMind decoder (dense and mixture-of-experts) as a transformers model, with the seed's weight names."""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from .LMConfig import PAD_ID, LMConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # x / sqrt(mean(x^2) + eps) in fp32, then back to x's dtype and scaled (fused kernel, same numbers)
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


def rotary_cos_sin(position_ids, head_dim, theta, dtype):
    """cos/sin tables for the given positions, shape (B, 1, T, head_dim // 2)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim))
    angles = position_ids.float()[:, None, :, None] * inv_freq
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x, cos, sin):
    """Rotate channel pairs (2k, 2k+1) of each head by the position angle, computed in fp32.
    Eager: one complex multiplication (a single kernel forward and backward, several times faster on CPU than
    slicing and stacking the pairs). Under torch.compile: the real form, which inductor fuses (it has no complex)."""
    if torch.compiler.is_compiling():
        return apply_rotary_real(x, cos, sin)
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * torch.complex(cos.float(), sin.float())).flatten(-2).type_as(x)


def apply_rotary_real(x, cos, sin):
    """The same rotation written with real numbers: (a, b) -> (a cos - b sin, a sin + b cos)."""
    x_even, x_odd = x[..., 0::2].float(), x[..., 1::2].float()
    cos, sin = cos.float(), sin.float()
    return torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1).flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, config: LMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads = config.n_heads, config.n_kv_heads
        self.head_dim = config.dim // config.n_heads
        self.theta = config.rope_theta
        self.flash = config.flash_attn
        self.dropout = config.dropout
        self.wq = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)
        self.wo.writes_residual = True
        self.resid_dropout = nn.Dropout(config.dropout)
        self.wqkv = None  # the three projections as one product: set on a copy for decoding (model/fast_decode.py)

    def forward(self, x, cos, sin, mask, cache):
        B, T, _ = x.shape
        if self.wqkv is None:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        else:
            kv_width = self.n_kv_heads * self.head_dim
            q, k, v = self.wqkv(x).split([self.n_heads * self.head_dim, kv_width, kv_width], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        dropout = self.dropout if self.training else 0.0
        if self.flash:
            # mask is None for a plain causal pass, or for one new token that sees every key
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                               is_causal=mask is None and T > 1,
                                               enable_gqa=self.n_kv_heads != self.n_heads)
        else:
            y = math_attention(q, k, v, mask, dropout, self.training)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.resid_dropout(self.wo(y))


def math_attention(q, k, v, mask, dropout, training):
    """Exact attention with explicit softmax: the reference path when flash attention is off."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if mask is None:
        T, S = q.shape[-2], k.shape[-2]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = F.dropout(scores.float().softmax(-1).type_as(q), dropout, training)
    return probs @ v


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), w1 the gate, w3 the up and w2 the down projection."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2.writes_residual = True
        self.dropout = nn.Dropout(dropout)
        self.w13 = None  # gate and up as one product: set on a copy for decoding (model/fast_decode.py)

    def forward(self, x):
        gate, up = (self.w1(x), self.w3(x)) if self.w13 is None else self.w13(x).chunk(2, dim=-1)
        return self.dropout(self.w2(F.silu(gate) * up))


class MoEGate(nn.Module):
    """Softmax router over the routed experts, with the seed's load-balancing auxiliary loss."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.top_k, self.n_experts = config.num_experts_per_tok, config.n_routed_experts
        self.alpha, self.seq_aux, self.norm_topk_prob = config.aux_loss_alpha, config.seq_aux, config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.dim))

    def forward(self, x):
        B, T, D = x.shape
        scores = F.linear(x.reshape(-1, D).float(), self.weight.float()).softmax(dim=-1)
        topk_weight, topk_idx = scores.topk(self.top_k, dim=-1, sorted=False)
        if self.top_k > 1 and self.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        aux_loss = None
        if self.training and self.alpha > 0:
            if self.seq_aux:  # per sequence: fraction of routes each expert got times its mean score
                counts = torch.zeros(B, self.n_experts, device=x.device)
                counts.scatter_add_(1, topk_idx.view(B, -1), torch.ones(B, T * self.top_k, device=x.device))
                load = counts / (T * self.top_k / self.n_experts)
                aux_loss = (load * scores.view(B, T, -1).mean(dim=1)).sum(dim=1).mean() * self.alpha
            else:  # over the whole batch
                load = F.one_hot(topk_idx.view(-1), self.n_experts).float().mean(0) * self.n_experts
                aux_loss = (scores.mean(0) * load).sum() * self.alpha
        return topk_idx, topk_weight, aux_loss


class MoEFeedForward(nn.Module):
    """Routed experts plus shared experts; tokens are grouped per expert, never looped over one by one."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.experts = nn.ModuleList(
            FeedForward(config.dim, config.hidden_dim, config.dropout) for _ in range(config.n_routed_experts))
        self.gate = MoEGate(config)
        if config.n_shared_experts > 0:
            self.shared_experts = FeedForward(config.dim, config.hidden_dim * config.n_shared_experts, config.dropout)
        self.aux_loss = None

    def forward(self, x):
        B, T, D = x.shape
        topk_idx, topk_weight, self.aux_loss = self.gate(x)
        flat_x = x.reshape(-1, D)
        flat_idx = topk_idx.reshape(-1)
        token_of_route = torch.arange(flat_x.shape[0], device=x.device).repeat_interleave(topk_idx.shape[1])
        order = flat_idx.argsort(stable=True)
        counts = torch.bincount(flat_idx, minlength=len(self.experts)).tolist()
        routed_tokens = token_of_route[order]
        routed_weight = topk_weight.reshape(-1)[order]
        y = torch.zeros_like(flat_x)
        start = 0
        for expert, n in zip(self.experts, counts):
            if n == 0:
                continue
            tokens = routed_tokens[start:start + n]
            out = expert(flat_x[tokens]) * routed_weight[start:start + n, None].to(x.dtype)
            y.index_add_(0, tokens, out.to(y.dtype))
            start += n
        y = y.view(B, T, D)
        if hasattr(self, "shared_experts"):
            y = y + self.shared_experts(x)
        return y


class TransformerBlock(GradientCheckpointingLayer):  # activation checkpointing when enabled (trl's default)
    def __init__(self, config: LMConfig, layer_idx: int):
        super().__init__()
        self.attention = Attention(config, layer_idx)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        if config.use_moe:
            self.feed_forward = MoEFeedForward(config)
        else:
            self.feed_forward = FeedForward(config.dim, config.hidden_dim, config.dropout)

    def forward(self, x, cos, sin, mask, cache):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, cache)
        return h + self.feed_forward(self.ffn_norm(h))


@dataclass
class MiniMindOutput(CausalLMOutputWithPast):
    aux_loss: Optional[torch.FloatTensor] = None
    last_hidden_state: Optional[torch.FloatTensor] = None  # the final norm's output: trl's fused head reads it


def build_attention_mask(attention_mask, T, past_len, device):
    """Boolean (B, 1, T, past_len + T) mask: causal, keys that are padding hidden. None when plain causal works or
    one new token sees every key."""
    S = past_len + T
    if attention_mask is None and (past_len == 0 or T == 1):
        return None
    causal = torch.ones(T, S, dtype=torch.bool, device=device).tril(past_len)
    mask = causal[None, None]
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, -S:].bool()
    # a query row with no visible key (a left-pad position) attends to everything: its output is ignored,
    # but it must not become NaN
    return mask | ~mask.any(dim=-1, keepdim=True)


class Transformer(PreTrainedModel, GenerationMixin):
    config_class = LMConfig
    base_model_prefix = ""
    supports_gradient_checkpointing = True
    _no_split_modules = ["TransformerBlock"]
    _supports_sdpa = True
    _tied_weights_keys = {"output.weight": "tok_embeddings.weight"}

    def __init__(self, config: LMConfig = None):
        config = config or LMConfig()
        super().__init__(config)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.output.weight = self.tok_embeddings.weight
        self.post_init()

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            if getattr(module, "writes_residual", False):  # GPT-2 style: smaller init for residual writers
                std = std / math.sqrt(2 * self.config.n_layers)
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, MoEGate):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))

    def get_input_embeddings(self):
        return self.tok_embeddings

    def set_input_embeddings(self, value):
        self.tok_embeddings = value

    def get_output_embeddings(self):
        return self.output

    def set_output_embeddings(self, value):
        self.output = value

    def forward(self, input_ids=None, attention_mask=None, labels=None, past_key_values=None, use_cache=None,
                position_ids=None, logits_to_keep=0, cache=None, inputs_embeds=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            from transformers import DynamicCache
            cache = DynamicCache(config=self.config)
        h = self.tok_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = h.shape[:2]
        past_len = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None:  # count only real tokens, so left padding does not shift positions
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past_len, past_len + T, device=h.device)[None].expand(B, T)
        cos, sin = rotary_cos_sin(position_ids, self.config.dim // self.config.n_heads, self.config.rope_theta,
                                  h.dtype)
        mask = build_attention_mask(attention_mask, T, past_len, h.device)
        h = self.dropout(h)
        for layer in self.layers:
            h = layer(h, cos, sin, mask, cache)
        h = self.norm(h)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.output(h)

        aux_loss = None
        if self.config.use_moe and self.training:
            losses = [l.feed_forward.aux_loss for l in self.layers if l.feed_forward.aux_loss is not None]
            aux_loss = sum(losses) if losses else None
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels)
            if aux_loss is not None:
                loss = loss + aux_loss
        return MiniMindOutput(loss=loss, logits=logits, cache=cache, aux_loss=aux_loss, last_hidden_state=h)


# ----------------------------------------------------------------------------- losses and sequence scores

from .chat_format import IGNORE  # noqa: E402 (the label of a position that is not a target)


def next_token_targets(labels):
    """The target of each position t is labels[t + 1]: (B, T-1). Padding (id 0) is never a target, whatever the
    labels say; positions labelled IGNORE are not targets either. The one statement of that rule."""
    targets = labels[:, 1:]
    return targets.masked_fill(targets == PAD_ID, IGNORE)


def causal_lm_loss(logits, labels):
    """Mean next-token cross-entropy over the targets of next_token_targets."""
    # shift the labels rather than the logits: no copy of the (B, T, vocab) logits
    targets = F.pad(next_token_targets(labels), (0, 1), value=IGNORE)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE)


def token_logps(model, input_ids, labels, autocast, temperature=1.0):
    """Log-probability of each next-token target under the model's distribution at `temperature`, with the
    target mask: two (B, T-1) tensors (RL's per-token scores; summed, DPO's)."""
    with autocast:
        logits = model(input_ids=input_ids).logits
    targets = next_token_targets(labels)
    logp = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    mask = targets != IGNORE
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * mask, mask


def sequence_logps(model, input_ids, labels, autocast):
    """Sum of log-probabilities of the target tokens of each sequence (DPO's scores, and the demo's)."""
    return token_logps(model, input_ids, labels, autocast)[0].sum(-1)


def pad_cat(a, b, value=0):
    """Stack two right-padded batches into one, padding the shorter to the longer length."""
    width = max(a.shape[1], b.shape[1])
    return torch.cat([F.pad(a, (0, width - a.shape[1]), value=value),
                      F.pad(b, (0, width - b.shape[1]), value=value)])


def preference_batch(batch):
    """A DPO batch as one: (input_ids, labels) with the chosen rows first, then the rejected ones."""
    return (pad_cat(batch["chosen_input_ids"], batch["rejected_input_ids"]),
            pad_cat(batch["chosen_labels"], batch["rejected_labels"], value=IGNORE))


def strip_compile_prefix(state_dict):
    """State dicts saved from a torch.compile'd model carry an `_orig_mod.` prefix; drop it."""
    return {k.replace("_orig_mod.", "", 1) if k.startswith("_orig_mod.") else k: v for k, v in state_dict.items()}

# save_pretrained then copies LMConfig.py and model.py next to the weights (trust_remote_code loading)
LMConfig.register_for_auto_class()
Transformer.register_for_auto_class("AutoModelForCausalLM")
