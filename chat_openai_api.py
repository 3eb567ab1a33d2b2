"""A terminal chat with a MiniMind server (my_openai_api.py) through the openai SDK: proof that a stock OpenAI
client works against it. Keeps the conversation history; streams answers unless --no-stream. Thinking
(reasoning_content) is shown apart; with --tools the demo world's tools are offered and run here, their results
sent back, until the model answers (the whole tool loop, as any OpenAI client runs it).

    python chat_openai_api.py                       # interactive; an empty line or Ctrl-D quits
    python chat_openai_api.py --once "长江有多长？"     # one exchange, then exit
    python chat_openai_api.py --tools --once "12*7等于多少？"
"""
import argparse
import json
import os
import sys

from openai import LengthFinishReasonError, OpenAI, OpenAIError

from model.errors import UserError, run


def ask(client, args, history):
    """Send the history, print the answer as it arrives (thought 💭 apart, tool calls 🔧), and return it as an
    assistant message the history can take back."""
    extra = {"top_k": args.top_k} if args.top_k else {}
    if args.thinking != "auto":
        extra["chat_template_kwargs"] = {"enable_thinking": args.thinking == "on"}
    sampling = {k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p)) if v is not None}
    tools = {"tools": args.tool_list} if args.tool_list else {}
    common = dict(model=args.model, messages=history, max_tokens=args.max_tokens, extra_body=extra or None,
                  **sampling, **tools)
    if args.no_stream:
        message = client.chat.completions.create(**common).choices[0].message
    else:
        shown = None
        try:
            with client.chat.completions.stream(**common) as stream:  # the SDK assembles streamed tool calls
                for event in stream:
                    if event.type == "chunk" and event.chunk.choices:
                        thought = (event.chunk.choices[0].delta.model_extra or {}).get("reasoning_content")
                        if thought:
                            shown = show("💭 ", thought, shown)
                    elif event.type == "content.delta":
                        shown = show("", event.delta, shown)
                message = stream.get_final_completion().choices[0].message
        except LengthFinishReasonError as e:  # an answer cut at max_tokens is still an answer
            message = e.completion.choices[0].message
        print(flush=True)
    reasoning = (message.model_extra or {}).get("reasoning_content")
    if args.no_stream:
        print((f"💭 {reasoning}\n" if reasoning else "") + (message.content or ""), flush=True)
    for call in message.tool_calls or ():
        print(f"🔧 {call.function.name}({call.function.arguments})", flush=True)
    return message.model_dump(exclude_none=True, include={"role", "content", "tool_calls"})


def show(label, text, shown):
    """Print streamed text under its label (a new line when the kind changes); returns the kind now shown."""
    if label != shown:
        print(("\n" if shown is not None else "") + label, end="")
    print(text, end="", flush=True)
    return label


def answer_with_tools(client, args, history):
    """Ask; while the model calls tools, run them here and send the results back (at most three rounds)."""
    for _ in range(4):
        message = ask(client, args, history)
        history.append(message)
        if not message.get("tool_calls"):
            return
        for call in message["tool_calls"]:
            try:
                arguments = json.loads(call["function"]["arguments"])
            except ValueError:
                arguments = None
            result = args.run_tool(args.world, {"name": call["function"]["name"], "arguments": arguments})
            print(f"   → {result}", flush=True)
            history.append({"role": "tool", "tool_call_id": call["id"], "content": result})


def is_text(s):
    """False for a string holding undecodable bytes of the command line (Python keeps them as lone surrogates)."""
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8998/v1")
    p.add_argument("--api-key", default=os.environ.get("MINIMIND_API_KEY", "none"),
                   help="the server's --api-key (default: env MINIMIND_API_KEY)")
    p.add_argument("--model", default=None, help="model id (default: the first one the server lists)")
    p.add_argument("--system", default=None, help="a system message put before the conversation")
    p.add_argument("--once", metavar="QUESTION", default=None, help="ask one question, print the answer, exit")
    p.add_argument("--no-stream", action="store_true", help="wait for whole answers instead of streaming")
    p.add_argument("--single-turn", action="store_true", help="forget earlier turns (default: keep the history)")
    p.add_argument("--temperature", type=float, default=None, help="default: the server's")
    p.add_argument("--top_p", type=float, default=None, help="default: the server's")
    p.add_argument("--top_k", type=int, default=0, help="server extension; 0 = off")
    p.add_argument("--max_tokens", type=int, default=-1, help="-1: up to the model's context limit")
    p.add_argument("--tools", metavar="DEMO_DIR", nargs="?", const="dataset/demo", default=None,
                   help="offer the demo world's lookup and calculate tools (the world of DEMO_DIR/manifest.json, "
                   "default dataset/demo) and run them here when the model calls them")
    p.add_argument("--thinking", choices=("auto", "on", "off"), default="auto",
                   help="auto: the model decides; on / off: chat_template_kwargs.enable_thinking")
    args = p.parse_args()
    args.world, args.tool_list = None, None
    if args.tools:  # the demo's tools live in the project; a plain chat needs only the openai SDK
        from model.demo.tools import TOOLS, load_world, run_tool
        args.run_tool = run_tool
        try:
            args.world, args.tool_list = load_world(args.tools), TOOLS
        except ValueError as e:
            p.error(str(e))

    for flag, text in (("--once", args.once), ("--system", args.system)):
        if text is not None and not is_text(text):
            raise UserError(f"{flag}: not valid UTF-8 text")
    client = OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0)
    try:
        args.model = args.model or client.models.list().data[0].id
        start = [{"role": "system", "content": args.system}] if args.system else []
        history = list(start)
        while True:
            if args.once is not None:
                question = args.once
            else:
                try:
                    question = input("\n👶: ").strip()
                except EOFError:
                    break
                except UnicodeDecodeError:
                    print("error: that line is not valid UTF-8 text; type it again", file=sys.stderr)
                    continue
                if not question:
                    break
                print("🤖: ", end="", flush=True)
            if args.single_turn:
                history = list(start)
            history.append({"role": "user", "content": question})
            answer_with_tools(client, args, history)
            if args.once is not None:
                break
    except OpenAIError as e:
        raise UserError(f"{args.base_url}: {e}") from None


if __name__ == "__main__":
    run(main, exit_code=1)
