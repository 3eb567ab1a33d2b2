"""A terminal chat with a MiniMind server (my_openai_api.py) through the openai SDK: proof that a stock OpenAI
client works against it. Keeps the conversation history; streams answers unless --no-stream.

    python chat_openai_api.py                       # interactive; an empty line or Ctrl-D quits
    python chat_openai_api.py --once "长江有多长？"     # one exchange, then exit
"""
import argparse
import os
import sys

from openai import OpenAI, OpenAIError


def ask(client, args, history):
    """Send the history, print the answer as it arrives, and return it."""
    extra = {"top_k": args.top_k} if args.top_k else None
    sampling = {k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p)) if v is not None}
    common = dict(model=args.model, messages=history, max_tokens=args.max_tokens, extra_body=extra, **sampling)
    if args.no_stream:
        answer = client.chat.completions.create(**common).choices[0].message.content or ""
        print(answer, flush=True)
        return answer
    pieces = []
    for chunk in client.chat.completions.create(stream=True, **common):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
            print(pieces[-1], end="", flush=True)
    print(flush=True)
    return "".join(pieces)


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
    args = p.parse_args()

    for flag, text in (("--once", args.once), ("--system", args.system)):
        if text is not None and not is_text(text):
            sys.exit(f"error: {flag}: not valid UTF-8 text")
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
            history.append({"role": "assistant", "content": ask(client, args, history)})
            if args.once is not None:
                break
    except OpenAIError as e:
        sys.exit(f"error from {args.base_url}: {e}")


if __name__ == "__main__":
    main()
