"""One module per CLI subcommand; see ``deepseek_jax.cli``."""

from __future__ import annotations

import os
import stat

from deepseek_jax.errors import DeepSeekError


def plain_mode(path: str, *, directory: bool = False) -> int:
    """The permissions ``open(path, "w")`` / ``mkdir`` would have left: an existing file's own, else
    0o666 (0o777 for a directory) under the umask. ``tempfile`` makes its files 0o600 and its
    directories 0o700, so an output written there and renamed into place gets this mode first."""
    if not directory and os.path.isfile(path):
        return stat.S_IMODE(os.stat(path).st_mode)
    return (0o777 if directory else 0o666) & ~_umask()


def _umask() -> int:
    """The process's umask: read from /proc on Linux (setting it, the only portable way to read
    it, would leave it 0 for an instant for every other thread)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def read_lines(path: str, flag: str) -> list[tuple[int, str]]:
    """The non-blank lines of a UTF-8 text file (a byte-order mark dropped) with their 1-based line
    numbers; ``flag`` names the option in errors (``score --text-file``/``--pairs``, ``generate
    --input-file``)."""
    try:
        with open(path, "rb") as f:
            data = f.read().removeprefix(b"\xef\xbb\xbf")
    except OSError as e:
        reason = e.strerror or str(e)
        raise DeepSeekError(f"{flag}: cannot read {path}: {' '.join(str(reason).split())}") from None
    lines = []
    # lines end at \n (\r\n too) only: str.splitlines would also split at form feeds and U+2028
    for i, raw in enumerate(data.split(b"\n")):
        try:
            line = raw.decode("utf-8").removesuffix("\r")
        except UnicodeDecodeError as e:
            raise DeepSeekError(f"{flag}: {path} line {i + 1} is not UTF-8 text: byte 0x{raw[e.start]:02x} at "
                                f"byte {e.start + 1} of the line") from None
        if line.strip():
            lines.append((i + 1, line))
    if not lines:
        raise DeepSeekError(f"{flag}: {path} holds no text (only blank lines)")
    return lines


def json_line(obj, **kw) -> str:
    """``obj`` as one JSON line (``json.dumps``'s keywords taken); a NaN or infinite number (a
    model whose weights hold one) is ``null``: ``json.dumps`` wrote bare ``NaN``, which strict JSON
    parsers refuse."""
    import json
    import math

    def clean(x):
        if isinstance(x, float) or (type(x).__module__ == "numpy" and type(x).__name__.startswith("float")):
            return float(x) if math.isfinite(x) else None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x
    return json.dumps(clean(obj), allow_nan=False, **kw)


def undecodable_byte(text: str) -> tuple[int, int] | None:
    """``(byte, character index)`` of the first byte that was not UTF-8 where ``text`` came from
    (Python keeps argv's and a ``surrogateescape`` stream's as U+DC80..U+DCFF), else None."""
    bad = next((i for i, c in enumerate(text) if "\udc80" <= c <= "\udcff"), None)
    return None if bad is None else (ord(text[bad]) - 0xDC00, bad)
