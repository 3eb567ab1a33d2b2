"""export_model.py --format gguf checked by llama.cpp itself (llama-cpp-python): tokenization, greedy tokens and
logits against ours, the embedded chat template, chat answers against our API server, and every input kind."""
import json

import numpy as np
import openai
import pytest
import torch

import tiny_chat_model as tiny
from model import chat_format
from model.checkpoint import load_model, save_weights
from model.gguf_export import (agreement, llama_greedy, llama_logits, llama_tokenize, open_llama, read_gguf,
                               tensor_plan)
from test_eval_export import load_script, tiny_model
from serving_helpers import HANG_GUARD_S, paths, tokenizer  # noqa: F401  (fixtures: the tiny chat model)
from test_api import servers, url  # noqa: F401  (fixtures: our server)

TEXTS = {
    "chinese": "长江是中国第一长河，全长约6300公里，流经青藏高原、四川盆地和长江中下游平原。",
    "english": "The quick brown fox jumps over the lazy dog. It's 9 o'clock; we'll see, won't we?",
    "digits": "2024年3月14日 3.14159 1,000,000 -42 0x1F 1e-5 100% 12:30",
    "emoji": "😀🏔️👍🏽👨‍👩‍👧 ✨ 🇨🇳",
    "code": "def area(r):\n    return 3.14159 * r ** 2  # 圆的面积\n\nprint({'r': 2, \"a\": area(2)})\n",
    "chat": "系统提示<s>user\n你好</s>\n<s>assistant\n你好！</s>\n<s>user\nHello</s>\n<s>assistant\n",
    # our own prose, not in any training text of the shipped tokenizer
    "held_out": "黄河发源于青藏高原巴颜喀拉山脉北麓，自西向东流经九个省区，在山东垦利注入渤海。它携带大量泥沙，"
                "下游河床高出两岸地面，被称为“地上河”。",
    "whitespace": "  two spaces\tand a tab\n\n\nthree newlines   trailing",
    "mixed": "Café naïve 日本語のテキスト 한국어 Ünïcödé — «quotes» 「括弧」",
    "specials": "<unk><s></s></s>\n<s>",
}
N_NEW = 24


def chat(*turns, system=None):
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


@pytest.fixture(scope="module")
def model(paths):
    return load_model(paths[0])


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory, paths):
    """The tiny chat model exported by the CLI in each outtype (each export checks itself on the way)."""
    out, export = tmp_path_factory.mktemp("gguf"), load_script("export_model.py")
    files = {}
    for outtype in ("f32", "f16", "q8_0"):
        files[outtype] = out / f"tiny-{outtype}.gguf"
        export.main(["--model", str(paths[0]), "--tokenizer", str(paths[1]), "--out", str(files[outtype]),
                     "--format", "gguf", "--outtype", outtype])
    return files


@pytest.fixture(scope="module")
def prompts(tokenizer):
    """23 prompts: chat-formatted questions (trained, the seed's demo questions, multi-turn, a system text)
    and raw text to continue."""
    demo = load_script("2-eval.py").DEMO_QUESTIONS
    chats = [chat(q) for q, _ in tiny.CONVERSATIONS] + [chat(q) for q in demo] + [
        chat(tiny.CONVERSATIONS[0][0], tiny.CONVERSATIONS[0][1], tiny.CONVERSATIONS[1][0]),
        chat("Hello", "Hi! I am a tiny model.", "数一数"),
        chat("长江有多长？", system="你是一个乐于助人的助手。")]
    texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in chats]
    texts += ["长江是", "The quick brown", "一二三四", "你好！我是", "def main():\n", "珠穆朗玛峰，"]
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


@torch.inference_mode()
def ours_greedy(model, ids, n=N_NEW):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=2, pad_token_id=0)
    return out[0, len(ids):].tolist()


def compare(model, gguf, prompts, **llama_kw):
    """(greedy tokens matched, greedy tokens of ours, max |logit difference| over every position, exact prompts)."""
    llm = open_llama(gguf, n_ctx=512, **llama_kw)
    matched = total = exact = 0
    worst = 0.0
    try:
        for ids in prompts:
            ours = ours_greedy(model, ids)
            theirs = llama_greedy(llm, ids, N_NEW, eos_id=2)
            m, t = agreement(ours, theirs)
            matched, total, exact = matched + m, total + t, exact + (ours == theirs)
            full = ids + ours
            with torch.inference_mode():
                logits = model(torch.tensor([full])).logits[0].numpy()
            worst = max(worst, float(np.abs(llama_logits(llm, full) - logits).max()))
    finally:
        llm.close()
    return matched, total, worst, exact


