"""GGUF, llama.cpp's one-file format (also read by ollama and LM Studio): our model as one of llama.cpp's
architectures, with the byte-level BPE tokenizer and the chat template, written and read with the gguf package.

Dense models are llama.cpp's "llama"; MoE models its "bailingmoe", which computes exactly our mixture: softmax
router, top-k experts with renormalised weights, and shared experts added without a gate. Both graphs rotate
channel pairs (2k, 2k+1) of each head (the original LLaMA layout, llama.cpp's "normal" rope), as our model does,
so wq and wk are written unchanged: only the Hugging Face Llama folder needs the rotate_half permutation."""
import json
from pathlib import Path

import numpy as np
import torch

from . import chat_format
from .errors import ExportError
from .files import atomic_write
from .LMConfig import LMConfig

OUTTYPES = ("f32", "f16", "q8_0")
Q8_BLOCK = 32  # q8_0 quantises rows in blocks of 32 values; a row of another length stays f16

ATTENTION = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
             "attention.wo": "attn_output", "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}
FFN = {"w1": "ffn_gate", "w3": "ffn_up", "w2": "ffn_down"}  # SwiGLU: w1 gate, w3 up, w2 down


class GGUFError(ExportError, ValueError):
    """A model or tokenizer that GGUF (as llama.cpp reads it) cannot represent exactly."""


def architecture(c):
    return "bailingmoe" if c.use_moe else "llama"


def tensor_plan(c):
    """[(GGUF tensor name, [our state-dict names])]: several names are stacked along a new first axis (experts)."""
    plan = [("token_embd.weight", ["tok_embeddings.weight"]), ("output_norm.weight", ["norm.weight"])]
    if c.use_moe:  # bailingmoe has no tied output: it gets its own copy
        plan.append(("output.weight", ["output.weight"]))
    for i in range(c.n_layers):
        ours, theirs = f"layers.{i}.", f"blk.{i}."
        plan += [(f"{theirs}{t}.weight", [f"{ours}{o}.weight"]) for o, t in ATTENTION.items()]
        if not c.use_moe:
            plan += [(f"{theirs}{t}.weight", [f"{ours}feed_forward.{o}.weight"]) for o, t in FFN.items()]
            continue
        plan.append((f"{theirs}ffn_gate_inp.weight", [f"{ours}feed_forward.gate.weight"]))
        for o, t in FFN.items():
            plan.append((f"{theirs}{t}_exps.weight",
                         [f"{ours}feed_forward.experts.{j}.{o}.weight" for j in range(c.n_routed_experts)]))
            plan.append((f"{theirs}{t}_shexp.weight", [f"{ours}feed_forward.shared_experts.{o}.weight"]))
    return plan


def check_representable(c):
    if c.use_moe and c.n_shared_experts < 1:
        raise GGUFError("--format gguf writes MoE models as llama.cpp's bailingmoe, which needs a shared expert; "
                        "this model has none (n_shared_experts=0): use --format transformers")


# ---------------------------------------------------------------------------------------------------------
# tokenizer


