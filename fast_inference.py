"""A web chat page for MiniMind (Streamlit): streamed answers, the conversation kept per browser session,
sampling controls in the sidebar. Several open pages share one model and are decoded in one batch.

    streamlit run fast_inference.py -- --model out/full_sft_512.pth
"""
import argparse
import os
import sys

import streamlit as st

from model.checkpoint import load_model
from model.cli import add_model_args, sampling_type
from model.generate import Engine, SamplingParams, Scheduler, single_torch_thread

DEFAULTS = SamplingParams()  # the sidebar's starting values


def cli_args():
    """Flags after `--` on the streamlit command line (unknown ones are ignored)."""
    p = argparse.ArgumentParser(add_help=False)
    add_model_args(p, default_model=os.environ.get("MINIMIND_MODEL", "out/full_sft_512.pth"))
    p.add_argument("--temperature", type=sampling_type("temperature", float), default=DEFAULTS.temperature,
                   help="the sidebar's starting value")
    return p.parse_known_args(sys.argv[1:])[0]


@st.cache_resource(show_spinner="Loading the model…", max_entries=2)
def load_scheduler(model_path, tokenizer_path, device, dim=None, n_layers=None, use_moe=None):
    from transformers import AutoTokenizer
    threads = single_torch_thread()  # only the scheduler's thread runs parallel kernels
    model = load_model(model_path, device=device, dim=dim, n_layers=n_layers, use_moe=use_moe)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    return Scheduler(Engine(model, tokenizer, max_batch=4), threads=threads)


def sidebar(args):
    with st.sidebar:
        st.header("MiniMind")
        model_path = st.text_input("Model (.pth or exported folder)", args.model, key="model_path")
        tokenizer_path = st.text_input("Tokenizer folder", args.tokenizer, key="tokenizer_path")
        params = SamplingParams(
            temperature=st.slider("Temperature (0 = greedy)", 0.0, 2.0, args.temperature, 0.05, key="temperature"),
            top_p=st.slider("Top-p", 0.05, 1.0, DEFAULTS.top_p, 0.05, key="top_p"),
            top_k=int(st.number_input("Top-k (0 = off)", 0, 6400, DEFAULTS.top_k, key="top_k")),
            max_new_tokens=int(st.number_input("Max new tokens (-1 = up to the context)", -1, 1 << 20, -1,
                                               key="max_new_tokens")),
            repetition_penalty=st.slider("Repetition penalty", 1.0, 2.0, DEFAULTS.repetition_penalty, 0.05,
                                         key="repetition_penalty"),
        )
        multi_turn = st.toggle("Multi-turn (send the whole conversation)", True, key="multi_turn")
        if st.button("Clear the conversation", key="clear"):
            st.session_state.messages = []
    return model_path, tokenizer_path, params, multi_turn


def main():
    st.set_page_config(page_title="MiniMind", page_icon="🤖")
    args = cli_args()
    st.session_state.setdefault("messages", [])
    model_path, tokenizer_path, params, multi_turn = sidebar(args)

    st.title("MiniMind 🤖")
    try:
        scheduler = load_scheduler(model_path, tokenizer_path, args.device, args.dim, args.n_layers, args.use_moe)
    except Exception as e:  # a wrong path in the sidebar: say so, keep the page usable
        st.error(f"Cannot load the model from {model_path!r}: {e}")
        st.stop()
    st.caption(f"{model_path} · context {scheduler.engine.max_len} tokens")

    for m in st.session_state.messages:
        with st.chat_message(m["role"]):
            st.markdown(m["content"])

    question = st.chat_input("Ask MiniMind something…")
    if question:
        st.session_state.messages.append({"role": "user", "content": question})
        with st.chat_message("user"):
            st.markdown(question)
        history = st.session_state.messages if multi_turn else st.session_state.messages[-1:]
        with st.chat_message("assistant"):
            answer = st.write_stream(scheduler.stream(list(history), params))
        st.session_state.messages.append({"role": "assistant", "content": answer or ""})


main()
