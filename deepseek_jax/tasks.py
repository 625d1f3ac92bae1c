"""Training data: synthetic learnable tasks in the chat format, packed plain-text files, and chat
conversations (JSONL) for supervised fine-tuning.

A dataset is a deterministic function of ``(seed, split, step)``: :meth:`Dataset.batch_at` builds the
batch of any step from scratch, so a resumed run sees exactly the batches it would have seen
(the "data RNG position" is just the step index), and nothing has to be stored for the data.

Synthetic tasks (``synthetic:<task>[:key=value,...]``) render each example with the tokenizer's chat
template, ``bos <｜User｜>prompt<｜Assistant｜>answer eos``, right-padded with the pad token to a fixed
length. The loss mask covers only the answer and the eos. Each task's problem space is split by a
hash of the prompt: about one problem in ten is held out, never drawn for training, and is what
``split="eval"`` draws from (with its own random stream), so train and evaluation sets are disjoint.

* ``synthetic:addition`` -- ``"123+45"`` -> ``"168"``; options ``digits`` (max operand digits, 3) and
  ``min_digits`` (1). The number of digits of each operand is drawn uniformly, then the operand.
* ``synthetic:reverse`` -- a random lowercase string -> the string reversed; options ``min_len`` (2),
  ``max_len`` (8).
* ``synthetic:copy`` -- the same strings -> themselves.

A text file (``--data FILE``): one document per non-empty line, each encoded as ``bos line eos``,
concatenated and cut into rows of ``seq_len`` tokens (the last one padded); every real token is a
target. Every 20th line is held out for ``split="eval"`` (when the file has at least 20 lines).
Rows are visited in a fresh seeded permutation each epoch.

Chat data (``--data FILE.jsonl``): one JSON object per non-empty line, either
``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`` or
``{"prompt": "...", "completion": "..."}`` (one user turn, one assistant turn). Each conversation
is rendered with the tokenizer's chat template into one row (no packing), right-padded with the
pad token. The loss mask covers exactly the assistant turns: their content and the eos the
template puts after each, not the ``<｜Assistant｜>`` marker nor any system or user text. The
default ``seq_len`` is the longest conversation's length rounded up to 8; with a shorter one the
conversations that do not fit are left out (with a note on stderr). Every 20th conversation is held
out for ``split="eval"`` (when there are at least 20), and conversations are visited in a fresh
seeded permutation each epoch.

This module does not import jax.
"""

from __future__ import annotations

import abc
import hashlib
import inspect
import json
import os
import sys
import zlib
from typing import NamedTuple, Protocol

import numpy as np

from deepseek_jax.errors import DeepSeekError
from deepseek_jax.tokenizer import TINY_TOKENIZER_DIR, Tokenizer

__all__ = ["Batch", "Dataset", "SyntheticTask", "SyntheticDataset", "TextDataset", "ChatDataset",
           "encode_conversation", "make_dataset", "load_tokenizer", "PAD_TOKEN", "TASKS", "CHAT_ROLES"]

PAD_TOKEN = "<｜pad▁of▁sentence｜>"
_SPLITS = {"train": 0, "eval": 1}
_HELDOUT_MOD = 10  # one problem in ten is held out
#: The roles a chat-data message may have (those of DeepSeek-V3's chat template).
CHAT_ROLES = ("system", "user", "assistant")


class Batch(NamedTuple):
    """One training batch (numpy, fixed shapes)."""

    ids: np.ndarray        # int32 [B, T], right-padded with the pad id
    loss_mask: np.ndarray  # float32 [B, T]: 1 where token t is a prediction target
    valid: np.ndarray      # bool [B, T]: real (non-pad) tokens


class Dataset(Protocol):
    name: str
    batch_size: int
    seq_len: int
    seed: int
    split: str

    def batch_at(self, step: int) -> Batch: ...


