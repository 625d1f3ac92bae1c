"""The docs cannot drift from the code.

* ``docs/cli.md`` has one section per subcommand, and each section's flag tables list exactly the
  flags and positionals of that subcommand's argparse parser (compared both ways);
* its generated blocks equal what ``tools/make_cli_docs.py`` writes now (help texts, defaults);
* every ``deepseek-jax CMD ...`` command line in the docs and the README (code blocks and inline
  code) uses flags that CMD has;
* ``docs/architecture.md`` shows ``docs/architecture.svg``, which is well-formed SVG.

After changing a parser: ``python tools/make_cli_docs.py`` (``--check`` only reports).
"""

from __future__ import annotations

import difflib
import importlib.util
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLI_DOC = ROOT / "docs" / "cli.md"
FIX = "run  python tools/make_cli_docs.py  and describe the change in docs/cli.md"


def _load_tool():
    spec = importlib.util.spec_from_file_location("make_cli_docs", ROOT / "tools" / "make_cli_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mcd = _load_tool()
PARSERS = mcd.command_parsers()
DOC = CLI_DOC.read_text(encoding="utf-8")
SECTION_RE = re.compile(r"^## `deepseek-jax ([\w-]+)`\s*$", re.M)
FLAG_RE = re.compile(r"(?<![\w-])--[a-zA-Z][\w-]*")


def doc_sections() -> dict[str, str]:
    heads = list(SECTION_RE.finditer(DOC))
    out = {}
    for i, m in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(DOC)
        nxt = re.search(r"^## ", DOC[m.end():end], re.M)   # a later non-command section ends it too
        out[m.group(1)] = DOC[m.end(): m.end() + nxt.start() if nxt else end]
    return out


def table_names(section: str) -> tuple[set[str], set[str]]:
    """(flags, positionals) named in the first column of the section's tables."""
    flags, positionals = set(), set()
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        first = line.split(" | ")[0]
        for name in re.findall(r"`([^`]+)`", first):
            (flags if name.startswith("-") else positionals).add(name)
    return flags, positionals


def parser_names(parser) -> tuple[set[str], set[str]]:
    actions = mcd.documented_actions(parser)
    flags = {o for a in actions for o in a.option_strings}
    positionals = {a.metavar or a.dest for a in actions if not a.option_strings}
    return flags, positionals


def test_every_subcommand_has_one_section():
    names = SECTION_RE.findall(DOC)
    assert len(names) == len(set(names)), f"duplicate sections in docs/cli.md: {names}"
    assert set(names) == set(PARSERS), (f"sections without a subcommand: {sorted(set(names) - set(PARSERS))}; "
                                        f"subcommands without a section: {sorted(set(PARSERS) - set(names))}; {FIX}")


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_flags_documented_both_ways(command):
    section = doc_sections().get(command)
    assert section is not None, f"docs/cli.md has no section for {command}; {FIX}"
    doc_flags, doc_pos = table_names(section)
    flags, pos = parser_names(PARSERS[command])
    assert not doc_flags - flags, f"{command}: documented flags the parser lacks: {sorted(doc_flags - flags)}; {FIX}"
    assert not flags - doc_flags, f"{command}: parser flags not documented: {sorted(flags - doc_flags)}; {FIX}"
    assert doc_pos == pos, f"{command}: documented positionals {sorted(doc_pos)} != parser's {sorted(pos)}; {FIX}"


def test_generated_blocks_are_current():
    text, warnings = mcd.render(DOC, PARSERS)
    assert not warnings, warnings
    if text != DOC:
        diff = "".join(difflib.unified_diff(DOC.splitlines(True), text.splitlines(True),
                                            "docs/cli.md", "regenerated", n=1))
        pytest.fail(f"docs/cli.md is stale (a help text, default or flag changed): {FIX}\n{diff[:4000]}",
                    pytrace=False)


def _command_lines(path: Path):
    """(line number, command, flags) of each ``deepseek-jax CMD ...`` in code in a Markdown file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    in_code, i = False, 0
    while i < len(lines):
        line, lineno = lines[i], i + 1
        if line.lstrip().startswith("```"):
            in_code = not in_code
            i += 1
            continue
        if in_code:
            while line.rstrip().endswith("\\") and i + 1 < len(lines):   # shell continuation
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i]
            candidates = [line]
        else:
            candidates = re.findall(r"`(deepseek-jax [^`]*)`", line)
        for text in candidates:
            for m in re.finditer(r"deepseek-jax\s+([\w-]+)([^;&]*)", text):
                if m.group(1) in PARSERS:
                    yield lineno, m.group(1), FLAG_RE.findall(m.group(2))
        i += 1


DOC_FILES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_command_lines_in_docs_use_existing_flags(path):
    bad = []
    for lineno, command, flags in _command_lines(path):
        known = parser_names(PARSERS[command])[0] | {"-h", "--help"}
        bad += [f"{path.name}:{lineno}: deepseek-jax {command} has no {f}" for f in flags if f not in known]
    assert not bad, "\n".join(bad)


def test_command_line_scanner_sees_flags():
    """The scanner above is not vacuous: it finds the examples of docs/cli.md."""
    found = list(_command_lines(CLI_DOC))
    assert {c for _, c, _ in found} >= {"convert", "generate", "plan"}
    assert sum(len(f) for _, _, f in found) >= 10


def test_architecture_page_shows_its_picture():
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert "architecture.svg" in text
    root = ET.parse(ROOT / "docs" / "architecture.svg").getroot()
    assert root.tag.endswith("svg") and root.get("viewBox")
    words = " ".join(t.strip() for t in root.itertext())
    for needed in ("embed", "MLA", "MoE", "router", "MTP", "latent cache", "lm_head"):
        assert needed in words, needed
