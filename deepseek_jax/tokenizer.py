"""Tokenizer and chat template for DeepSeek-V3 checkpoints, without transformers (SPEC section 9).

A checkpoint directory holds ``tokenizer.json`` (byte-level BPE, loaded with the ``tokenizers``
library) and ``tokenizer_config.json`` (``bos_token``, ``eos_token``, ``add_bos_token`` and the
jinja ``chat_template``, which a newer HF export keeps in ``chat_template.jinja`` instead). The chat template is rendered in a sandboxed jinja2 environment set up
the way Hugging Face renders it, and it inserts bos itself, so :meth:`Tokenizer.encode_chat`
encodes the rendered text without adding special tokens.

:class:`StreamDecoder` turns a stream of generated ids into text for printing as it arrives, holding
back text until its UTF-8 bytes are complete.

This module must not import jax: it is used by the CLI before any device is touched.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers

from deepseek_jax.errors import DeepSeekError

__all__ = ["TINY_TOKENIZER_DIR", "StreamDecoder", "Tokenizer"]

#: The tiny deterministic tokenizer of the demo and tests (built by tools/make_tiny_tokenizer.py).
TINY_TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "tiny_tokenizer"

# DeepSeek-V3's spellings, used when tokenizer_config.json does not name the tokens.
DEFAULT_BOS = "<｜begin▁of▁sentence｜>"
DEFAULT_EOS = "<｜end▁of▁sentence｜>"
#: The files of a Hub tokenizer this module reads (what a model's export copies along).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")

_REPLACEMENT_CHAR = "\ufffd"


def _one_line(text: object) -> str:
    """Collapse a message onto one line (DeepSeekError messages are printed as one line)."""
    return " ".join(str(text).split())


#: appended to the last message's content to find where it ends in the rendered text
_CONTINUE_TAG = "DEEPSEEK_JAX_CONTINUE_HERE "


def _cut_at_tag(text: str) -> str:
    """``text`` up to :data:`_CONTINUE_TAG`, rendered at the end of the last message's content
    (where a template trimmed the content, and so the tag's trailing space, its trailing
    whitespace goes too)."""
    at = text.rfind(_CONTINUE_TAG.strip())
    if at < 0:
        raise DeepSeekError("continue_final_message: the chat template does not write the last message's "
                            "content as it is")
    kept = text[:at]
    return kept if text.startswith(_CONTINUE_TAG, at) else kept.rstrip()


# tokenizer_config.json's other named tokens, passed to chat templates as transformers does
_OTHER_SPECIAL_TOKENS = ("unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def _entry_content(value: object) -> str | None:
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _token_content(value: object, field: str, path: Path) -> str | None:
    """Read a token entry of tokenizer_config.json: a string, ``{"content": ...}``, or null."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise DeepSeekError(f"{path}: {field} must be a string or an object with a 'content' string")