def load_tokenizer(path: str | os.PathLike[str] | None = None) -> Tokenizer:
    """The tokenizer of a directory (default: the package's tiny tokenizer)."""
    return Tokenizer.from_dir(path or TINY_TOKENIZER_DIR)


def _pad_id(tok: Tokenizer) -> int:
    pad = tok.token_to_id(PAD_TOKEN)
    return tok.eos_id if pad is None else pad


def _heldout(key: str) -> bool:
    return zlib.crc32(key.encode("utf-8")) % _HELDOUT_MOD == 0


# --------------------------------------------------------------------------------------------
# Synthetic tasks
# --------------------------------------------------------------------------------------------


class SyntheticTask(abc.ABC):
    """A problem generator: ``sample(rng) -> (prompt, answer)`` strings."""

    name = "?"

    @abc.abstractmethod
    def sample(self, rng: np.random.Generator) -> tuple[str, str]:
        """One random problem: (prompt, answer)."""

    @abc.abstractmethod
    def max_chars(self) -> tuple[int, int]:
        """Upper bounds on (prompt, answer) lengths in characters."""

    @abc.abstractmethod
    def solve(self, prompt: str) -> str:
        """The correct answer of a prompt (for exact-match evaluation)."""


class Addition(SyntheticTask):
    name = "addition"

    def __init__(self, digits: int = 3, min_digits: int = 1):
        if not 1 <= min_digits <= digits <= 18:
            raise DeepSeekError(f"synthetic:addition: need 1 <= min_digits <= digits <= 18, "
                                f"got min_digits={min_digits}, digits={digits}")
        self.digits, self.min_digits = digits, min_digits

    def _operand(self, rng: np.random.Generator) -> int:
        n = int(rng.integers(self.min_digits, self.digits + 1))
        lo = 0 if n == 1 else 10 ** (n - 1)
        return int(rng.integers(lo, 10 ** n))

    def sample(self, rng):
        a, b = self._operand(rng), self._operand(rng)
        return f"{a}+{b}", str(a + b)

    def max_chars(self):
        return 2 * self.digits + 1, self.digits + 1

    def solve(self, prompt):
        a, b = prompt.split("+")
        return str(int(a) + int(b))


class _Strings(SyntheticTask):
    ALPHABET = np.array(list("abcdefghijklmnopqrstuvwxyz"))

    def __init__(self, min_len: int = 2, max_len: int = 8):
        if not 1 <= min_len <= max_len:
            raise DeepSeekError(f"synthetic:{self.name}: need 1 <= min_len <= max_len, "
                                f"got {min_len}, {max_len}")
        self.min_len, self.max_len = min_len, max_len

    def _string(self, rng):
        n = int(rng.integers(self.min_len, self.max_len + 1))
        return "".join(rng.choice(self.ALPHABET, n))

    def max_chars(self):
        return self.max_len, self.max_len


class Reverse(_Strings):
    name = "reverse"

    def sample(self, rng):
        s = self._string(rng)
        return s, s[::-1]

    def solve(self, prompt):
        return prompt[::-1]


class Copy(_Strings):
    name = "copy"

    def sample(self, rng):
        s = self._string(rng)
        return s, s

    def solve(self, prompt):
        return prompt


TASKS: dict[str, type[SyntheticTask]] = {"addition": Addition, "reverse": Reverse, "copy": Copy}


