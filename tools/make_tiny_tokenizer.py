#!/usr/bin/env python3
"""Build the tiny DeepSeek-style tokenizer used by the demo and the tests.

The output (``tokenizer.json`` and ``tokenizer_config.json``) lives in
``deepseek_jax/assets/tiny_tokenizer/`` and is committed; ``tests/test_tokenizer.py`` checks that
running :func:`main` again reproduces it exactly.

Layout of the vocabulary (at most 512 entries, ids in this order):

* 0..4: the special tokens, spelled as in DeepSeek-V3 (full-width bars, ``▁``):
  ``<｜begin▁of▁sentence｜>`` (bos) = 0, ``<｜end▁of▁sentence｜>`` (eos) = 1, ``<｜User｜>`` = 2,
  ``<｜Assistant｜>`` = 3, ``<｜pad▁of▁sentence｜>`` = 4;
* 5..260: the 256 byte-level base tokens, in byte order (byte ``b`` has id ``5 + b``);
* then one token per BPE merge learned by ``tokenizers.trainers.BpeTrainer`` on the fixed corpus
  below, in the order the merges were learned.

Like DeepSeek's, the model is a byte-level BPE (``pre_tokenizers.ByteLevel`` plus
``decoders.ByteLevel``), so every string, including non-ASCII text, round-trips. The chat template
follows DeepSeek-V3's format (SPEC section 9).

Usage: ``python tools/make_tiny_tokenizer.py [--out DIR]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "deepseek_jax" / "assets" / "tiny_tokenizer"

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
PAD = "<｜pad▁of▁sentence｜>"
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, USER, ASSISTANT, PAD)

VOCAB_SIZE = 512

# DeepSeek-V3's chat format: bos, the system messages (joined by a blank line), then
# `<｜User｜>{text}` per user turn and `<｜Assistant｜>{reply}<｜end▁of▁sentence｜>` per assistant turn;
# a generation prompt ends with `<｜Assistant｜>`. Written as one line of whitespace-trimmed tags.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='') -%}"
    "{%- for m in messages if m['role'] == 'system' -%}"
    "{%- set ns.system = ns.system + ('' if loop.first else '\\n\\n') + m['content'] -%}"
    "{%- endfor -%}"
    "{{- bos_token + ns.system -}}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}"
    "{{- '" + USER + "' + m['content'] -}}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{{- '" + ASSISTANT + "' + m['content'] + eos_token -}}"
    "{%- elif m['role'] != 'system' -%}"
    "{{- raise_exception('unsupported chat role: ' + m['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '" + ASSISTANT + "' -}}"
    "{%- endif -%}"
)

# A small, fixed English + digits corpus; the merges learned from it are fully determined by it.
CORPUS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! This is a tiny tokenizer for testing the DeepSeek model in JAX.",
    "The model reads a prompt, thinks about the question, and then writes an answer.",
    "A user asks the assistant a question and the assistant gives a helpful reply.",
    "What is the capital of France? The capital of France is Paris.",
    "Count with me: one, two, three, four, five, six, seven, eight, nine, ten.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 32 64 100 128 256 512 1024 2048 4096",
    "The year 2024 came after 2023, and 2025 comes after 2024. Pi is about 3.14159.",
    "Numbers: 12345 67890 3.14 2.718 1.414 42 7 99 1000 1000000 0.5 0.25 0.125",
    "In the beginning there was a sentence, and at the end of the sentence there was a period.",
    "Attention is all you need, but experts in a mixture help the model think faster.",
    "Tokens are pieces of text; the tokenizer turns text into tokens and tokens into text.",
    "She sells sea shells by the sea shore, and the shells she sells are surely sea shells.",
    "How are you today? I am fine, thank you. What would you like to talk about?",
    "Please write a short story about a robot who learns to paint pictures of the ocean.",
    "The weather is sunny in the morning, cloudy in the afternoon, and rainy in the evening.",
    "Every good program has tests, and every test should be small, fast and deterministic.",
    "JAX compiles Python functions with XLA so that they run quickly on accelerators.",
    "A list of things: apples, oranges, bananas, bread, milk, eggs, cheese, and water.",
    "The answer is 4. The answer is 8. The answer is 15. The answer is 16. The answer is 23.",
)


def bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable-character table used by byte-level BPE (GPT-2's scheme).

    Printable Latin-1 bytes map to themselves; the other 68 bytes map, in byte order, to the
    characters U+0100, U+0101, ... so that every byte has a visible, non-whitespace stand-in.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table: dict[int, str] = {}
    extra = 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _learn_merges() -> list[tuple[str, str]]:
    """Run the BPE trainer on :data:`CORPUS`; return its merges in the order they were learned."""
    scratch = Tokenizer(models.BPE())
    scratch.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    scratch.train_from_iterator(list(CORPUS), trainer=trainer)
    merges = json.loads(scratch.to_str())["model"]["merges"]
    # Older tokenizers versions serialise a merge as "a b", newer ones as ["a", "b"].
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in merges]


def build_tokenizer() -> Tokenizer:
    """Build the tiny tokenizer: specials at 0..4, the bytes in byte order, then the merges."""
    byte_chars = bytes_to_unicode()
    assert set(byte_chars.values()) == set(pre_tokenizers.ByteLevel.alphabet())

    vocab: dict[str, int] = {}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    for b in range(256):
        vocab[byte_chars[b]] = len(vocab)
    merges = _learn_merges()
    for left, right in merges:
        # Two merge paths can spell the same string ("a"+"bc", "ab"+"c"); it gets one id.
        vocab.setdefault(left + right, len(vocab))
    if len(vocab) > VOCAB_SIZE:
        raise RuntimeError(f"tiny vocab has {len(vocab)} entries, more than {VOCAB_SIZE}")

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False, single_word=False) for t in SPECIAL_TOKENS]
    )
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(token) == i, (token, tok.token_to_id(token))
    return tok


def tokenizer_config() -> dict[str, object]:
    """The ``tokenizer_config.json`` contents, shaped like DeepSeek-V3's (AddedToken dicts)."""

    def added(content: str) -> dict[str, object]:
        return {
            "__type": "AddedToken",
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
        }

    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": added(BOS),
        "eos_token": added(EOS),
        "pad_token": added(PAD),
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": 16384,
        "tokenizer_class": "LlamaTokenizerFast",
        "unk_token": None,
        "chat_template": CHAT_TEMPLATE,
    }


def main(out_dir: str | Path | None = None) -> Path:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``out_dir`` and return it."""
    out = Path(out_dir) if out_dir is not None else DEFAULT_OUT
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    (out / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
    (out / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    args = parser.parse_args()
    written = main(args.out)
    print(f"wrote {written / 'tokenizer.json'} and {written / 'tokenizer_config.json'}")
