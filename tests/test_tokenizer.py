"""Tests for deepseek_jax.tokenizer and the tiny tokenizer asset (no jax, no model)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from deepseek_jax.errors import DeepSeekError
from deepseek_jax.tokenizer import TINY_TOKENIZER_DIR, StreamDecoder, Tokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
PAD = "<｜pad▁of▁sentence｜>"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(TINY_TOKENIZER_DIR)


def _copy_asset(tmp_path: Path, config_edit: dict[str, Any] | None = None) -> Path:
    """Copy the tiny tokenizer into tmp_path, updating config keys (None values delete the key)."""
    out = tmp_path / "tok"
    shutil.copytree(TINY_TOKENIZER_DIR, out)
    if config_edit:
        cfg_file = out / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        for key, value in config_edit.items():
            if value is None:
                cfg.pop(key, None)
            else:
                cfg[key] = value
        cfg_file.write_text(json.dumps(cfg, ensure_ascii=False), encoding="utf-8")
    return out


# ---------------------------------------------------------------- vocab and round trips


def test_vocab_and_special_ids(tok: Tokenizer) -> None:
    assert tok.vocab_size <= 512
    assert tok.bos_id == 0 and tok.eos_id == 1
    assert [tok.token_to_id(t) for t in (BOS, EOS, USER, ASSISTANT, PAD)] == [0, 1, 2, 3, 4]
    # Special-token strings in text encode to their ids.
    assert tok.encode(USER + ASSISTANT + EOS, add_bos=False) == [2, 3, 1]


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world! The quick brown fox.",
        "0123456789 3.14159 2024",
        "héllo 世界",
        "tabs\tand\nnewlines  ",
        "",
    ],
)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text, add_bos=False)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_encode_bos_handling(tok: Tokenizer) -> None:
    plain = tok.encode("hello", add_bos=False)
    assert tok.encode("hello", add_bos=True) == [0] + plain
    assert tok.encode("hello") == [0] + plain  # config says add_bos_token: true
    # text that already starts with bos (a rendered chat template) gets no second one by default
    assert tok.encode(BOS + "hello") == [0] + plain
    assert tok.encode(BOS + "hello", add_bos=True) == [0, 0] + plain
    assert tok.decode([0] + plain) == "hello"
    assert tok.decode([0] + plain, skip_special=False) == BOS + "hello"


def test_encode_bad_text(tok: Tokenizer) -> None:
    with pytest.raises(DeepSeekError, match=r"lone surrogate '\\ud800' at character 5"):
        tok.encode("caf\u00e9 \ud800")
    with pytest.raises(DeepSeekError, match="must be a string, got bytes"):
        tok.encode(b"hello")


def test_merges_compress_english(tok: Tokenizer) -> None:
    text = "the answer is"
    assert len(tok.encode(text, add_bos=False)) < len(text.encode("utf-8"))


# ---------------------------------------------------------------- chat template


def test_chat_template_two_turns(tok: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is 2+2?"},
    ]
    expected = (
        BOS + "You are helpful."
        + USER + "Hi there"
        + ASSISTANT + "Hello!" + EOS
        + USER + "What is 2+2?"
    )
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == expected
    assert tok.apply_chat_template(messages) == expected + ASSISTANT


def test_chat_template_system_messages_go_first(tok: Tokenizer) -> None:
    messages = [
        {"role": "user", "content": "a"},
        {"role": "system", "content": "s1"},
        {"role": "system", "content": "s2"},
    ]
    assert tok.apply_chat_template(messages) == BOS + "s1\n\ns2" + USER + "a" + ASSISTANT


def test_encode_chat_single_bos(tok: Tokenizer) -> None:
    messages = [{"role": "user", "content": "Hello"}]
    ids = tok.encode_chat(messages)
    assert ids[0] == 0 and ids[1] != 0
    assert ids.count(0) == 1
    assert ids[-1] == 3  # generation prompt <｜Assistant｜>
    assert ids == [0, 2] + tok.encode("Hello", add_bos=False) + [3]


# ---------------------------------------------------------------- streaming


def test_stream_decoder_multibyte(tok: Tokenizer) -> None:
    text = "héllo 世界 ünïcødé 🙂 and the answer is 42."
    ids = tok.encode(text, add_bos=True)
    dec = StreamDecoder(tok)
    pieces = [dec.feed(i) for i in ids]
    pieces.append(dec.flush())
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids) == text
    # Some multi-byte character spans several ids, so at least one step emitted nothing.
    assert "" in pieces[1:-1]


def test_stream_decoder_flush_and_reset(tok: Tokenizer) -> None:
    dec = tok.stream_decoder()
    partial = tok.encode("世", add_bos=False)[:-1]  # an incomplete UTF-8 sequence
    assert dec.feed_many(partial) == ""
    assert dec.flush() == tok.decode(partial)  # flush releases what was held back
    assert dec.feed_many(tok.encode("ok", add_bos=False)) + dec.flush() == "ok"


def test_stream_decoder_keeps_specials_when_asked(tok: Tokenizer) -> None:
    ids = tok.encode("hi", add_bos=False) + [1]
    dec = StreamDecoder(tok, skip_special=False)
    assert dec.feed_many(ids) + dec.flush() == "hi" + EOS


# ---------------------------------------------------------------- configs and errors


def test_string_tokens_and_missing_config(tmp_path: Path) -> None:
    d = _copy_asset(tmp_path, {"bos_token": BOS, "eos_token": EOS, "add_bos_token": False})
    t = Tokenizer.from_dir(d)
    assert (t.bos_id, t.eos_id) == (0, 1)
    assert t.encode("x")[0] != 0  # add_bos_token: false
    (d / "tokenizer_config.json").unlink()
    t = Tokenizer.from_dir(d)  # DeepSeek defaults, no template
    assert (t.bos_id, t.eos_id) == (0, 1)
    assert t.chat_template is None


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(DeepSeekError, match="not found"):
        Tokenizer.from_dir(tmp_path / "nope")


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    d = _copy_asset(tmp_path)
    (d / "tokenizer.json").unlink()
    with pytest.raises(DeepSeekError, match=r"tokenizer\.json.*--prompt-ids") as info:
        Tokenizer.from_dir(d)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00garbage", b'{"model": 3}'])
def test_corrupt_tokenizer_json(tmp_path: Path, content: bytes) -> None:
    d = _copy_asset(tmp_path)
    (d / "tokenizer.json").write_bytes(content)
    with pytest.raises(DeepSeekError, match="corrupt tokenizer file") as info:
        Tokenizer.from_dir(d)
    assert "\n" not in str(info.value)


def test_unreadable_tokenizer_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = _copy_asset(tmp_path)

    def deny(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", deny)
    with pytest.raises(DeepSeekError, match="cannot read .*Permission denied"):
        Tokenizer.from_dir(d)


def test_corrupt_tokenizer_config(tmp_path: Path) -> None:
    d = _copy_asset(tmp_path)
    (d / "tokenizer_config.json").write_text("{oops", encoding="utf-8")
    with pytest.raises(DeepSeekError, match="corrupt tokenizer config"):
        Tokenizer.from_dir(d)
    (d / "tokenizer_config.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(DeepSeekError, match="expected a JSON object"):
        Tokenizer.from_dir(d)


def test_bos_not_in_vocab(tmp_path: Path) -> None:
    d = _copy_asset(tmp_path, {"bos_token": {"content": "<s>"}})
    with pytest.raises(DeepSeekError, match="bos_token '<s>' is not in the tokenizer vocabulary"):
        Tokenizer.from_dir(d)


def test_no_chat_template(tmp_path: Path) -> None:
    t = Tokenizer.from_dir(_copy_asset(tmp_path, {"chat_template": None}))
    assert t.encode("fine without a template")  # raw prompts still work
    with pytest.raises(DeepSeekError, match="no chat_template"):
        t.encode_chat([{"role": "user", "content": "hi"}])


def test_template_syntax_error(tmp_path: Path) -> None:
    bad = "{% for m in messages %}{{ m }"
    t = Tokenizer.from_dir(_copy_asset(tmp_path, {"chat_template": bad}))
    with pytest.raises(DeepSeekError, match="not valid jinja") as info:
        t.apply_chat_template([{"role": "user", "content": "hi"}])
    assert "\n" not in str(info.value)


def test_template_render_errors(tok: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(DeepSeekError, match="render failed: unsupported chat role: tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(DeepSeekError, match="render failed"):
        tok.apply_chat_template([{"role": "user", "content": None}])  # str + None
    with pytest.raises(DeepSeekError, match="chat message 0"):
        tok.apply_chat_template(["not a dict"])  # type: ignore[list-item]
    # The sandbox refuses to mutate data.
    t = Tokenizer.from_dir(_copy_asset(tmp_path, {"chat_template": "{{ messages.append(1) }}"}))
    with pytest.raises(DeepSeekError, match="render failed"):
        t.apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_helpers(tmp_path: Path) -> None:
    template = (
        "{{ messages | tojson }}{% for m in messages %}"
        "{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}"
    )
    t = Tokenizer.from_dir(_copy_asset(tmp_path, {"chat_template": template}))
    messages = [{"role": "user", "content": "é"}, {"role": "user", "content": "b"}]
    assert t.apply_chat_template(messages) == json.dumps(messages, ensure_ascii=False) + "user"


def test_chat_template_list_form(tmp_path: Path) -> None:
    cfg = json.loads((TINY_TOKENIZER_DIR / "tokenizer_config.json").read_text(encoding="utf-8"))
    named = [{"name": "default", "template": cfg["chat_template"]}]
    t = Tokenizer.from_dir(_copy_asset(tmp_path, {"chat_template": named}))
    rendered = t.apply_chat_template([{"role": "user", "content": "hi"}])
    assert rendered == BOS + USER + "hi" + ASSISTANT


def test_chat_template_list_without_default_fails_only_a_chat(tmp_path: Path) -> None:
    """A list of templates none of which is "default" made loading fail, for raw prompts and
    scoring too; it fails what renders a chat (as in transformers), and a chat is not encoded raw."""
    t = Tokenizer.from_dir(_copy_asset(tmp_path, {"chat_template": [{"name": "tool_use", "template": "x"}]}))
    assert t.encode("raw text is fine") and t.has_chat_template and not t.chat_template
    with pytest.raises(DeepSeekError, match="none is named 'default'"):
        t.encode_chat([{"role": "user", "content": "hi"}])


def test_chat_template_jinja_file_wins_over_the_config(tmp_path: Path) -> None:
    """transformers reads chat_template.jinja before tokenizer_config.json's chat_template; the
    config's had been used."""
    d = _copy_asset(tmp_path)
    (d / "chat_template.jinja").write_text("NEW:{% for m in messages %}{{ m.content }}{% endfor %}", encoding="utf-8")
    assert Tokenizer.from_dir(d).apply_chat_template([{"role": "user", "content": "hi"}]) == "NEW:hi"


