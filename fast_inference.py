"""A web chat page for MiniMind (Streamlit): streamed answers, the conversation kept per browser session,
sampling controls in the sidebar. Several open pages share one model and are decoded in one batch. Thinking shows
in a collapsible block above the answer; with the demo's tools offered, each tool call and its result show as the
page runs them and sends the result back.

    streamlit run fast_inference.py -- --model out/full_sft_512.pth
"""
import argparse
import json
import os
import sys

import streamlit as st

from model import chat_format
from model.checkpoint import load_model
from model.cli import add_model_args, sampling_type
from model.engine import Engine
from model.sampling import SamplingParams
from model.scheduler import Scheduler, single_torch_thread

DEFAULTS = SamplingParams()  # the sidebar's starting values


def cli_args():
    """Flags after `--` on the streamlit command line (unknown ones are ignored)."""
    p = argparse.ArgumentParser(add_help=False)
    add_model_args(p, default_model=os.environ.get("MINIMIND_MODEL", "out/full_sft_512.pth"))
    p.add_argument("--temperature", type=sampling_type("temperature", float), default=DEFAULTS.temperature,
                   help="the sidebar's starting value")
    p.add_argument("--tools", metavar="DEMO_DIR", nargs="?", const="dataset/demo", default=None,
                   help="start with the demo world's tools offered (the world of DEMO_DIR/manifest.json)")
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
        thinking = {"Model decides": None, "On": True, "Off": False}[
            st.radio("Thinking", ["Model decides", "On", "Off"], horizontal=True, key="thinking")]
        tools = st.toggle("Offer the demo's tools (lookup, calculate)", bool(args.tools), key="tools")
        world_dir = st.text_input("Demo world folder", args.tools or "dataset/demo", key="world_dir",
                                  disabled=not tools)
        if st.button("Clear the conversation", key="clear"):
            st.session_state.messages = []
    return model_path, tokenizer_path, params, multi_turn, thinking, (world_dir if tools else None)


@st.cache_resource(show_spinner="Rebuilding the demo world…", max_entries=2)
def load_demo_world(world_dir):
    from model.demo.tools import load_world
    return load_world(world_dir)


def show_message(m):
    """One stored message as the chat shows it: a thought folded away, tool calls, tool results."""
    if m["role"] == "tool":
        with st.chat_message("tool", avatar="🔧"):
            st.code(m["content"], language=None)
        return
    with st.chat_message(m["role"]):
        if m.get("reasoning_content"):
            with st.expander("💭 Thinking", expanded=False):
                st.markdown(m["reasoning_content"])
        if m.get("content"):
            st.markdown(m["content"])
        for call in m.get("tool_calls") or ():
            st.code(f"{call['name']}({json.dumps(call['arguments'], ensure_ascii=False)})", language=None)


def answer(scheduler, history, params, thinking, tools):
    """Stream one assistant turn: its thought into a folded block, its text into the chat; returns the message."""
    start = {True: chat_format.THINK_OPEN, False: chat_format.THINK_OFF}.get(thinking, "")
    reader = chat_format.ReplyReader(tools, start)
    turn = {"role": "assistant", "content": "", "reasoning_content": "", "tool_calls": []}
    prompt = chat_format.encoder_for(scheduler.engine.tokenizer).prompt(history, tools, thinking)
    with st.chat_message("assistant"):
        thought = st.empty()

        def text():
            for events in map(reader.feed, scheduler.stream(prompt, params)):
                yield from take(events)
            yield from take(reader.close())

        def take(events):
            for kind, value in events:
                if kind == "reasoning":
                    turn["reasoning_content"] += value
                    with thought.container():
                        with st.expander("💭 Thinking", expanded=False):
                            st.markdown(turn["reasoning_content"])
                elif kind == "content":
                    yield value
                else:
                    turn["tool_calls"].append(value)

        turn["content"] = st.write_stream(text()) or ""
        for call in turn["tool_calls"]:
            st.code(f"{call['name']}({json.dumps(call['arguments'], ensure_ascii=False)})", language=None)
    return {k: v for k, v in turn.items() if v or k == "content"}


def main():
    st.set_page_config(page_title="MiniMind", page_icon="🤖")
    args = cli_args()
    st.session_state.setdefault("messages", [])
    model_path, tokenizer_path, params, multi_turn, thinking, world_dir = sidebar(args)

    st.title("MiniMind 🤖")
    try:
        scheduler = load_scheduler(model_path, tokenizer_path, args.device, args.dim, args.n_layers, args.use_moe)
    except Exception as e:  # a wrong path in the sidebar: say so, keep the page usable
        st.error(f"Cannot load the model from {model_path!r}: {e}")
        st.stop()
    st.caption(f"{model_path} · context {scheduler.engine.max_len} tokens")

    world, tools = None, None
    if world_dir:
        from model.demo.tools import TOOLS
        try:
            world, tools = load_demo_world(world_dir), TOOLS
        except ValueError as e:
            st.error(str(e))
            st.stop()

    for m in st.session_state.messages:
        show_message(m)

    question = st.chat_input("Ask MiniMind something…")
    if question:
        messages = st.session_state.messages
        messages.append({"role": "user", "content": question})
        show_message(messages[-1])
        first = len(messages) - 1  # this exchange: the question, tool calls and results, the answer
        for _ in range(4):  # the answer, after at most three rounds of tool calls
            history = messages if multi_turn else messages[first:]
            messages.append(answer(scheduler, list(history), params, thinking, tools))
            if not messages[-1].get("tool_calls"):
                break
            from model.demo.tools import run_tool
            for call in messages[-1]["tool_calls"]:
                messages.append({"role": "tool", "content": run_tool(world, call)})
                show_message(messages[-1])


main()