def parse_task(spec: str) -> SyntheticTask:
    """``synthetic:<task>[:key=value,...]`` -> a task (options are integers)."""
    parts = spec.split(":", 2)
    if len(parts) < 2 or parts[0] != "synthetic" or parts[1] not in TASKS:
        raise DeepSeekError(f"--data {spec!r}: unknown synthetic task "
                            f"(have {', '.join('synthetic:' + t for t in TASKS)})")
    kw: dict[str, int] = {}
    if len(parts) == 3 and parts[2]:
        for item in parts[2].split(","):
            k, sep, v = item.partition("=")
            try:
                if not sep:
                    raise ValueError
                kw[k.strip()] = int(v)
            except ValueError:
                raise DeepSeekError(f"--data {spec!r}: options are key=integer pairs, got {item!r}") from None
    cls = TASKS[parts[1]]
    known = [p for p in inspect.signature(cls).parameters if p != "self"]
    unknown = [k for k in kw if k not in known]
    if unknown:
        raise DeepSeekError(f"--data {spec!r}: unknown option {unknown[0]!r} for synthetic:{parts[1]} "
                            f"(options: {', '.join(known) or 'none'})")
    try:
        return cls(**kw)
    except TypeError as e:
        raise DeepSeekError(f"--data {spec!r}: bad option ({e})") from None