def _select_chat_template(value: object, path: Path) -> str | None:
    """Read ``chat_template``: a string, or a list of ``{"name", "template"}`` (use "default")."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {
            item.get("name"): item.get("template") for item in value if isinstance(item, Mapping)
        }
        template = named.get("default")
        if isinstance(template, str):
            return template
        raise DeepSeekError(
            f"{path}: chat_template is a list of templates but none is named 'default'"
        )
    raise DeepSeekError(f"{path}: chat_template must be a string")


def _raise_exception(message: str) -> None:
    """The ``raise_exception`` helper chat templates call to reject a conversation."""
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """The ``tojson`` filter as HF defines it (no HTML escaping, non-ASCII kept)."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    """The ``strftime_now`` helper some chat templates use for the current date."""
    return datetime.now().strftime(fmt)


def _make_jinja_env() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    """A sandboxed environment set up like the one transformers renders chat templates in."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class Tokenizer:
    """A DeepSeek tokenizer: ``tokenizer.json`` plus the settings and chat template of its config.

    Build one with :meth:`from_dir`. Token ids are plain ``int`` lists.
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        bos_token: str = DEFAULT_BOS,
        eos_token: str = DEFAULT_EOS,
        add_bos_token: bool = True,
        chat_template: str | None = None,
        source: str = "<memory>",
        chat_template_error: str | None = None,
        special_tokens: Mapping[str, str] | None = None,
    ) -> None:
        """Wrap a loaded ``tokenizers.Tokenizer``; ``source`` names where it came from in errors.
        ``chat_template_error``: why the config's template could not be read (raised when a chat is
        rendered; :attr:`has_chat_template` is true, so that a chat is not quietly encoded raw).
        ``special_tokens``: the config's other named tokens (``unk_token``, ``pad_token``, ...),
        which chat templates see as variables."""
        self.special_tokens = dict(special_tokens or {})
        self._tok = tokenizer
        self.chat_template_error = chat_template_error
        self._source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.add_bos_token = add_bos_token
        self.chat_template = chat_template
        self._compiled_template: jinja2.Template | None = None
        self._fingerprint: str | None = None
        self.bos_id = self._require_id(bos_token, "bos_token")
        self.eos_id = self._require_id(eos_token, "eos_token")

    def _require_id(self, token: str, field: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise DeepSeekError(
                f"{self._source}: {field} {token!r} is not in the tokenizer vocabulary"
            )
        return token_id

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load ``tokenizer.json`` and (if present) ``tokenizer_config.json`` from a directory.

        Raises DeepSeekError when the directory or ``tokenizer.json`` is missing, or a file is
        unreadable or corrupt. A missing config is allowed (DeepSeek's bos/eos names, no template).
        """
        directory = Path(path)
        if not directory.is_dir():
            raise DeepSeekError(f"tokenizer directory not found: {directory}")
        tok_file = directory / "tokenizer.json"
        if not tok_file.is_file():
            raise DeepSeekError(
                f"no tokenizer.json in {directory}: text needs it "
                "(generate also takes token ids: --prompt-ids; score: --ids)"
            )
        try:
            raw = tok_file.read_bytes()
        except OSError as err:
            reason = _one_line(err.strerror or err)
            raise DeepSeekError(f"cannot read {tok_file}: {reason}") from err
        try:
            tok = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as err:  # the Rust side raises plain Exception for any parse failure
            raise DeepSeekError(f"corrupt tokenizer file {tok_file}: {_one_line(err)}") from err

        config: Mapping[str, Any] = {}
        cfg_file = directory / "tokenizer_config.json"
        if cfg_file.exists():
            try:
                loaded = json.loads(cfg_file.read_text(encoding="utf-8"))
            except OSError as err:
                reason = _one_line(err.strerror or err)
                raise DeepSeekError(f"cannot read {cfg_file}: {reason}") from err
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                reason = _one_line(err)
                raise DeepSeekError(f"corrupt tokenizer config {cfg_file}: {reason}") from err
            if not isinstance(loaded, Mapping):
                raise DeepSeekError(f"corrupt tokenizer config {cfg_file}: expected a JSON object")
            config = loaded

        jinja_file = directory / "chat_template.jinja"  # newer HF exports keep the template here
        template_error = None
        if jinja_file.is_file():   # (it wins over the config's, as in transformers)
            try:
                chat_template = jinja_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as err:
                raise DeepSeekError(f"cannot read {jinja_file}: {_one_line(err)}") from err
        else:
            try:
                chat_template = _select_chat_template(config.get("chat_template"), cfg_file)
            except DeepSeekError as err:   # an error for what renders a chat, not for encoding text
                chat_template, template_error = None, str(err)

        add_bos = config.get("add_bos_token", True)
        if not isinstance(add_bos, bool):
            raise DeepSeekError(f"{cfg_file}: add_bos_token must be true or false")
        return cls(
            tok,
            bos_token=_token_content(config.get("bos_token"), "bos_token", cfg_file) or DEFAULT_BOS,
            eos_token=_token_content(config.get("eos_token"), "eos_token", cfg_file) or DEFAULT_EOS,
            add_bos_token=add_bos,
            chat_template=chat_template,
            source=str(directory),
            chat_template_error=template_error,
            special_tokens={k: v for k in _OTHER_SPECIAL_TOKENS
                            if isinstance(v := _entry_content(config.get(k)), str)},
        )

    @property
    def has_chat_template(self) -> bool:
        """Whether the tokenizer's files give a chat template (one that may fail to load)."""
        return bool(self.chat_template) or self.chat_template_error is not None

    @property
    def fingerprint(self) -> str:
        """A hex digest of everything that decides how text and chats encode: the vocabulary and
        its rules, bos/eos, ``add_bos_token`` and the chat template (lm-eval keys its request
        cache by it). Computed once."""
        if self._fingerprint is None:
            h = hashlib.sha256(self._tok.to_str().encode("utf-8"))
            for part in (self.bos_token, self.eos_token, str(self.add_bos_token), self.chat_template or "",
                         self.chat_template_error or "", json.dumps(self.special_tokens, sort_keys=True)):
                h.update(b"\0" + part.encode("utf-8", "surrogatepass"))
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer knows, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        """The id of one token string (e.g. a special token), or None if it is not in the vocab."""
        return self._tok.token_to_id(token)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Encode ``text``; prepend bos if ``add_bos`` (default: the config's ``add_bos_token``,
        unless ``text`` already starts with the bos token's text, e.g. a rendered chat template).

        Special-token strings inside ``text`` (e.g. ``<｜User｜>``) map to their ids.
        """
        try:
            ids: list[int] = self._tok.encode(text, add_special_tokens=False).ids
        except TypeError:   # the Rust side takes only str, and only UTF-8-encodable str
            if not isinstance(text, str):
                raise DeepSeekError(f"text to encode must be a string, got {type(text).__name__}") from None
            bad = next((i for i, c in enumerate(text) if 0xD800 <= ord(c) <= 0xDFFF), None)
            if bad is None:
                raise
            raise DeepSeekError(f"text holds a lone surrogate {text[bad]!r} at character {bad}: "
                                "not valid Unicode text") from None
        if add_bos is None:
            add_bos = self.add_bos_token and not text.startswith(self.bos_token)
        if add_bos:
            ids.insert(0, self.bos_id)
        return ids

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """``(context ids, continuation ids)`` by lm-evaluation-harness's causal-LM convention: the
        context's trailing whitespace moves to the continuation, the whole text is encoded (bos
        per :meth:`encode`) and split at the context's length; an empty context is bos alone (or
        the continuation's own leading bos)."""
        if context == "":
            cont = self.encode(continuation, add_bos=False)
            return (cont[:1], cont[1:]) if cont and cont[0] == self.bos_id else ([self.bos_id], cont)
        stripped = context.rstrip()
        if stripped != context:
            context, continuation = stripped, context[len(stripped):] + continuation
        ctx = self.encode(context)
        return ctx, self.encode(context + continuation)[len(ctx):]

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Decode ids to text, dropping special tokens if ``skip_special``.

        Ids outside the tokenizer's vocabulary (the embedding is padded past it) are dropped.
        """
        # (the Rust side skips ids it does not know, but takes only u32: a negative or huge id was
        # an OverflowError)
        return self._tok.decode([i for i in map(int, ids) if 0 <= i < 1 << 32], skip_special_tokens=skip_special)

    def check_chat_template(self) -> None:
        """Raises the :class:`DeepSeekError` that rendering a chat would: no template, or one that
        could not be read or is not valid jinja (so that a chat fails before a model loads)."""
        self._template()

    def _template(self) -> jinja2.Template:
        if self._compiled_template is None:
            if self.chat_template_error is not None and not self.chat_template:
                raise DeepSeekError(self.chat_template_error)
            if not self.chat_template:
                raise DeepSeekError(
                    f"{self._source}: tokenizer_config.json has no chat_template; "
                    "chat needs one (pass a raw prompt instead)"
                )
            try:
                self._compiled_template = _make_jinja_env().from_string(self.chat_template)
            except jinja2.exceptions.TemplateSyntaxError as err:
                raise DeepSeekError(
                    f"{self._source}: chat_template is not valid jinja (line {err.lineno}): "
                    f"{_one_line(err.message)}"
                ) from err
        return self._compiled_template

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        *,
        continue_final_message: bool = False,
        **extra: Any,
    ) -> str:
        """Render a conversation (``[{"role": ..., "content": ...}, ...]``) to prompt text.

        ``continue_final_message``: the text ends with the last message's content, whatever the
        template writes after it (the eos that closes an assistant turn), so that a model continues
        that message (transformers' option of that name; lm-eval's ``gen_prefix``). The template sees ``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``,
        the config's other named tokens (``unk_token``, ``pad_token``, ...) and
        ``tools``/``documents`` (None), as transformers passes them; ``extra`` keyword arguments
        are further variables, and override those.
        """
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
                raise DeepSeekError(f"chat message {i} must be a mapping with a string 'role'")
        if continue_final_message:
            if add_generation_prompt:
                raise DeepSeekError("continue_final_message and add_generation_prompt exclude each other: "
                                    "one continues the last message, the other starts a new one")
            if not messages or not isinstance(messages[-1].get("content"), str):
                raise DeepSeekError("continue_final_message needs a last message with string content")
        template = self._template()
        messages = [dict(m) for m in messages]
        if continue_final_message:   # (found by a tag: the content itself may recur in what follows it)
            messages[-1]["content"] += _CONTINUE_TAG
        try:
            variables = {**self.special_tokens, "bos_token": self.bos_token, "eos_token": self.eos_token,
                         "tools": None, "documents": None, **extra}
            text = template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        except Exception as err:  # the template is user data: anything it raises is a user error
            detail = err.message if isinstance(err, jinja2.exceptions.TemplateError) else err
            raise DeepSeekError(
                f"chat template render failed: {_one_line(detail or type(err).__name__)}"
            ) from err
        return _cut_at_tag(text) if continue_final_message else text

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Render a conversation and encode it (no bos added: the template inserts it)."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        return self.encode(text, add_bos=False)

    def stream_decoder(self, skip_special: bool = True) -> StreamDecoder:
        """A fresh :class:`StreamDecoder` over this tokenizer."""
        return StreamDecoder(self, skip_special=skip_special)


class StreamDecoder:
    """Incremental detokenizer: feed generated ids one at a time, get back the newly complete text.

    Text is held back while it ends in an incomplete UTF-8 sequence (which would decode to U+FFFD),
    and released once the remaining bytes arrive. Each step decodes only a short window (the ids
    since the last emitted chunk, plus that chunk for context), so streaming stays linear in length.
    Call :meth:`flush` at the end to get whatever is still held back.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the context window (the last emitted chunk)
        self._read_offset = 0  # end of the emitted ids

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special=self._skip_special)

    def text_of(self, n: int) -> str:
        """The text of the first ``n`` ids fed, without an incomplete character at its end."""
        return self._decode(self._ids[:n]).rstrip(_REPLACEMENT_CHAR)

    def feed(self, token_id: int) -> str:
        """Add one id; return the text it completes (may be empty)."""
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT_CHAR):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return new_text[len(prefix_text) :]
        return ""

    def feed_many(self, token_ids: Sequence[int]) -> str:
        """Feed several ids; return the text they complete."""
        return "".join(self.feed(t) for t in token_ids)

    def flush(self) -> str:
        """Return all text still held back (even if incomplete) and reset for a new stream."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        self.reset()
        return new_text[len(prefix_text) :]

    def reset(self) -> None:
        """Forget all ids fed so far."""
        self._ids = []
        self._prefix_offset = 0
        self._read_offset = 0