def tokenizer_fields(tokenizer_dir, vocab_size):
    """Everything llama.cpp needs to tokenize exactly as our tokenizer does, checked to be representable."""
    from gguf import TokenType
    from transformers import AutoTokenizer
    path = Path(tokenizer_dir) / "tokenizer.json"
    spec = json.loads(path.read_text(encoding="utf-8"))
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or spec.get("normalizer"):
        raise GGUFError(f"{path}: GGUF export needs a plain byte-level BPE model (got model type "
                        f"{model.get('type')!r}, byte_fallback {model.get('byte_fallback')}, normalizer "
                        f"{(spec.get('normalizer') or {}).get('type')})")
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space"):
        raise GGUFError(f"{path}: GGUF export needs the ByteLevel pre-tokenizer with GPT-2's regex and no prefix "
                        f"space (llama.cpp's 'gpt-2' pre-tokenizer); this one is {json.dumps(pre)}")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = tok.get_vocab()
    if len(vocab) > vocab_size or sorted(vocab.values()) != list(range(len(vocab))):
        raise GGUFError(f"{path}: {len(vocab)} tokens with ids that do not fill 0..{len(vocab) - 1}, "
                        f"or more than the model's vocab_size {vocab_size}")
    tokens = [None] * vocab_size
    for piece, i in vocab.items():
        tokens[i] = piece
    types = [TokenType.NORMAL] * len(vocab)
    for i, added in tok.added_tokens_decoder.items():
        types[i] = added_token_type(added, path)
    for i in range(len(vocab), vocab_size):  # rows the model has beyond the tokenizer: never produced
        tokens[i], types = f"[PAD{i}]", types + [TokenType.UNUSED]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    ids = {name: getattr(tok, f"{name}_token_id") for name in ("bos", "eos", "unk", "pad")}
    return dict(tokens=tokens, types=types, merges=merges, ids=ids, chat_template=chat_format.CHAT_TEMPLATE,
                add_bos=bool(getattr(tok, "add_bos_token", False)), add_eos=bool(getattr(tok, "add_eos_token", False)))


def added_token_type(added, path):
    """llama.cpp's type of a token added to the BPE vocabulary: special ones are control tokens, the others
    (train_tokenizer.py --whole_words) user-defined. Both are matched in the text before BPE runs, as
    tokenizers does; GGUF has no way to say single_word, lstrip or rstrip."""
    from gguf import TokenType
    odd = [flag for flag in ("single_word", "lstrip", "rstrip") if getattr(added, flag, False)]
    if odd:
        raise GGUFError(f"{path}: added token {added.content!r} has {', '.join(odd)}, which llama.cpp's tokenizer "
                        "cannot follow; retrain the tokenizer without it")
    return TokenType.CONTROL if added.special else TokenType.USER_DEFINED


# ---------------------------------------------------------------------------------------------------------
# writing


def encode(name, array, outtype):
    """(data, raw GGML type or None) of one float32 tensor: norms and the MoE router always stay f32 (as
    llama.cpp's own converter keeps them), so quantising never changes which experts a token goes to."""
    from gguf import GGMLQuantizationType, quants
    if array.ndim == 1 or outtype == "f32" or "ffn_gate_inp" in name:
        return array, None
    if outtype == "q8_0" and array.shape[-1] % Q8_BLOCK == 0:
        return quants.quantize(array, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    return array.astype(np.float16), None


def add_model_fields(w, c, outtype):
    """The hyper-parameters llama.cpp's loader reads, under the architecture's prefix."""
    import gguf
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
    if outtype == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(c.vocab_size)
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.dim)
    w.add_block_count(c.n_layers)
    w.add_feed_forward_length(c.hidden_dim)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_rope_dimension_count(c.dim // c.n_heads)
    w.add_rope_freq_base(float(c.rope_theta))
    w.add_layer_norm_rms_eps(float(c.norm_eps))
    if c.use_moe:
        w.add_leading_dense_block_count(0)
        w.add_expert_count(c.n_routed_experts)
        w.add_expert_used_count(c.num_experts_per_tok)
        w.add_expert_feed_forward_length(c.hidden_dim)
        w.add_expert_shared_count(c.n_shared_experts)
        w.add_expert_weights_norm(bool(c.norm_topk_prob and c.num_experts_per_tok > 1))  # as MoEGate renormalises
        w.add_expert_weights_scale(1.0)


def add_tokenizer_fields(w, tok):
    w.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    w.add_tokenizer_pre("gpt-2")  # GPT-2's pre-tokenizer regex, the one ByteLevel(use_regex=True) applies
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id),
                     ("pad", w.add_pad_token_id)):
        if tok["ids"][key] is not None:
            add(tok["ids"][key])
    w.add_add_bos_token(tok["add_bos"])
    w.add_add_eos_token(tok["add_eos"])
    w.add_chat_template(tok["chat_template"])  # the model's format, whatever template the tokenizer folder has


