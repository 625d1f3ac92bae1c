"""``deepseek-jax chat CKPT``: interactive multi-turn chat with history, streamed replies.

Reads stdin line by line (so it also works with piped input): each non-empty line is a user
turn; ``/clear`` forgets the conversation, ``/exit`` (or end of input) quits. The whole history
is rendered through the tokenizer's chat template at every turn and generated from, but only
the tokens the last turn's latent cache does not already hold are prefilled
(``Generator(reuse_prefix=True)``); replies go to stdout as they stream, notices and timings
to stderr. A turn that cannot run (say, the
conversation no longer fits the model's length) prints its error and the session goes on.
"""

from __future__ import annotations

import argparse
import sys

from deepseek_jax import runtime
from deepseek_jax.commands.generate import add_sampling_args, load_generator, load_tokenizer, sampling_from_args
from deepseek_jax.errors import DeepSeekError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="interactive multi-turn chat (/clear, /exit)",
                       description="Chat with a checkpoint: one user message per input line; /clear resets "
                                   "the history, /exit quits.")
    p.add_argument("ckpt", help="checkpoint directory with tokenizer.json and a chat template")
    p.add_argument("--system", metavar="TEXT", help="a system message at the start of the conversation")
    add_sampling_args(p)
    runtime.add_args(p)
    p.add_argument("--verbose", action="store_true", help="print tokens/s after each reply (stderr)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from deepseek_jax.commands.generate import timing_line

    sampling = sampling_from_args(args)
    tokenizer = load_tokenizer(args.ckpt, required=True)
    if not tokenizer.chat_template:
        raise DeepSeekError(f"{args.ckpt}: tokenizer_config.json has no chat_template; chat needs one")
    # each turn's prompt starts with the last one's prompt and reply: prefill only what is new
    gen = load_generator(args.ckpt, args.dtype, tokenizer, args, reuse_prefix=True)
    start = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    interactive = sys.stdin.isatty()
    turn = 0
    while True:
        if interactive:
            sys.stdout.write(">>> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/clear":
            history = list(start)
            print("[history cleared]", file=sys.stderr)
            continue
        messages = history + [{"role": "user", "content": text}]
        decoder = tokenizer.stream_decoder()

        def stream(row: int, ids: list[int]) -> None:
            piece = decoder.feed_many(ids)
            if piece:
                sys.stdout.write(piece)
                sys.stdout.flush()

        try:
            prompt = tokenizer.encode_chat(messages)
            result = gen.generate([prompt], max_new_tokens=args.max_new_tokens, sampling=sampling,
                                  seed=args.seed + turn, stream=stream, speculative=args.speculative)[0]
        except DeepSeekError as e:
            print(f"deepseek-jax chat: error: {e}", file=sys.stderr)
            continue
        sys.stdout.write(decoder.flush() + "\n")
        sys.stdout.flush()
        if args.verbose:
            print(timing_line(gen.last_stats), file=sys.stderr)
        history = messages + [{"role": "assistant", "content": tokenizer.decode(result.output_ids)}]
        turn += 1
    return 0