# ---------------------------------------------------------------------------------------------------------
# tokenizer and template


def test_tokenization_equals_ours(ggufs, tokenizer):
    llm = open_llama(ggufs["f32"], n_ctx=64, all_logits=False)
    equal = 0
    for name, text in TEXTS.items():
        ours = tokenizer.encode(text, add_special_tokens=False)
        theirs = llama_tokenize(llm, text)
        assert theirs == ours, name
        assert llm.detokenize(theirs, special=True).decode("utf-8") == text, name  # byte-exact round trip
        equal += 1
    llm.close()
    print(f"tokenization: {equal}/{len(TEXTS)} texts equal")


def test_embedded_chat_template_renders_like_ours(ggufs, tokenizer):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    meta, _ = read_gguf(ggufs["f32"])
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template == chat_format.CHAT_TEMPLATE
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"],
            meta["tokenizer.ggml.padding_token_id"], meta["tokenizer.ggml.add_bos_token"]) == (1, 2, 0, False)
    llm = open_llama(ggufs["f32"], n_ctx=512, all_logits=False)
    assert llm.chat_format == "chat_template.default"  # create_chat_completion renders with the file's template
    messages = chat("长江有多长？", "约6300公里。", "Hello", "Hi!", "泰山在哪里？", system="你是MiniMind。")
    formatter = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"], eos_token="</s>",
                                    bos_token="<s>")
    rendered = formatter(messages=messages).prompt
    assert rendered == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("</s>\n<s>user\n泰山在哪里？</s>\n<s>assistant\n") and rendered.startswith("你是MiniMind。")
    reply = llm.create_chat_completion(messages=messages, temperature=0, max_tokens=1)
    assert reply["usage"]["prompt_tokens"] == len(tokenizer.encode(rendered, add_special_tokens=False))
    # a tool conversation (tools offered, a call, its result, a thought): llama.cpp renders what the format says
    from test_chat_format import TOOL_CHATS, TOOLS
    for conversation in TOOL_CHATS:
        ours = chat_format.render(conversation, TOOLS, add_generation_prompt=True)
        assert formatter(messages=conversation, tools=TOOLS).prompt == ours
        reply = llm.create_chat_completion(messages=conversation, tools=TOOLS, temperature=0, max_tokens=1)
        assert reply["usage"]["prompt_tokens"] == len(chat_format.encoder_for(tokenizer).prompt(conversation, TOOLS))
    llm.close()


# ---------------------------------------------------------------------------------------------------------
# weights: f32 exact, f16 close


def test_f32_greedy_tokens_and_logits_equal_ours(ggufs, model, prompts):
    matched, total, worst, exact = compare(model, ggufs["f32"], prompts)
    print(f"f32: {exact}/{len(prompts)} prompts identical, {matched}/{total} greedy tokens, max |logit diff| "
          f"{worst:.3g}")
    assert len(prompts) >= 20 and exact == len(prompts) and matched == total
    assert worst <= 1e-3


def test_f16_and_q8_0_agree_mostly(ggufs, model, prompts):
    results = {t: compare(model, ggufs[t], prompts) for t in ("f16", "q8_0")}
    for t, (matched, total, worst, exact) in results.items():
        print(f"{t}: {exact}/{len(prompts)} prompts identical, {matched}/{total} greedy tokens "
              f"({matched / total:.1%}), max |logit diff| {worst:.3g}")
    matched, total, _, _ = results["f16"]
    assert matched / total >= 0.9


# ---------------------------------------------------------------------------------------------------------
# chat answers: llama.cpp's create_chat_completion against our OpenAI-compatible server