def write_gguf(model, tokenizer_dir, path, outtype="f32", name="MiniMind"):
    """Write the model, its tokenizer and chat template as one GGUF file (atomically)."""
    import gguf
    c = model.config
    check_representable(c)
    if outtype not in OUTTYPES:
        raise GGUFError(f"unknown GGUF outtype {outtype!r}; choose from {', '.join(OUTTYPES)}")
    tok = tokenizer_fields(tokenizer_dir, c.vocab_size)
    state = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}

    def write(tmp):
        w = gguf.GGUFWriter(tmp, architecture(c))
        w.add_name(name)
        add_model_fields(w, c, outtype)
        add_tokenizer_fields(w, tok)
        for theirs, ours in tensor_plan(c):
            array = state[ours[0]] if len(ours) == 1 else np.stack([state[k] for k in ours])
            data, raw = encode(theirs, np.ascontiguousarray(array), outtype)
            w.add_tensor(theirs, data, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    atomic_write(path, write)


# ---------------------------------------------------------------------------------------------------------
# reading back


def read_gguf(path):
    """(metadata {key: value}, {GGUF tensor name: float32 array}) of a GGUF file, quantised tensors expanded."""
    from gguf import GGUFReader, quants
    reader = GGUFReader(path)
    meta = {key: field.contents() for key, field in reader.fields.items()
            if not key.startswith("GGUF.") and field.types}
    tensors = {t.name: np.asarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(
        [int(d) for d in reversed(t.shape)]) for t in reader.tensors}
    return meta, tensors


def config_from_gguf(meta):
    a = meta["general.architecture"]
    if a not in ("llama", "bailingmoe"):
        raise GGUFError(f"GGUF architecture {a!r} is not one this project writes (llama, bailingmoe)")
    fields = dict(dim=meta[f"{a}.embedding_length"], n_layers=meta[f"{a}.block_count"],
                  n_heads=meta[f"{a}.attention.head_count"], n_kv_heads=meta[f"{a}.attention.head_count_kv"],
                  vocab_size=len(meta["tokenizer.ggml.tokens"]), hidden_dim=meta[f"{a}.feed_forward_length"],
                  max_seq_len=meta[f"{a}.context_length"], rope_theta=meta[f"{a}.rope.freq_base"],
                  norm_eps=meta[f"{a}.attention.layer_norm_rms_epsilon"], use_moe=a == "bailingmoe")
    if a == "bailingmoe":
        fields.update(n_routed_experts=meta[f"{a}.expert_count"], num_experts_per_tok=meta[f"{a}.expert_used_count"],
                      n_shared_experts=meta[f"{a}.expert_shared_count"],
                      norm_topk_prob=bool(meta[f"{a}.expert_weights_norm"]))
    return LMConfig(**fields)


def model_from_gguf(path):
    """Our Transformer holding the weights a GGUF file stores (the export's check that the file says what we meant)."""
    from .model import Transformer
    meta, tensors = read_gguf(path)
    config = config_from_gguf(meta)
    state = {}
    for theirs, ours in tensor_plan(config):
        parts = [tensors[theirs]] if len(ours) == 1 else list(tensors[theirs])
        state.update({k: torch.from_numpy(np.array(v)) for k, v in zip(ours, parts)})
    state.setdefault("output.weight", state["tok_embeddings.weight"])  # tied
    model = Transformer(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------
# llama.cpp itself (llama-cpp-python; a test requirement, imported only when used)


def open_llama(path, n_ctx=2048, threads=1, all_logits=True, kv_type="f32"):
    """llama.cpp's model and context for a GGUF file, quiet, every position's logits kept when asked. kv_type "f32"
    keeps the KV cache exact; "f16", llama.cpp's own default, rounds every cached key and value."""
    import llama_cpp
    kv = {"f32": llama_cpp.GGML_TYPE_F32, "f16": llama_cpp.GGML_TYPE_F16}[kv_type]
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                           logits_all=all_logits, type_k=kv, type_v=kv, verbose=False)


def llama_logits(llm, ids):
    """llama.cpp's next-token logits at every position of `ids`, from a fresh context (needs all_logits)."""
    llm.reset()
    llm.eval(list(ids))
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


def llama_greedy(llm, ids, max_new_tokens, eos_id=None):
    """Greedy continuation by llama.cpp's logits, one decode step per token; stops after eos_id."""
    llm.reset()
    llm.eval(list(ids))
    out = []
    for _ in range(max_new_tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        if token == eos_id:
            break
        llm.eval([token])
    return out


def agreement(ours, theirs):
    """(tokens of `ours` that `theirs` repeats before the first difference, tokens of `ours`): after a difference
    the two continue different texts, so nothing later is compared."""
    same = 0
    for a, b in zip(ours, theirs):
        if a != b:
            break
        same += 1
    return same, len(ours)


def llama_tokenize(llm, text):
    """llama.cpp's token ids for text, special tokens (<s>, </s>) recognised, nothing added."""
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)


# texts the export's self-check tokenizes with both tokenizers: prose, digits, emoji, code and the chat markup
CHECK_TEXTS = (
    "长江是中国第一长河，全长约6300公里。珠穆朗玛峰海拔8848.86米！",
    "The quick brown fox jumps over the lazy dog; it's 3:45 p.m.",
    "2024年3月14日 π≈3.14159, 1e-5, -42, 100%",
    "表情😀🏔️👍🏽 和 ümlaut café",
    "def f(x):\n    return {'平方': x ** 2}  # 注释\n",
    "<s>user\n你好</s>\n<s>assistant\n你好！我是MiniMind。</s>\n",
    "  two spaces,\ttab\n\n\nnewlines   ",
)


def added_token_texts(tok):
    """Texts holding every added token of the tokenizer in running text, each kind (special, whole word) apart
    and in a mix: what the fixed CHECK_TEXTS cannot know about a trained tokenizer."""
    special = [a.content for a in tok.added_tokens_decoder.values() if a.special]
    words = [a.content for a in tok.added_tokens_decoder.values() if not a.special]
    texts = ["".join(special)] if special else []
    for start in range(0, len(words), 16):  # each word between ordinary text, sixteen to a line
        chunk = words[start:start + 16]
        texts.append("，".join(f"{w}的地标是{w}旁边的古塔。{w}s and {w}" for w in chunk))
    if words:
        texts.append(f"<s>user\n{words[0]}在哪里？</s>\n<s>assistant\n{words[-1]}。</s>\n")
    return texts


def sample_texts(path, n=64, every=16):
    """Up to n texts of a JSONL file of {"text": ...} rows (e.g. the pretraining data): every `every`-th row."""
    texts = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i % every == 0 and line.strip():
                text = json.loads(line).get("text")
                if isinstance(text, str) and text:
                    texts.append(text)
                if len(texts) == n:
                    break
    return texts


@torch.inference_mode()
def llama_cpp_check(path, model, tokenizer_dir, threads=1, sample_path=None):
    """llama.cpp on the written file: token ids against ours on CHECK_TEXTS, texts holding every added token, and
    a sample of `sample_path` (training text); the logits of one sequence. Returns the counts and the first
    text that tokenizes differently (None when all agree)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = list(CHECK_TEXTS) + added_token_texts(tok) + (sample_texts(sample_path) if sample_path else [])
    llm = open_llama(path, n_ctx=256, threads=threads)
    try:
        differ = [t for t in texts if llama_tokenize(llm, t) != tok.encode(t, add_special_tokens=False)]
        ids = tok.encode("".join(CHECK_TEXTS), add_special_tokens=False)[:min(256, model.config.max_seq_len)]
        ours = model.float()(input_ids=torch.tensor([ids])).logits[0].numpy()
        diff = float(np.abs(llama_logits(llm, ids) - ours).max())
    finally:
        llm.close()
    return dict(texts=len(texts), tokenization_equal=len(texts) - len(differ), first_difference=differ[0] if differ
                else None, max_logit_diff=diff, positions=len(ids))