class SyntheticDataset:
    """Fixed-length chat-format batches of a synthetic task, a pure function of (seed, split, step)."""

    def __init__(self, task: SyntheticTask | str, tokenizer: Tokenizer | None = None, *, batch_size: int,
                 seq_len: int | None = None, seed: int = 0, split: str = "train"):
        if split not in _SPLITS:
            raise DeepSeekError(f"split must be one of {list(_SPLITS)}, got {split!r}")
        self.task = parse_task(task) if isinstance(task, str) else task
        self.name = task if isinstance(task, str) else f"synthetic:{self.task.name}"
        self.tok = tokenizer or load_tokenizer()
        self.batch_size, self.seed, self.split = int(batch_size), int(seed), split
        self.pad_id = _pad_id(self.tok)
        p, a = self.task.max_chars()
        # bos, <User>, <Assistant>, eos, and at most one token per character.
        bound = 4 + p + a
        self.seq_len = int(seq_len) if seq_len else -(-bound // 8) * 8
        if self.batch_size <= 0 or self.seq_len < 4:
            raise DeepSeekError(f"batch size {batch_size} / seq len {seq_len}: must be positive (seq len >= 4)")
        if self.seq_len < bound:   # (else a run trains, saves, and stops at the first example too long)
            raise DeepSeekError(f"--seq-len {self.seq_len} is shorter than {self.name}'s longest example, up to "
                                f"{bound} tokens at one token per character ({p}-character prompt, {a}-character "
                                f"answer, bos, eos and the two chat markers): give --seq-len >= {bound}, or leave it out")

    def examples(self, step: int) -> list[tuple[str, str]]:
        """The (prompt, answer) pairs of one step's batch."""
        rng = np.random.default_rng([self.seed, _SPLITS[self.split], int(step)])
        want_heldout = self.split == "eval"
        out = []
        tries = 0
        while len(out) < self.batch_size:
            prompt, answer = self.task.sample(rng)
            tries += 1
            if _heldout(prompt) == want_heldout:
                out.append((prompt, answer))
            elif tries > 1000 * self.batch_size:
                raise DeepSeekError(f"{self.name}: cannot draw {self.split} examples (problem space too small)")
        return out

    def encode(self, prompt: str, answer: str | None = None) -> tuple[list[int], int]:
        """Token ids of the chat-format example and the length of its prompt part.

        With ``answer=None`` only the prompt (ending in ``<｜Assistant｜>``), for generation.
        """
        ids = self.tok.encode_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
        n_prompt = len(ids)
        if answer is not None:
            ids = ids + self.tok.encode(answer, add_bos=False) + [self.tok.eos_id]
        return ids, n_prompt

    def batch_at(self, step: int) -> Batch:
        B, T = self.batch_size, self.seq_len
        ids = np.full((B, T), self.pad_id, np.int32)
        mask = np.zeros((B, T), np.float32)
        valid = np.zeros((B, T), bool)
        for b, (prompt, answer) in enumerate(self.examples(step)):
            row, n_prompt = self.encode(prompt, answer)
            if len(row) > T:
                raise DeepSeekError(f"{self.name}: example {prompt!r} -> {answer!r} needs {len(row)} tokens, "
                                    f"longer than --seq-len {T}")
            ids[b, :len(row)] = row
            mask[b, n_prompt:len(row)] = 1.0
            valid[b, :len(row)] = True
        return Batch(ids, mask, valid)

    def describe(self) -> dict:
        return {"data": self.name, "batch": self.batch_size, "seq_len": self.seq_len, "seed": self.seed}


# --------------------------------------------------------------------------------------------
# Plain text
# --------------------------------------------------------------------------------------------


class TextDataset:
    """Lines of a text file, tokenized (``bos line eos``), concatenated and packed into rows."""

    def __init__(self, path: str | os.PathLike[str], tokenizer: Tokenizer | None = None, *, batch_size: int,
                 seq_len: int | None = None, seed: int = 0, split: str = "train"):
        if split not in _SPLITS:
            raise DeepSeekError(f"split must be one of {list(_SPLITS)}, got {split!r}")
        path = os.fspath(path)
        self.name, self.path = path, path
        self.tok = tokenizer or load_tokenizer()
        self.batch_size, self.seed, self.split = int(batch_size), int(seed), split
        self.seq_len = int(seq_len or 128)
        self.pad_id = _pad_id(self.tok)
        try:
            with open(path, "rb") as f:
                raw = f.read()
            lines = [ln.rstrip("\r") for ln in raw.decode("utf-8-sig").split("\n")]
        except FileNotFoundError:
            raise DeepSeekError(f"--data: {path} not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise DeepSeekError(f"--data: cannot read {path} as UTF-8 text ({e})") from None
        self.sha256 = hashlib.sha256(raw).hexdigest()   # (--resume refuses a changed file)
        lines = [ln for ln in lines if ln.strip()]
        if not lines:
            raise DeepSeekError(f"--data: {path} has no non-empty lines")
        if len(lines) >= 20:
            keep = [(i % 20 == 19) == (split == "eval") for i in range(len(lines))]
            lines = [ln for ln, k in zip(lines, keep) if k]
        stream: list[int] = []
        for ln in lines:
            stream += self.tok.encode(ln, add_bos=True) + [self.tok.eos_id]
        T = self.seq_len
        n = -(-len(stream) // T)
        rows = np.full((n, T), self.pad_id, np.int32)
        rows.reshape(-1)[:len(stream)] = stream
        self.rows = rows
        self.valid = np.zeros((n, T), bool)
        self.valid.reshape(-1)[:len(stream)] = True
        self.n_tokens = len(stream)
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            rng = np.random.default_rng([self.seed, _SPLITS[self.split], 7, epoch])
            self._perms[epoch] = rng.permutation(len(self.rows))
        return self._perms[epoch]

    def batch_at(self, step: int) -> Batch:
        n = len(self.rows)
        g = np.arange(self.batch_size) + int(step) * self.batch_size
        idx = np.array([self._perm(int(i) // n)[int(i) % n] for i in g])
        valid = self.valid[idx]
        return Batch(self.rows[idx], valid.astype(np.float32), valid)

    def describe(self) -> dict:
        return {"data": os.path.abspath(self.path), "sha256": self.sha256, "batch": self.batch_size,
                "seq_len": self.seq_len, "seed": self.seed}


# --------------------------------------------------------------------------------------------
# Chat conversations (JSONL)
# --------------------------------------------------------------------------------------------


def _json_type(value: object) -> str:
    """The JSON name of a parsed value's type (for error messages)."""
    for t, name in ((bool, "a boolean"), (dict, "an object"), (list, "an array"), (str, "a string"),
                    ((int, float), "a number")):
        if isinstance(value, t):
            return name
    return "null"


def _conversation(obj: object, where: str) -> list[dict[str, str]]:
    """The messages of one chat-data line (``messages``, or ``prompt`` + ``completion``), checked."""
    if not isinstance(obj, dict):
        raise DeepSeekError(f"{where}: expected a JSON object, got {_json_type(obj)}")
    if "messages" in obj:
        if "prompt" in obj or "completion" in obj:
            raise DeepSeekError(f"{where}: has both 'messages' and 'prompt'/'completion'; give one form")
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise DeepSeekError(f"{where}: 'messages' must be a non-empty array of messages")
    elif "prompt" in obj and "completion" in obj:
        for key in ("prompt", "completion"):
            if not isinstance(obj[key], str):
                raise DeepSeekError(f"{where}: '{key}' must be a string, got {_json_type(obj[key])}")
        messages = [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["completion"]}]
    else:
        raise DeepSeekError(f"{where}: needs 'messages', or 'prompt' and 'completion' "
                            f"(has {', '.join(map(repr, obj)) or 'no keys'})")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DeepSeekError(f"{where}: message {i} must be an object with string 'role' and 'content'")
        if m["role"] not in CHAT_ROLES:
            raise DeepSeekError(f"{where}: message {i} has unknown role {m['role']!r} "
                                f"(have {', '.join(CHAT_ROLES)})")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise DeepSeekError(f"{where}: no assistant message (nothing to learn)")
    return out


def _read_chat_file(path: str) -> tuple[list[tuple[int, list[dict[str, str]]]], bytes]:
    """(line number, messages) of each non-empty line of a JSONL chat file, and the file's bytes."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DeepSeekError(f"--data: {path} not found") from None
    except OSError as e:
        raise DeepSeekError(f"--data: cannot read {path} ({e.strerror or e})") from None
    out = []
    for n, line in enumerate(raw.split(b"\n"), 1):
        where = f"--data: {path} line {n}"
        try:
            text = line.decode("utf-8-sig" if n == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise DeepSeekError(f"{where}: not UTF-8 text (bad byte at column {e.start + 1})") from None
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            detail = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else "nested too deeply"
            raise DeepSeekError(f"{where}: not valid JSON ({detail})") from None
        out.append((n, _conversation(obj, where)))
    if not out:
        raise DeepSeekError(f"--data: {path} has no conversations (no non-empty lines)")
    return out, raw


def encode_conversation(tok: Tokenizer, messages: list[dict[str, str]], where: str = "conversation"
                        ) -> tuple[list[int], np.ndarray]:
    """Token ids of a conversation rendered with the chat template, and its loss mask (bool).

    The mask covers each assistant turn from just after the generation prompt (``<｜Assistant｜>``)
    to the end of that turn's rendering (its content and the eos the template appends). Each partial
    rendering must be a token prefix of the whole; a template for which it is not is refused rather
    than guessed at. Errors name ``where``.
    """
    try:
        ids = tok.encode_chat(messages, add_generation_prompt=False)
        mask = np.zeros(len(ids), bool)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = tok.encode_chat(messages[:i], add_generation_prompt=True)
            end = tok.encode_chat(messages[:i + 1], add_generation_prompt=False)
            if ids[:len(start)] != start or ids[:len(end)] != end:
                raise DeepSeekError(f"the chat template does not render the conversation up to message {i} as a "
                                    "prefix of the whole, so the assistant's tokens cannot be told apart")
            mask[len(start):len(end)] = True
    except DeepSeekError as e:
        raise DeepSeekError(f"{where}: {e}") from None
    return ids, mask


class NothingFits(DeepSeekError):
    """No conversation of a split fits the sequence length."""


class ChatDataset:
    """Conversations of a JSONL file, one per right-padded row; the loss is on the assistant turns only."""

    def __init__(self, path: str | os.PathLike[str], tokenizer: Tokenizer | None = None, *, batch_size: int,
                 seq_len: int | None = None, seed: int = 0, split: str = "train"):
        if split not in _SPLITS:
            raise DeepSeekError(f"split must be one of {list(_SPLITS)}, got {split!r}")
        if int(batch_size) <= 0 or (seq_len is not None and int(seq_len) < 4):
            raise DeepSeekError(f"batch size {batch_size} / seq len {seq_len}: must be positive (seq len >= 4)")
        path = os.fspath(path)
        self.name, self.path = path, path
        self.tok = tokenizer or load_tokenizer()
        self.batch_size, self.seed, self.split = int(batch_size), int(seed), split
        self.pad_id = _pad_id(self.tok)
        convs, raw = _read_chat_file(path)
        self.sha256 = hashlib.sha256(raw).hexdigest()
        mine = (range(len(convs)) if len(convs) < 20
                else [i for i in range(len(convs)) if (i % 20 == 19) == (split == "eval")])
        # The default length fits every conversation of both splits, so the held-out set keeps them all.
        encoded = {i: encode_conversation(self.tok, convs[i][1], f"--data: {path} line {convs[i][0]}")
                   for i in (range(len(convs)) if seq_len is None else mine)}
        self.seq_len = int(seq_len) if seq_len else -(-max(len(ids) for ids, _ in encoded.values()) // 8) * 8
        T = self.seq_len
        fits = [i for i in mine if len(encoded[i][0]) <= T]
        self.n_left_out = len(mine) - len(fits)
        if not fits:
            shortest = min(len(encoded[i][0]) for i in mine)
            raise NothingFits(f"--data: none of the {len(mine)} {split} conversations of {path} fits in "
                                f"--seq-len {T} (the shortest has {shortest} tokens)")
        if self.n_left_out:
            print(f"note: --data {path}: {self.n_left_out} of {len(mine)} {split} conversations are longer than "
                  f"--seq-len {T} tokens and are left out", file=sys.stderr)
        self.line_numbers = [convs[i][0] for i in fits]
        self.ids = [np.asarray(encoded[i][0], np.int32) for i in fits]
        self.masks = [encoded[i][1] for i in fits]
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            rng = np.random.default_rng([self.seed, _SPLITS[self.split], 8, epoch])
            self._perms[epoch] = rng.permutation(len(self.ids))
        return self._perms[epoch]

    def indices_at(self, step: int) -> list[int]:
        """Which conversations (indices into ``ids`` / ``line_numbers``) make up one step's batch."""
        n = len(self.ids)
        g = np.arange(self.batch_size) + int(step) * self.batch_size
        return [int(self._perm(int(i) // n)[int(i) % n]) for i in g]

    def batch_at(self, step: int) -> Batch:
        B, T = self.batch_size, self.seq_len
        ids = np.full((B, T), self.pad_id, np.int32)
        mask = np.zeros((B, T), np.float32)
        valid = np.zeros((B, T), bool)
        for b, k in enumerate(self.indices_at(step)):
            row = self.ids[k]
            ids[b, :len(row)] = row
            mask[b, :len(row)] = self.masks[k]
            valid[b, :len(row)] = True
        return Batch(ids, mask, valid)

    def describe(self) -> dict:
        return {"data": os.path.abspath(self.path), "format": "chat", "sha256": self.sha256,
                "batch": self.batch_size, "seq_len": self.seq_len, "seed": self.seed,
                "conversations": len(self.ids), "left_out": self.n_left_out}


def make_dataset(spec: str, tokenizer: Tokenizer | None = None, *, batch_size: int, seq_len: int | None = None,
                 seed: int = 0, split: str = "train") -> SyntheticDataset | TextDataset | ChatDataset:
    """``synthetic:<task>[:opts]``, a ``.jsonl`` file of chat conversations, or a text file path."""
    if spec.startswith("synthetic:"):
        return SyntheticDataset(spec, tokenizer, batch_size=batch_size, seq_len=seq_len, seed=seed, split=split)
    if spec.lower().endswith(".jsonl"):
        return ChatDataset(spec, tokenizer, batch_size=batch_size, seq_len=seq_len, seed=seed, split=split)
    return TextDataset(spec, tokenizer, batch_size=batch_size, seq_len=seq_len, seed=seed, split=split)
