"""``deepseek-jax chat CKPT``: interactive multi-turn chat with history, streamed replies.

Reads stdin line by line (so it also works with piped input): each non-empty line is a user
turn; ``/clear`` forgets the conversation, ``/exit`` (or end of input) quits; any other line
starting with ``/`` and a word is an unknown command (start a message with ``//`` to send a
leading ``/``). The whole history
is rendered through the tokenizer's chat template at every turn and generated from, but only
the tokens the last turn's latent cache does not already hold are prefilled
(``Generator(reuse_prefix=True)``); replies go to stdout as they stream, notices and timings
to stderr. Turn n of a conversation (0, 1, ...; ``/clear`` starts again) samples with seed
``--seed + n``. A turn that cannot run (say, the
conversation no longer fits the model's length: ``/clear`` starts over) prints its error and the
session goes on; the exit status is then 1. On several hosts process 0 reads stdin and prints;
every process runs each of its lines.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from deepseek_jax import runtime
from deepseek_jax.commands import undecodable_byte
from deepseek_jax.commands.generate import add_sampling_args, load_generator, load_tokenizer, sampling_from_args
from deepseek_jax.errors import DeepSeekError

COMMANDS = ("/clear", "/exit")
_COMMAND_RE = re.compile(r"/[A-Za-z][\w-]*")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="interactive multi-turn chat (/clear, /exit)",
                       description="Chat with a checkpoint: one user message per input line; /clear resets "
                                   "the history, /exit quits (start a message with // to send a leading /). "
                                   "Exits with status 1 if a turn failed.")
    p.add_argument("ckpt", help="checkpoint directory with tokenizer.json and a chat template")
    p.add_argument("--system", metavar="TEXT", help="a system message at the start of the conversation")
    add_sampling_args(p)
    runtime.add_args(p)
    p.add_argument("--verbose", action="store_true", help="print tokens/s after each reply (stderr)")
    p.set_defaults(func=run)


def _broadcast_line(read_line) -> str:
    """Process 0's ``read_line()`` on every process: its UTF-8 bytes' length, then the bytes."""
    import numpy as np
    from jax.experimental import multihost_utils

    data = read_line().encode("utf-8", "surrogateescape") if runtime.is_main() else b""
    n = int(multihost_utils.broadcast_one_to_all(np.int32(len(data))))
    buf = np.zeros(max(n, 1), np.uint8)
    buf[:len(data)] = np.frombuffer(data, np.uint8)
    buf = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    return bytes(buf[:n].astype(np.uint8)).decode("utf-8", "surrogateescape")


def run(args: argparse.Namespace) -> int:
    from deepseek_jax.commands.generate import timing_line

    sampling = sampling_from_args(args)
    runtime.check_args(args)
    if os.path.isdir(args.ckpt) and not os.path.isfile(os.path.join(args.ckpt, "tokenizer.json")):
        raise DeepSeekError(f"no tokenizer.json in {args.ckpt}: chat needs the checkpoint's tokenizer "
                            "(tokenizer.json and a chat template)")
    if sys.stdin is None and runtime.may_be_main(args):   # (on several hosts process 0 reads it)
        raise DeepSeekError("chat reads its messages from stdin, which is closed")
    if args.system is not None and (bad := undecodable_byte(args.system)) is not None:
        raise DeepSeekError(f"--system is not UTF-8 text: byte 0x{bad[0]:02x} at character {bad[1]}")
    tokenizer = load_tokenizer(args.ckpt, required=True)
    if not tokenizer.has_chat_template:
        raise DeepSeekError(f"{args.ckpt}: tokenizer_config.json has no chat_template; chat needs one")
    tokenizer.check_chat_template()   # (before the model loads: every turn would fail)
    # each turn's prompt starts with the last one's prompt and reply: prefill only what is new
    gen = load_generator(args.ckpt, args.dtype, tokenizer, args, reuse_prefix=True)
    start = [{"role": "system", "content": args.system}] if args.system else []
    n_system = 0
    if start:   # every turn starts with it: too long, and no turn could run (nor /clear help)
        n = n_system = len(tokenizer.encode_chat(start + [{"role": "user", "content": ""}]))
        if n >= gen.max_len - 1:
            raise DeepSeekError(f"--system: the system message takes {n} tokens in the chat template; with a "
                                f"message and a reply it must stay under the model's max length {gen.max_len}")
    history = list(start)
    interactive = sys.stdin is not None and sys.stdin.isatty()
    try:   # UTF-8 whatever the locale; undecodable bytes reach the check below, line by line
        sys.stdin.reconfigure(encoding="utf-8", errors="surrogateescape")
    except (AttributeError, ValueError, OSError):   # (not a text stream we may reconfigure)
        pass
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    prompt_to_stdout = interactive and sys.stdout.isatty()   # (else replies only: >>> goes to stderr)
    first = True

    def read_line() -> str:
        """The next line of stdin ("" at its end), a byte-order mark starting it dropped."""
        nonlocal first
        if interactive:
            try:
                if prompt_to_stdout:
                    line = input(">>> ") + "\n"
                else:
                    print(">>> ", end="", file=sys.stderr, flush=True)
                    line = input() + "\n"
            except EOFError:
                print(file=sys.stdout if prompt_to_stdout else sys.stderr)   # (the shell's prompt on its own line)
                return ""
        else:
            line = sys.stdin.readline()
        if first:   # (a file saved by some editors starts with one: not part of the message)
            line, first = line.removeprefix("\ufeff"), False
        return line

    turn = failed = 0
    while True:
        # on several hosts process 0 reads stdin and every process takes its line (each reading its
        # own stdin, processes given other input waited on each other in a collective until JAX aborted)
        line = _broadcast_line(read_line) if runtime.in_several_processes() else read_line()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        bad = undecodable_byte(text)
        if bad is not None:   # (stdin's undecodable bytes, as Python escapes them)
            failed += 1
            print(f"deepseek-jax chat: error: this message is not UTF-8 text: byte 0x{bad[0]:02x} "
                  f"at character {bad[1]}", file=sys.stderr)
            continue
        if text.startswith("//"):
            text = text[1:]       # an escaped leading slash: a message, not a command
        elif _COMMAND_RE.fullmatch(text.split()[0]):
            cmd = text.split()[0]
            if cmd not in COMMANDS:
                print(f"unknown command {cmd} (commands: {', '.join(COMMANDS)}; start a message with // to "
                      "send a leading /)", file=sys.stderr)
                continue
            if text != cmd:
                print(f"{cmd} takes no arguments", file=sys.stderr)
                continue
            if cmd == "/exit":
                break
            history, turn = list(start), 0   # (a new conversation samples as a new session would)
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
            if len(prompt) >= gen.max_len:
                failed += 1
                more = len(history) > len(start)   # earlier turns: /clear makes room
                what = "the conversation is too long" if more else "this message is too long"
                with_what = (" with this message" if more else
                             f" with the system message's {n_system}" if n_system else "")
                print(f"deepseek-jax chat: error: {what}: {len(prompt)} tokens{with_what}"
                      f", at most {gen.max_len - 1} fit the model's max length {gen.max_len}"
                      f"{'; /clear to start over' if more else ''}", file=sys.stderr)
                continue
            result = gen.generate([prompt], max_new_tokens=args.max_new_tokens, sampling=sampling,
                                  seed=(args.seed + turn) % 2 ** 32, stream=stream, speculative=args.speculative)[0]
        except DeepSeekError as e:
            failed += 1
            print(f"deepseek-jax chat: error: {e}", file=sys.stderr)
            continue
        sys.stdout.write(decoder.flush() + "\n")
        sys.stdout.flush()
        room = gen.max_len - len(prompt)
        if result.finish_reason == "length" and room < args.max_new_tokens:
            print(f"note: the reply was cut at {len(result.output_ids)} tokens by the model's max length "
                  f"{gen.max_len} (the conversation has {len(prompt)}); /clear to start over", file=sys.stderr)
        if args.verbose:
            print(timing_line(gen.last_stats), file=sys.stderr)
        history = messages + [{"role": "assistant", "content": tokenizer.decode(result.output_ids)}]
        turn += 1
    if failed:
        print(f"deepseek-jax chat: {failed} turn(s) failed", file=sys.stderr)
        return 1
    return 0
