"""Regenerates the reference parts of ``docs/cli.md`` from the CLI's argparse parsers.

    python tools/make_cli_docs.py            # rewrite the generated blocks of docs/cli.md in place
    python tools/make_cli_docs.py --check    # change nothing; exit 1 (with a diff) if they are stale

``docs/cli.md`` is prose written by hand around generated blocks: each subcommand's section holds
one block between ``<!-- BEGIN GENERATED: NAME -->`` and ``<!-- END GENERATED: NAME -->`` (its
description, usage line and flag tables), and the overview table sits between the markers named
``overview``. Only the blocks are rewritten; everything outside them is kept. A subcommand without
a section gets a new one appended at the end (add prose to it by hand); a block whose subcommand is
gone is removed, with a warning to delete its section's prose. ``tests/test_docs.py`` fails when
the file is stale or a flag is documented that no parser has (and the reverse).

Output does not depend on the machine: help texts that show the user's home directory or terminal
width are normalised (``~``, 100 columns).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "cli.md"
PROG = "deepseek-jax"
WIDTH = 100

BEGIN = "<!-- BEGIN GENERATED: {} -->"
END = "<!-- END GENERATED: {} -->"
BLOCK_RE = re.compile(r"<!-- BEGIN GENERATED: ([\w-]+) -->\n.*?<!-- END GENERATED: \1 -->\n?", re.S)

HEADER = f"""# Command line: `{PROG}`

Every subcommand, every flag. The flag tables are generated from the argparse parsers by
`tools/make_cli_docs.py`; the text around them is written by hand.

"""


@contextlib.contextmanager
def _portable_env():
    """Builds parsers whose help texts do not name this machine's home or cache directories."""
    saved = dict(os.environ)
    try:
        for var in ("DEEPSEEK_JAX_CACHE", "XDG_CACHE_HOME"):
            os.environ.pop(var, None)
        os.environ["HOME"] = "~"
        os.environ["COLUMNS"] = str(WIDTH)
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def command_parsers() -> dict[str, argparse.ArgumentParser]:
    """``{name: parser}`` of every subcommand, in the CLI's order."""
    sys.path.insert(0, str(ROOT))
    from deepseek_jax.cli import build_parser

    with _portable_env():
        parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise SystemExit("deepseek_jax.cli.build_parser() has no subcommands")


def command_help(name: str) -> str:
    """The one-line help a subcommand has in ``deepseek-jax --help``."""
    from deepseek_jax.cli import build_parser

    with _portable_env():
        parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                if choice.dest == name:
                    return choice.help or ""
    return ""


def documented_actions(parser: argparse.ArgumentParser):
    """The parser's actions that the docs list (everything but ``--help``)."""
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _value(action: argparse.Action) -> str:
    if action.nargs == 0 or not action.option_strings:
        return ""
    if action.choices is not None:
        return "`" + "\\|".join(str(c) for c in action.choices) + "`"
    metavar = action.metavar or (action.dest if not action.option_strings else action.dest.upper())
    if isinstance(metavar, tuple):
        metavar = " ".join(metavar)
    return f"`{metavar}`"


def _default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if action.nargs == 0 or action.default in (None, argparse.SUPPRESS) or action.default == []:
        return ""
    return f"`{action.default}`"


