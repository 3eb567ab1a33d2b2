"""The model's maths checked against independent references: transformers' Llama, a seed-style re-implementation
inside this file, naive loops for MoE routing, aux loss and loss, and the transformers/peft integrations."""
import json
import math
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
import torch.nn.functional as F

from model.checkpoint import CheckpointError, infer_config, load_model, save_weights
from model.LMConfig import LMConfig, preset
from model.model import MoEFeedForward, RMSNorm, Transformer, apply_rotary, apply_rotary_real, rotary_cos_sin

ATOL = 1e-5
MOE = dict(use_moe=True, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1)


def tiny(**overrides) -> LMConfig:
    """A model small enough for exact fp32 comparisons in milliseconds, with GQA (4 query heads, 2 kv heads)."""
    fields = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, hidden_dim=96, max_seq_len=64,
                  initializer_range=0.1)
    return LMConfig(**{**fields, **overrides})


def make(config, seed=0) -> Transformer:
    """A model in eval mode with random weights, including non-trivial norm weights."""
    torch.manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.weight.add_(0.2 * torch.randn_like(module.weight))
    return model.eval()


def clone_with(model, **overrides) -> Transformer:
    """The same weights under a config with some fields changed (e.g. flash_attn=False)."""
    other = Transformer(LMConfig(**{**model.config.to_dict(), **overrides}))
    other.load_state_dict(model.state_dict())
    return other.eval()


