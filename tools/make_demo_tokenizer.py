#!/usr/bin/env python3
"""Build the demo model's tokenizer: the tiny tokenizer's specials and chat template, no merges.

Every byte is one token (ids: the 5 special tokens at 0..4, byte ``b`` at ``5 + b``; 261 in all), so
a number is always one token per digit: the shipped addition model (``deepseek_jax/assets/demo_model``,
built by ``tools/make_demo_model.sh``) never has to learn the tiny tokenizer's irregular digit merges
("00", "34", "414", ...). Byte-level like DeepSeek's: every string round-trips.

Usage: ``python tools/make_demo_tokenizer.py --out DIR``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_tiny_tokenizer import SPECIAL_TOKENS, bytes_to_unicode, tokenizer_config  # noqa: E402


def build_tokenizer() -> Tokenizer:
    vocab: dict[str, int] = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for b, ch in sorted(bytes_to_unicode().items()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False, single_word=False) for t in SPECIAL_TOKENS])
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(token) == i, (token, tok.token_to_id(token))
    return tok


def main(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(build_tokenizer().to_str(pretty=True) + "\n", encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    written = main(parser.parse_args().out)
    print(f"wrote {written / 'tokenizer.json'} and {written / 'tokenizer_config.json'}")