@pytest.mark.slow  # our server's process
def test_chat_answers_equal_our_server(ggufs, url):
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=HANG_GUARD_S)
    llm = open_llama(ggufs["f32"], n_ctx=512, all_logits=False)
    questions = load_script("2-eval.py").DEMO_QUESTIONS + [q for q, _ in tiny.CONVERSATIONS]
    same = 0
    for q in questions:
        messages = chat(q)
        ours = client.chat.completions.create(model="minimind", messages=messages, temperature=0, max_tokens=40)
        theirs = llm.create_chat_completion(messages=messages, temperature=0, max_tokens=40, repeat_penalty=1.0)
        assert theirs["choices"][0]["message"]["content"] == ours.choices[0].message.content, q
        assert theirs["choices"][0]["finish_reason"] == ours.choices[0].finish_reason, q
        same += 1
    llm.close()
    print(f"chat answers: {same}/{len(questions)} equal to my_openai_api.py at temperature 0")


# ---------------------------------------------------------------------------------------------------------
# inputs: our .pth, a published v1 .pth, an exported folder of either kind; MoE; errors


def test_every_input_gives_the_same_file(tmp_path, paths, model, ggufs, prompts):
    export = load_script("export_model.py")
    run = lambda src, out, *extra: export.main(["--model", str(src), "--tokenizer", str(paths[1]),  # noqa: E731
                                                "--out", str(out), *extra])
    run(paths[0], tmp_path / "hf", "--format", "transformers")
    run(tmp_path / "hf", tmp_path / "hf.gguf", "--format", "gguf")
    run(paths[0], tmp_path / "llama", "--format", "llama")
    run(tmp_path / "llama", tmp_path / "llama.gguf", "--format", "gguf")  # the rotary permutation undone
    for name in ("hf.gguf", "llama.gguf"):
        assert (tmp_path / name).read_bytes() == ggufs["f32"].read_bytes(), name

    # a published v1 .pth: seed key names, torch.compile prefix, no sidecar, shape from the tensors (16 heads)
    v1_model = tiny_model(model.config.vocab_size, seed=3, n_heads=16, n_kv_heads=8)
    v1 = tmp_path / "full_sft_512.pth"
    torch.save({"_orig_mod." + k: v for k, v in v1_model.state_dict().items()}, v1)
    run(v1, tmp_path / "v1.gguf", "--format", "gguf")
    meta, _ = read_gguf(tmp_path / "v1.gguf")
    assert (meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]) == (16, 8)
    matched, total, worst, exact = compare(v1_model, tmp_path / "v1.gguf", prompts[:4])
    assert exact == 4 and worst <= 1e-3


def test_moe_runs_as_bailingmoe(tmp_path, tokenizer, prompts):
    """Our MoE (softmax router, renormalised top-2, one ungated shared expert) in llama.cpp's bailingmoe graph."""
    moe = tiny_model(len(tokenizer), seed=5, use_moe=True)
    path = tmp_path / "moe.pth"
    save_weights(moe, path)
    out = tmp_path / "moe.gguf"
    load_script("export_model.py").main(["--model", str(path), "--tokenizer", str(tiny.SHIPPED_TOKENIZER),
                                         "--out", str(out), "--format", "gguf"])
    meta, tensors = read_gguf(out)
    assert meta["general.architecture"] == "bailingmoe" and meta["bailingmoe.expert_weights_norm"] is True
    assert set(tensors) == {name for name, _ in tensor_plan(moe.config)}
    matched, total, worst, exact = compare(moe, out, prompts[:8])
    print(f"MoE f32: {exact}/8 prompts identical, {matched}/{total} greedy tokens, max |logit diff| {worst:.3g}")
    assert exact == 8 and worst <= 1e-3