def _exclusive_note(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    for group in parser._mutually_exclusive_groups:
        if action in group._group_actions:
            others = [a.option_strings[0] for a in group._group_actions if a is not action and a.option_strings]
            return (f"; excludes {', '.join(f'`{o}`' for o in others)}"
                    + ("; one of the group is required" if group.required else ""))
    return ""


def _table(parser: argparse.ArgumentParser, actions) -> list[str]:
    formatter = parser._get_formatter()
    lines = ["| flag | value | default | description |", "|---|---|---|---|"]
    for a in actions:
        name = ", ".join(f"`{o}`" for o in a.option_strings) if a.option_strings else f"`{a.metavar or a.dest}`"
        helptext = formatter._expand_help(a) if a.help else ""
        lines.append(f"| {name} | {_value(a)} | {_default(a)} | {_cell(helptext)}{_exclusive_note(parser, a)} |")
    return lines


def command_block(name: str, parser: argparse.ArgumentParser) -> str:
    """The generated part of one subcommand's section."""
    with _portable_env():
        formatter = parser._get_formatter()
        formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups, prefix="")
        usage = formatter.format_help().strip()
    out = []
    if parser.description:
        out += [" ".join(parser.description.split()), ""]
    out += ["```text", usage, "```", ""]
    listed = set()
    default_titles = ("positional arguments", "options", "optional arguments")
    groups = [("", [a for g in parser._action_groups if g.title in default_titles for a in g._group_actions])]
    groups += [(g.title, g._group_actions) for g in parser._action_groups if g.title not in default_titles]
    for title, group_actions in groups:
        actions = [a for a in group_actions if not isinstance(a, argparse._HelpAction)]
        if not actions:
            continue
        if title:
            out += [f"*{title}:*", ""]
        out += _table(parser, actions) + [""]
        listed.update(id(a) for a in actions)
    assert all(id(a) in listed for a in documented_actions(parser)), name
    return "\n".join(out).rstrip() + "\n"


def overview_block(parsers: dict[str, argparse.ArgumentParser]) -> str:
    lines = ["| command | what it does |", "|---|---|"]
    for name in parsers:
        anchor = f"{PROG}-{name}"
        lines.append(f"| [`{name}`](#{anchor}) | {_cell(command_help(name))} |")
    return "\n".join(lines) + "\n"


def _wrap(name: str, body: str) -> str:
    return f"{BEGIN.format(name)}\n{body}{END.format(name)}\n"


def render(existing: str | None, parsers: dict[str, argparse.ArgumentParser]) -> tuple[str, list[str]]:
    """The new text of docs/cli.md and a list of warnings."""
    blocks = {"overview": overview_block(parsers)}
    blocks.update({name: command_block(name, p) for name, p in parsers.items()})
    warnings = []
    fresh = existing is None
    if fresh:
        existing = HEADER + "## Commands\n\n" + _wrap("overview", "") + "\n"
    seen = set()

    def replace(m: re.Match) -> str:
        name = m.group(1)
        if name not in blocks:
            warnings.append(f"subcommand {name!r} is gone: its generated block was removed; "
                            f"delete the rest of its section in {DOC.relative_to(ROOT)} by hand")
            return ""
        seen.add(name)
        return _wrap(name, blocks[name])

    text = BLOCK_RE.sub(replace, existing)
    for name in blocks:
        if name not in seen:
            if name == "overview":
                text = text.rstrip("\n") + "\n\n## Commands\n\n" + _wrap(name, blocks[name])
            else:
                text = text.rstrip("\n") + f"\n\n## `{PROG} {name}`\n\n" + _wrap(name, blocks[name])
            if not fresh:
                warnings.append(f"added a section for {name!r} at the end: move it and add prose by hand")
    return text, warnings


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/cli.md is not up to date")
    ap.add_argument("--output", type=Path, default=DOC, help="the file (default docs/cli.md)")
    args = ap.parse_args(argv)
    existing = args.output.read_text(encoding="utf-8") if args.output.exists() else None
    text, warnings = render(existing, command_parsers())
    for w in warnings:
        print(f"make_cli_docs: {w}", file=sys.stderr)
    if args.check:
        if text == existing:
            return 0
        diff = difflib.unified_diff((existing or "").splitlines(True), text.splitlines(True),
                                    f"{args.output} (as is)", f"{args.output} (regenerated)")
        sys.stdout.writelines(diff)
        print(f"\n{args.output} is stale: run  python tools/make_cli_docs.py", file=sys.stderr)
        return 1
    if text != existing:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text, encoding="utf-8")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