def test_template_variables_as_transformers_passes_them(tmp_path: Path) -> None:
    """tools / documents are None unless given (an `is not none` test was true here), and a
    keyword overrides bos_token instead of failing with "multiple values"."""
    template = "{{ tools is none }}{{ documents is none }}{{ bos_token }}"
    t = Tokenizer.from_dir(_copy_asset(tmp_path, {"chat_template": template}))
    assert t.apply_chat_template([]) == "TrueTrue" + BOS
    assert t.apply_chat_template([], tools=[{"name": "f"}], bos_token="<b>") == "FalseTrue<b>"


def test_template_sees_the_configs_other_named_tokens(tmp_path: Path) -> None:
    """transformers renders with every named special token (pad_token, unk_token, ...); a
    template that wrote pad_token wrote nothing here. Absent or null ones stay undefined."""
    template = "{{ pad_token }}|{{ unk_token }}|{{ mask_token is defined }}"
    t = Tokenizer.from_dir(_copy_asset(tmp_path, {"chat_template": template, "pad_token": BOS,
                                                  "unk_token": {"content": "<u>"}, "mask_token": None}))
    assert t.apply_chat_template([]) == BOS + "|<u>|False"


def test_continue_final_message(tmp_path: Path) -> None:
    """The text ends where the last message's content does (as transformers cuts it), also when
    the template trims that content; asking for a generation prompt as well is an error."""
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content | trim }}</s>{% endfor %}"
    t = Tokenizer.from_dir(_copy_asset(tmp_path, {"chat_template": template}))
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " Sum: "}]
    assert t.apply_chat_template(chat, add_generation_prompt=False) == "<user>hi</s><assistant>Sum:</s>"
    assert t.apply_chat_template(chat, add_generation_prompt=False, continue_final_message=True) == \
        "<user>hi</s><assistant>Sum:"
    with pytest.raises(DeepSeekError, match="exclude each other"):
        t.apply_chat_template(chat, continue_final_message=True)


def test_decode_drops_ids_outside_the_vocab(tok: Tokenizer) -> None:
    """Negative ids and ids past 2**32 raised the Rust side's OverflowError; the docstring says
    ids outside the vocabulary are dropped."""
    ids = tok.encode("hello", add_bos=False)
    assert tok.decode([-1, *ids, 2**40, tok.vocab_size]) == tok.decode(ids) == "hello"
    assert tok.stream_decoder().feed(10**12) == ""


# ---------------------------------------------------------------- the asset is reproducible


def test_asset_matches_generator(tmp_path: Path) -> None:
    script = REPO_ROOT / "tools" / "make_tiny_tokenizer.py"
    spec = importlib.util.spec_from_file_location("make_tiny_tokenizer", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    out = module.main(tmp_path / "regen")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        regenerated = json.loads((out / name).read_text(encoding="utf-8"))
        committed = json.loads((TINY_TOKENIZER_DIR / name).read_text(encoding="utf-8"))
        assert regenerated == committed, f"{name} is stale: rerun tools/make_tiny_tokenizer.py"