def test_export_errors_are_one_line(tmp_path, tokenizer, ggufs):
    export = load_script("export_model.py")
    no_shared = tmp_path / "moe0.pth"
    save_weights(tiny_model(len(tokenizer), use_moe=True, n_shared_experts=0), no_shared)
    keep = tmp_path / "notes.gguf"  # not a GGUF file: never replaced
    keep.write_text("mine")
    bad_tok = tmp_path / "tok"
    bad_tok.mkdir()
    for name in ("tokenizer_config.json",):
        (bad_tok / name).write_bytes((tiny.SHIPPED_TOKENIZER / name).read_bytes())
    spec = json.loads((tiny.SHIPPED_TOKENIZER / "tokenizer.json").read_text(encoding="utf-8"))
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
    (bad_tok / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    dense = tmp_path / "dense.pth"
    save_weights(tiny_model(len(tokenizer)), dense)
    cases = [([str(no_shared), str(tmp_path / "moe0.gguf")], "needs a shared expert"),
             ([str(dense), str(keep)], "refusing to replace"),
             ([str(dense), str(tmp_path / "x.gguf"), "--tokenizer", str(bad_tok)], "tokenizer.json: GGUF export"),
             ]
    for (src, out, *extra), expected in cases:
        with pytest.raises(SystemExit) as e:
            export.main(["--model", src, "--tokenizer", str(tiny.SHIPPED_TOKENIZER), "--out", out, "--format",
                         "gguf", *extra])
        assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert keep.read_text() == "mine" and not (tmp_path / "x.gguf").exists() and not (tmp_path / "moe0.gguf").exists()
    with pytest.raises(SystemExit):  # --outtype belongs to gguf
        export.main(["--model", str(dense), "--out", str(tmp_path / "f"), "--outtype", "f16"])


# ---------------------------------------------------------------------------------------------------------
# the demo's tokenizer: every made-up name is one added whole-word token


@pytest.fixture(scope="module")
def demo_tokenizer(tmp_path_factory):
    """The demo's data and a tokenizer trained on it as demo.py trains one (2000 tokens, names kept whole)."""
    from model.demo.world import generate
    train_tokenizer = load_script("train_tokenizer.py")
    data, out = tmp_path_factory.mktemp("demo_data"), tmp_path_factory.mktemp("demo_tokenizer")
    generate(str(data), seed=42)
    names = train_tokenizer.read_words(data / "names.txt")
    train_tokenizer.train(str(data / "tokenizer.jsonl"), str(out), 2000, 0, names)
    return data, out, names


def test_the_demo_tokenizer_exports_exactly(tmp_path, demo_tokenizer, capsys):
    from transformers import AutoTokenizer
    data, tok_dir, names = demo_tokenizer
    tok = AutoTokenizer.from_pretrained(tok_dir)
    pth, gguf_path = tmp_path / "full_sft_64.pth", tmp_path / "demo.gguf"
    model = tiny_model(len(tok))
    save_weights(model, pth)
    load_script("export_model.py").main(["--model", str(pth), "--tokenizer", str(tok_dir), "--out", str(gguf_path),
                                         "--format", "gguf", "--check_data", str(data / "pretrain.jsonl")])
    said = capsys.readouterr().out
    checked = int(said.split("tokenization equal on ")[1].split("/")[0])
    assert f"tokenization equal on {checked}/{checked} texts" in said and checked > 7 + len(names) // 16
    meta, _ = read_gguf(gguf_path)
    types = meta["tokenizer.ggml.token_type"]
    from model import chat_format
    assert sum(t == 4 for t in types) == len(names) and sum(t == 3 for t in types) == 3  # user-defined, control
    # every held-out and SFT question as a chat prompt, and every name alone: the same ids as ours
    rows = [json.loads(line) for f in ("eval_pretrain.jsonl", "eval_sft.jsonl")
            for line in (data / f).read_text(encoding="utf-8").splitlines()]
    prompts = [tok.apply_chat_template([{"role": "user", "content": r.get("prompt") or r["question"]}],
                                       tokenize=False, add_generation_prompt=True) for r in rows]
    prompts += [chat_format.render(r["conversations"], r.get("tools"), enable_thinking=r.get("enable_thinking"))
                for r in map(json.loads, (data / "sft_tools.jsonl").read_text(encoding="utf-8").splitlines()[:40])]
    llm = open_llama(gguf_path, n_ctx=512)
    try:
        differ = [t for t in prompts + names if llama_tokenize(llm, t) != tok.encode(t, add_special_tokens=False)]
        assert not differ, f"{len(differ)}/{len(prompts) + len(names)} differ, e.g. {differ[:3]}"
        assert all(len(tok.encode(n, add_special_tokens=False)) == 1 for n in names)
        for text in prompts[:: max(1, len(prompts) // 8)]:  # greedy answers: llama.cpp's are ours
            ids = tok.encode(text, add_special_tokens=False)
            assert llama_greedy(llm, ids, N_NEW, eos_id=2) == ours_greedy(model, ids), text
    finally:
        llm.close()