def left_padded(lengths, T, vocab, seed=0):
    """Random ids (never 0, the pad id) left-padded to T, and the matching attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, T - n:] = 1
        ids[b, :T - n] = 0
    return ids, mask


# ---------------------------------------------------------------- independent reference (the seed's formulation)

def ref_rmsnorm(x, weight, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def ref_freqs_cis(head_dim, positions, theta=1e4):
    """Complex rotations e^{i * pos * theta^(-2k/d)}, one per channel pair, as the seed precomputes them."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(positions.float(), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def ref_rope(x, freqs_cis):
    """x: (B, T, H, hd). Channels (2k, 2k+1) form one complex number, multiplied by the rotation."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3).type_as(x)


def ref_repeat_kv(x, n_rep):
    B, T, H, D = x.shape
    return x[:, :, :, None, :].expand(B, T, H, n_rep, D).reshape(B, T, H * n_rep, D)


def ref_swiglu(x, sd, p):
    return (F.silu(x @ sd[p + "w1.weight"].T) * (x @ sd[p + "w3.weight"].T)) @ sd[p + "w2.weight"].T


def ref_moe(x, sd, p, cfg):
    """Mixture of experts one token at a time: softmax router, top-k, renormalised weights, plus shared expert."""
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        probs = (x[n] @ sd[p + "gate.weight"].T).softmax(-1)
        w, idx = probs.topk(cfg.num_experts_per_tok)
        if cfg.num_experts_per_tok > 1 and cfg.norm_topk_prob:
            w = w / w.sum()
        for wj, j in zip(w, idx.tolist()):
            out[n] += wj * ref_swiglu(x[n], sd, f"{p}experts.{j}.")
        if cfg.n_shared_experts:
            out[n] += ref_swiglu(x[n], sd, p + "shared_experts.")
    return out


def ref_forward(model, ids):
    """Logits of the whole decoder from its state dict, written the way the seed's model.py computes them."""
    cfg, sd = model.config, model.state_dict()
    B, T = ids.shape
    H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.dim // cfg.n_heads
    freqs_cis = ref_freqs_cis(hd, torch.arange(T), cfg.rope_theta)
    causal = torch.full((T, T), float("-inf")).triu(1)
    h = sd["tok_embeddings.weight"][ids]
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        x = ref_rmsnorm(h, sd[p + "attention_norm.weight"], cfg.norm_eps)
        q = (x @ sd[p + "attention.wq.weight"].T).view(B, T, H, hd)
        k = (x @ sd[p + "attention.wk.weight"].T).view(B, T, KV, hd)
        v = (x @ sd[p + "attention.wv.weight"].T).view(B, T, KV, hd)
        q, k = ref_rope(q, freqs_cis), ref_rope(k, freqs_cis)
        k, v = ref_repeat_kv(k, H // KV), ref_repeat_kv(v, H // KV)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        att = ((q @ k.transpose(-2, -1)) / math.sqrt(hd) + causal).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, H * hd)
        h = h + y @ sd[p + "attention.wo.weight"].T
        x = ref_rmsnorm(h, sd[p + "ffn_norm.weight"], cfg.norm_eps)
        if cfg.use_moe:
            h = h + ref_moe(x.reshape(B * T, -1), sd, p + "feed_forward.", cfg).view(B, T, -1)
        else:
            h = h + ref_swiglu(x, sd, p + "feed_forward.")
    h = ref_rmsnorm(h, sd["norm.weight"], cfg.norm_eps)
    return h @ sd["output.weight"].T


def ref_aux_loss(x, gate_weight, cfg):
    """The seed's load-balancing loss for one MoE layer, from the layer input x (B, T, D)."""
    B, T, _ = x.shape
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    scores = (x @ gate_weight.T).softmax(-1)  # (B, T, E)
    idx = scores.topk(K, dim=-1).indices
    if cfg.seq_aux:
        total = 0.0
        for b in range(B):
            for e in range(E):
                ce = (idx[b] == e).sum().item() / (T * K / E)
                total += ce * scores[b, :, e].mean()
        return cfg.aux_loss_alpha * total / B
    fi = torch.tensor([(idx == e).sum().item() / (B * T * K) * E for e in range(E)])
    Pi = scores.reshape(-1, E).mean(0)
    return cfg.aux_loss_alpha * (Pi * fi).sum()


# ---------------------------------------------------------------- configuration and sizes

def n_params(config):
    with torch.device("meta"):
        return sum(p.numel() for p in Transformer(config).parameters())


def test_parameter_counts_match_the_published_sizes():
    assert LMConfig().hidden_dim == 1408
    assert n_params(LMConfig()) == 26_878_464
    assert n_params(preset("minimind-v1")) == 108_749_568
    assert n_params(preset("minimind-v1-moe")) == 96_100_864
    # and the same count from the formula, embedding counted once because the output layer is tied to it
    c = LMConfig()
    kv = c.dim * c.n_kv_heads // c.n_heads
    per_layer = 2 * c.dim * c.dim + 2 * c.dim * kv + 3 * c.dim * c.hidden_dim + 2 * c.dim
    assert c.vocab_size * c.dim + c.n_layers * per_layer + c.dim == 26_878_464


@pytest.mark.parametrize("fields, message", [
    (dict(dim=500, n_heads=16), "dim=500 is not divisible by n_heads=16"),
    (dict(n_heads=16, n_kv_heads=6), "n_heads=16 is not divisible by n_kv_heads=6"),
    (dict(dim=48, n_heads=16), "must be even"),
    (dict(use_moe=True, n_routed_experts=4, num_experts_per_tok=5), "num_experts_per_tok=5"),
    (dict(use_moe=True, scoring_func="sigmoid"), "scoring_func"),
])
def test_invalid_shapes_are_rejected_with_the_field_named(fields, message):
    with pytest.raises(ValueError, match=message):
        LMConfig(**fields)


# ---------------------------------------------------------------- maths against independent references

def test_rmsnorm_and_rotary_match_the_complex_number_formulation():
    torch.manual_seed(0)
    norm = RMSNorm(64, 1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(2, 5, 64)
    torch.testing.assert_close(norm(x), ref_rmsnorm(x, norm.weight), atol=ATOL, rtol=0)

    B, H, T, hd = 2, 3, 7, 16
    q = torch.randn(B, H, T, hd)
    positions = torch.arange(10, 10 + T)
    cos, sin = rotary_cos_sin(positions[None].expand(B, T), hd, 1e4, torch.float32)
    ref = ref_rope(q.transpose(1, 2), ref_freqs_cis(hd, positions)).transpose(1, 2)
    # the eager (complex) form and the real form used under torch.compile
    torch.testing.assert_close(apply_rotary(q, cos, sin), ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(apply_rotary_real(q, cos, sin), ref, atol=ATOL, rtol=0)
    # on a transposed (B, T, H, hd) -> (B, H, T, hd) view, as the attention passes it, and in bf16
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    torch.testing.assert_close(apply_rotary(qt, cos, sin), ref, atol=ATOL, rtol=0)
    bf = apply_rotary(q.bfloat16(), cos, sin)
    assert bf.dtype == torch.bfloat16
    torch.testing.assert_close(bf.float(), apply_rotary_real(q.bfloat16(), cos, sin).float(), atol=1e-6, rtol=8e-3)


@pytest.mark.parametrize("flash", [True, False])
@pytest.mark.parametrize("moe", [False, True])
def test_whole_model_matches_seed_style_reference(flash, moe):
    model = make(tiny(flash_attn=flash, **(MOE if moe else {})))
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref_forward(model, ids), atol=ATOL, rtol=0)


def llama_from(model):
    """A transformers LlamaForCausalLM with our weights; q/k rows are permuted per head from interleaved
    rotary pairs (2k, 2k+1) to Llama's rotate_half halves (k, k + hd/2)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    c = model.config
    hd = c.dim // c.n_heads
    cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.hidden_dim,
                      num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
                      rms_norm_eps=c.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
                      max_position_embeddings=c.max_seq_len, tie_word_embeddings=True, attention_bias=False,
                      mlp_bias=False, pad_token_id=0)
    llama = LlamaForCausalLM._from_config(cfg, attn_implementation="eager").eval()
    perm = torch.cat([torch.arange(0, hd, 2), torch.arange(1, hd, 2)])

    def rope_rows(w):
        return w.view(-1, hd, w.shape[-1])[:, perm].reshape_as(w)

    sd = model.state_dict()
    new = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"],
           "lm_head.weight": sd["output.weight"]}
    for i in range(c.n_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        new |= {q + "self_attn.q_proj.weight": rope_rows(sd[p + "attention.wq.weight"]),
                q + "self_attn.k_proj.weight": rope_rows(sd[p + "attention.wk.weight"]),
                q + "self_attn.v_proj.weight": sd[p + "attention.wv.weight"],
                q + "self_attn.o_proj.weight": sd[p + "attention.wo.weight"],
                q + "mlp.gate_proj.weight": sd[p + "feed_forward.w1.weight"],
                q + "mlp.up_proj.weight": sd[p + "feed_forward.w3.weight"],
                q + "mlp.down_proj.weight": sd[p + "feed_forward.w2.weight"],
                q + "input_layernorm.weight": sd[p + "attention_norm.weight"],
                q + "post_attention_layernorm.weight": sd[p + "ffn_norm.weight"]}
    missing, unexpected = llama.load_state_dict(new, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    assert llama.lm_head.weight.data_ptr() == llama.model.embed_tokens.weight.data_ptr()
    return llama


@pytest.mark.parametrize("flash", [True, False])
def test_dense_model_matches_transformers_llama(flash):
    model = make(tiny(flash_attn=flash))
    llama = llama_from(model)
    ids = torch.randint(3, 128, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, llama(ids).logits, atol=ATOL, rtol=0)
        # left padding: Llama is given explicit positions that skip the pads, ours derives them from the mask
        ids, mask = left_padded([12, 7], 12, 128)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        ours = model(ids, attention_mask=mask).logits
        theirs = llama(ids, attention_mask=mask, position_ids=pos).logits
        real = mask.bool()
        torch.testing.assert_close(ours[real], theirs[real], atol=ATOL, rtol=0)


@pytest.mark.parametrize("moe", [False, True])
def test_flash_and_math_attention_agree(moe):
    flash = make(tiny(flash_attn=True, **(MOE if moe else {})))
    math_model = clone_with(flash, flash_attn=False)
    assert not math_model.layers[0].attention.flash
    ids, mask = left_padded([10, 4, 7], 10, 128)
    with torch.no_grad():
        torch.testing.assert_close(flash(ids).logits, math_model(ids).logits, atol=ATOL, rtol=0)
        a = flash(ids, attention_mask=mask).logits
        b = math_model(ids, attention_mask=mask).logits
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
        torch.testing.assert_close(a[mask.bool()], b[mask.bool()], atol=ATOL, rtol=0)


@pytest.mark.parametrize("flash, moe", [(True, False), (False, False), (True, True)])
def test_causality_later_tokens_never_change_earlier_logits(flash, moe):
    model = make(tiny(flash_attn=flash, **(MOE if moe else {})))
    ids = torch.randint(3, 128, (1, 12))
    with torch.no_grad():
        base = model(ids).logits
        for t in (3, 8, 11):
            changed = ids.clone()
            changed[0, t:] = (changed[0, t:] + 17) % 125 + 3
            out = model(changed).logits
            torch.testing.assert_close(out[:, :t], base[:, :t], atol=ATOL, rtol=0)
            assert not torch.allclose(out[:, t], base[:, t])


@pytest.mark.parametrize("flash", [True, False])
def test_left_padding_does_not_change_real_positions(flash):
    model = make(tiny(flash_attn=flash))
    lengths = [9, 5, 2]
    ids, mask = left_padded(lengths, 9, 128)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
        for b, n in enumerate(lengths):
            alone = model(ids[b:b + 1, 9 - n:]).logits[0]
            torch.testing.assert_close(batch[b, 9 - n:], alone, atol=ATOL, rtol=0)


# ---------------------------------------------------------------- KV cache

def incremental_logits(model, ids, mask, prefill, cache_kwarg):
    out = model(ids[:, :prefill], attention_mask=mask[:, :prefill], use_cache=True)
    logits, cache = [out.logits], out.cache
    for t in range(prefill, ids.shape[1]):
        out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], use_cache=True, **{cache_kwarg: cache})
        logits.append(out.logits)
        cache = out.cache
    assert cache.get_seq_length() == ids.shape[1]
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("flash, moe, cache_kwarg", [
    (True, False, "cache"), (False, False, "past_key_values"), (True, True, "cache"), (False, True, "cache")])
def test_incremental_decoding_equals_full_forward(flash, moe, cache_kwarg):
    model = make(tiny(flash_attn=flash, **(MOE if moe else {})))
    ids, mask = left_padded([6, 11, 3], 14, 128, seed=1)
    # the short rows gain their real tokens during decoding too
    mask[:, 11:] = 1
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        step = incremental_logits(model, ids, mask, prefill=8, cache_kwarg=cache_kwarg)
    real = mask.bool()
    torch.testing.assert_close(step[real], full[real], atol=ATOL, rtol=0)


# ---------------------------------------------------------------- mixture of experts

def test_moe_dispatch_equals_per_token_loop():
    torch.manual_seed(0)
    cfg = tiny(**MOE)
    ffn = MoEFeedForward(cfg)
    for p in ffn.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(3, 7, cfg.dim)
    sd = {k: v.detach() for k, v in ffn.state_dict().items()}
    with torch.no_grad():
        ours = ffn.eval()(x)
        ref = ref_moe(x.reshape(-1, cfg.dim), sd, "", cfg).view_as(x)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    # every expert really got tokens in this draw, so the grouping was exercised
    idx = (x.reshape(-1, cfg.dim) @ sd["gate.weight"].T).topk(2).indices
    assert idx.unique().numel() == cfg.n_routed_experts


def test_moe_training_and_inference_paths_agree():
    model = make(tiny(**MOE))
    ids = torch.randint(3, 128, (2, 10))
    with torch.no_grad():
        eval_logits = model(ids).logits
        model.train()
        train_out = model(ids)
    torch.testing.assert_close(train_out.logits, eval_logits, atol=ATOL, rtol=0)
    assert train_out.aux_loss is not None


@pytest.mark.parametrize("seq_aux", [True, False])
def test_moe_aux_loss_follows_the_seed_definition(seq_aux):
    model = make(tiny(seq_aux=seq_aux, **MOE)).train()
    inputs = []
    hooks = [layer.feed_forward.register_forward_hook(lambda m, a, o: inputs.append(a[0].detach()))
             for layer in model.layers]
    ids = torch.randint(3, 128, (3, 10))
    labels = ids.clone()
    labels[0, :4] = -100
    out = model(ids, labels=labels)
    for h in hooks:
        h.remove()
    expected = sum(ref_aux_loss(x, layer.feed_forward.gate.weight.detach(), model.config)
                   for x, layer in zip(inputs, model.layers))
    torch.testing.assert_close(out.aux_loss.detach(), torch.as_tensor(expected, dtype=torch.float32), atol=1e-7, rtol=1e-5)
    assert out.aux_loss.requires_grad  # it trains the router
    ce = manual_loss(out.logits.detach(), labels)
    torch.testing.assert_close(out.loss.detach(), ce + out.aux_loss.detach(), atol=1e-6, rtol=0)
    # inference: no aux loss, the loss is the cross-entropy alone
    model.eval()
    with torch.no_grad():
        out = model(ids, labels=labels)
    assert out.aux_loss is None
    torch.testing.assert_close(out.loss, manual_loss(out.logits, labels), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- loss

def manual_loss(logits, labels):
    """Mean over the positions whose next token is a real target (not -100, not the pad id 0)."""
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            target = labels[b, t + 1].item()
            if target in (-100, 0):
                continue
            total += -logits[b, t].double().log_softmax(-1)[target]
            count += 1
    return (total / count).float()


def test_loss_is_shifted_cross_entropy_ignoring_pad_and_minus_100():
    model = make(tiny())
    ids = torch.randint(3, 128, (3, 10))
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt that carries no loss
    labels[1, 7:] = 0  # right padding
    labels[2, 2] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
    torch.testing.assert_close(out.loss, manual_loss(out.logits, labels), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- checkpoints

def seed_keys(n_layers, moe=False, n_experts=4, shared=True):
    """The state-dict names of the published v1 .pth files (DESIGN §3)."""
    keys = ["tok_embeddings.weight", "norm.weight", "output.weight"]
    for i in range(n_layers):
        p = f"layers.{i}."
        keys += [f"{p}attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")]
        keys += [f"{p}attention_norm.weight", f"{p}ffn_norm.weight"]
        if moe:
            keys += [f"{p}feed_forward.experts.{j}.{w}.weight" for j in range(n_experts) for w in ("w1", "w2", "w3")]
            keys += [f"{p}feed_forward.gate.weight"]
            if shared:
                keys += [f"{p}feed_forward.shared_experts.{w}.weight" for w in ("w1", "w2", "w3")]
        else:
            keys += [f"{p}feed_forward.{w}.weight" for w in ("w1", "w2", "w3")]
    return keys


def test_state_dict_has_exactly_the_seed_names_and_shapes():
    with torch.device("meta"):
        dense, moe = Transformer(LMConfig()), Transformer(preset("minimind-v1-moe"))
    sd = dense.state_dict()
    assert sorted(sd) == sorted(seed_keys(8))
    assert sorted(moe.state_dict()) == sorted(seed_keys(8, moe=True))
    assert sd["tok_embeddings.weight"].shape == (6400, 512)
    assert sd["layers.0.attention.wq.weight"].shape == (512, 512)
    assert sd["layers.0.attention.wk.weight"].shape == (256, 512)
    assert sd["layers.0.feed_forward.w1.weight"].shape == (1408, 512)
    assert sd["layers.0.feed_forward.w2.weight"].shape == (512, 1408)
    assert moe.state_dict()["layers.0.feed_forward.gate.weight"].shape == (4, 512)
    # the shape of a published file is recovered from its tensors alone
    for model in (dense, moe):
        found = infer_config(model.state_dict())
        for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "use_moe",
                      "n_routed_experts", "n_shared_experts"):
            assert getattr(found, field) == getattr(model.config, field), field


@pytest.mark.parametrize("moe", [False, True])
def test_published_style_pth_with_compile_prefix_loads_strictly(tmp_path, moe):
    model = make(tiny(**(MOE if moe else {})))
    state = {"_orig_mod." + k: v for k, v in model.state_dict().items()}
    path = tmp_path / ("pretrain_512_moe.pth" if moe else "pretrain_512.pth")
    torch.save(state, path)  # no JSON sidecar, like the published files
    loaded = load_model(path, n_heads=4)
    assert loaded.config.use_moe == moe and loaded.config.n_kv_heads == 2
    assert loaded.output.weight.data_ptr() == loaded.tok_embeddings.weight.data_ptr()
    ids = torch.randint(3, 128, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_pth_without_sidecar_says_the_head_count_is_assumed(tmp_path, capsys):
    model = make(tiny())
    torch.save(model.state_dict(), tmp_path / "copied.pth")  # copied without its .json
    assumed = load_model(tmp_path / "copied.pth")
    err = capsys.readouterr().err
    assert "copied.pth has no copied.json" in err and f"assumed to be {assumed.config.n_heads}" in err
    assert len(err.strip().splitlines()) == 1
    load_model(tmp_path / "copied.pth", n_heads=4)  # told: nothing to warn about
    assert capsys.readouterr().err == ""


def test_state_dict_mismatches_raise_naming_the_problem(tmp_path):
    model = make(tiny())
    good = model.state_dict()

    missing = {k: v for k, v in good.items() if k != "layers.1.attention.wv.weight"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing \['layers.1.attention.wv.weight'\]"):
        load_model(tmp_path / "missing.pth", n_heads=4)

    extra = {**good, "layers.0.attention.bogus.weight": torch.zeros(2)}
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="unexpected.*layers.0.attention.bogus.weight"):
        load_model(tmp_path / "extra.pth", n_heads=4)

    save_weights(model, tmp_path / "ours.pth")  # with sidecar: the requested shape may disagree
    assert json.loads((tmp_path / "ours.json").read_text())["hidden_dim"] == 96
    with pytest.raises(CheckpointError, match="hidden_dim: checkpoint 96 vs requested 128"):
        load_model(tmp_path / "ours.pth", hidden_dim=128)
    with pytest.raises(CheckpointError, match="n_kv_heads: checkpoint 2 vs requested 4"):
        load_model(tmp_path / "ours.pth", n_kv_heads=4)
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nothing.pth")
    (tmp_path / "broken.pth").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_model(tmp_path / "broken.pth")


def test_sidecar_round_trip_keeps_config_and_logits(tmp_path):
    model = make(tiny(**MOE, seq_aux=False))
    save_weights(model, tmp_path / "full_sft_512_moe.pth")
    loaded = load_model(tmp_path / "full_sft_512_moe.pth")
    assert loaded.config.seq_aux is False and loaded.config.n_heads == 4
    ids = torch.randint(3, 128, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)


LOAD_REMOTE = textwrap.dedent("""
    import sys, torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(1)  # same reduction order as the test process, so logits are bit-identical
    ids = torch.load(sys.argv[1], weights_only=True)
    for folder, out in zip(sys.argv[2::2], sys.argv[3::2]):
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            torch.save(model(ids).logits, out)
""")


def test_save_pretrained_loads_with_auto_class_offline_elsewhere(tmp_path):
    import os
    ids = torch.randint(3, 128, (2, 7))
    torch.save(ids, tmp_path / "ids.pt")
    args, expected = [], []
    for name, cfg in (("dense", tiny()), ("moe", tiny(**MOE))):
        model = make(cfg)
        model.save_pretrained(tmp_path / name)
        assert (tmp_path / name / "model.safetensors").is_file()
        assert {"model.py", "LMConfig.py"} <= {p.name for p in (tmp_path / name).iterdir()}
        with torch.no_grad():
            expected.append(model(ids).logits)
        args += [str(tmp_path / name), str(tmp_path / f"{name}.pt")]
    (tmp_path / "load.py").write_text(LOAD_REMOTE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    run = subprocess.run([sys.executable, "load.py", str(tmp_path / "ids.pt"), *args], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    for name, want in zip(("dense", "moe"), expected):
        torch.testing.assert_close(torch.load(tmp_path / f"{name}.pt", weights_only=True), want, atol=0, rtol=0)


# ---------------------------------------------------------------- generation

def gen_model(**overrides):
    model = make(tiny(**overrides))
    model.generation_config.eos_token_id = None  # run to max_new_tokens unless a test asks for eos
    model.generation_config.pad_token_id = 0
    return model


def argmax_loop(model, ids, n, penalty=1.0):
    """Greedy decoding with a full forward per step (no cache), and the CTRL repetition penalty by hand."""
    ids = ids.clone()
    with torch.no_grad():
        for _ in range(n):
            logits = model(ids).logits[:, -1]
            if penalty != 1.0:
                for b in range(ids.shape[0]):
                    for tok in set(ids[b].tolist()):
                        v = logits[b, tok]
                        logits[b, tok] = v * penalty if v < 0 else v / penalty
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("moe", [False, True])
def test_greedy_generate_equals_manual_argmax_loop(moe):
    model = gen_model(**(MOE if moe else {}))
    prompt = torch.randint(3, 128, (1, 5))
    expected = argmax_loop(model, prompt, 12)
    for use_cache in (True, False):
        out = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=use_cache)
        assert out.tolist() == expected.tolist()


def test_greedy_generate_on_left_padded_batch_matches_each_prompt_alone():
    model = gen_model()
    ids, mask = left_padded([7, 3], 7, 128, seed=2)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    for b, n in enumerate([7, 3]):
        alone = argmax_loop(model, ids[b:b + 1, 7 - n:], 8)
        assert out[b, 7:].tolist() == alone[0, n:].tolist()


def test_sampling_is_seeded_and_stays_within_top_k():
    model = gen_model()
    prompt = torch.randint(3, 128, (1, 4))
    kw = dict(max_new_tokens=15, do_sample=True, temperature=1.5, top_k=5, top_p=0.95)
    torch.manual_seed(123)
    a = model.generate(prompt, **kw)
    torch.manual_seed(123)
    b = model.generate(prompt, **kw)
    assert a.tolist() == b.tolist()
    torch.manual_seed(7)
    c = model.generate(prompt, **{**kw, "top_k": 50, "top_p": 1.0})
    assert c.tolist() != a.tolist()
    with torch.no_grad():
        logits = model(a).logits[0]
    for t in range(4, a.shape[1]):
        assert a[0, t].item() in logits[t - 1].topk(5).indices.tolist()
    # a vanishing nucleus leaves only the most likely token: greedy
    torch.manual_seed(0)
    nucleus = model.generate(prompt, max_new_tokens=10, do_sample=True, top_p=1e-6, top_k=0)
    assert nucleus.tolist() == argmax_loop(model, prompt, 10).tolist()


def test_repetition_penalty_matches_manual_definition():
    model = gen_model()
    prompt = torch.randint(3, 128, (1, 6))
    out = model.generate(prompt, max_new_tokens=12, do_sample=False, repetition_penalty=1.8)
    assert out.tolist() == argmax_loop(model, prompt, 12, penalty=1.8).tolist()
    assert out.tolist() != argmax_loop(model, prompt, 12).tolist()


def test_eos_stops_generation():
    model = gen_model()
    prompt = torch.randint(3, 128, (1, 5))
    free = argmax_loop(model, prompt, 12)[0, 5:].tolist()
    stop_at = next(i for i in range(2, 12) if free[i] not in free[:i])
    out = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=free[stop_at])
    assert out[0, 5:].tolist() == free[:stop_at + 1]


def test_streamer_receives_every_generated_token():
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.reshape(-1).tolist())

        def end(self):
            self.ended = True

    model = gen_model()
    prompt = torch.randint(3, 128, (1, 5))
    streamer = Collect()
    out = model.generate(prompt, max_new_tokens=9, do_sample=False, streamer=streamer)
    assert streamer.ended and streamer.chunks[0] == prompt[0].tolist()
    assert sum(streamer.chunks[1:], []) == out[0, 5:].tolist()


def test_text_iterator_streamer_with_a_tokenizer():
    """A byte-level BPE trained here (the project's own tokenizer is tested elsewhere) feeds TextIteratorStreamer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, TextIteratorStreamer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(["长江是中国最长的河流。", "The Yangtze is the longest river in China."] * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<unk>")
    model = make(tiny(vocab_size=len(tok)))
    model.generation_config.pad_token_id = 0
    prompt = tok("长江是", return_tensors="pt")
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    result = {}
    worker = threading.Thread(target=lambda: result.update(out=model.generate(
        **prompt, max_new_tokens=10, do_sample=False, streamer=streamer)))
    worker.start()
    text = "".join(streamer)
    worker.join()
    new = result["out"][0, prompt["input_ids"].shape[1]:]
    assert text == tok.decode(new, skip_special_tokens=True)
    assert len(new) >= 1


# ---------------------------------------------------------------- peft

def test_peft_lora_wraps_the_model_and_trains():
    from peft import LoraConfig, get_peft_model
    model = make(tiny())
    ids = torch.randint(3, 128, (2, 8))
    with torch.no_grad():
        base = model(ids).logits
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                                            target_modules=["wq", "wk", "wv", "wo", "w1", "w2", "w3"]))
    wrapped = [n for n, _ in lora.named_modules() if n.endswith(("wq", "w2"))]
    assert len(wrapped) == 2 * model.config.n_layers
    lora.eval()
    with torch.no_grad():  # LoRA starts as the identity (B = 0)
        torch.testing.assert_close(lora(input_ids=ids).logits, base, atol=ATOL, rtol=0)
    lora.train()
    out = lora(input_ids=ids, labels=ids)
    out.loss.backward()
    trainable = {n: p for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.grad is not None for n, p in trainable.items() if "lora_B" in n)
    assert all(p.grad is None for p in lora.parameters() if not p.requires_grad)
    torch.optim.SGD(trainable.values(), lr=1.0).step()
    lora.eval()
    with torch.no_grad():
        assert not torch.allclose(lora(input_ids=ids).logits, base, atol=1e-4)
