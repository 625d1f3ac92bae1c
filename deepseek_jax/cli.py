"""``deepseek-jax``: a thin command line over the library API.

Each subcommand lives in ``deepseek_jax/commands/<name>.py`` with ``register(subparsers)``
adding its parser and setting ``func``. Errors a user can cause are :class:`DeepSeekError`, and
an ``OSError`` is the machine's (a path they gave, a full disk, a failing file system): both are
printed on one line, exit status 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys

from deepseek_jax import __version__, runtime
from deepseek_jax.errors import DeepSeekError

# The CLI contract: convert|export|verify|score|generate|chat|demo|plan|train. A name is listed
# here once its command exists.
COMMANDS = ("convert", "export", "verify", "score", "generate", "chat", "demo", "plan", "train")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepseek-jax", description="DeepSeek-V3 in JAX/Flax")
    parser.add_argument("--version", action="version", version=f"deepseek-jax {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"deepseek_jax.commands.{name}").register(sub)
    return parser


def _trained_model(path: str, say: bool = True) -> str:
    """``deepseek-jax train``'s output directory stands for the model it trained, ``OUT/hub``."""
    hub = os.path.join(path, "hub")
    if (os.path.isfile(os.path.join(path, "run.json")) and not os.path.isfile(os.path.join(path, "config.json"))
            and os.path.isfile(os.path.join(hub, "config.json"))):
        if say:   # (process 0's note: every host would print it)
            print(f"note: {path} is a training run's output: using its trained model, {hub}", file=sys.stderr)
        return hub
    if os.path.isfile(os.path.join(path, "run.json")) and not os.path.isfile(os.path.join(path, "config.json")):
        raise DeepSeekError(f"{path} is a training run's output that holds no trained model yet ({hub} is written "
                            "when the run ends; a run that stopped early can continue with train --resume)")
    return path


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:   # output in an encoding without some generated character (PYTHONIOENCODING=ascii): escape it
        sys.stdout.reconfigure(errors="backslashreplace")
    except (AttributeError, ValueError):   # (closed, or not a text stream we may reconfigure)
        pass
    rc = _run(args)
    if rc == 130 and runtime.in_several_processes():
        # One process of several interrupted (Ctrl-C) leaves at once: a normal exit waits in
        # jax.distributed's shutdown for peers that wait in a collective for it, and both hung until
        # killed. Gone, it ends the others' wait by their heartbeat timeout. (Errors are met by every
        # process alike, mostly: their normal exits meet in that shutdown, and an early exit of
        # process 0, the coordinator, would abort the others with JAX's fatal-error trace.)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(rc)
    return rc


def _run(args: argparse.Namespace) -> int:
    try:
        say = runtime.may_be_main(args) if hasattr(args, "process_id") else True
        if args.command in ("generate", "chat", "score") and isinstance(getattr(args, "ckpt", None), str):
            args.ckpt = _trained_model(args.ckpt, say)
        for flag in ("init", "config") if args.command in ("train", "plan") else ():   # (a further fine-tune)
            if isinstance(getattr(args, flag, None), str) and os.path.isdir(getattr(args, flag)):
                setattr(args, flag, _trained_model(getattr(args, flag), say))
        # Contexts a command enters for its whole run (e.g. the device mesh) close with it.
        with contextlib.ExitStack() as args.exit_stack:
            return int(args.func(args) or 0)
    except DeepSeekError as e:
        print(f"deepseek-jax {args.command}: {runtime.process_label()}error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:   # the output's reader stopped early (``| head``): nothing to report
        sys.stderr.close()
        return 141
    except OSError as e:      # a path the user gave (missing, not a directory, not writable), a full disk
        print(f"deepseek-jax {args.command}: {runtime.process_label()}error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{runtime.process_label()}interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
