"""The generation engine: one compiled prefill, then a compiled decode loop on device.

Layout of one :meth:`Generator.generate` call (SPEC §3, §8):

* **Buckets.** A batch of ``B`` prompts is padded to a batch bucket ``Bb`` (powers of two) and
  the longest prompt to a prompt bucket ``Pb``; the latent cache is allocated once with
  ``S = bucket(max(prompt_len + budget))`` positions (16, 32, 64, 128, 192, 256, 384, 512, ...:
  powers of two and 1.5x powers of two, capped at the model's maximum length). Compiled
  executables are cached per process by the model's graph and ``(Bb, Pb, S, greedy, filtered)``:
  prompts and lengths that fall into the same buckets reuse them (across generators too), and
  sampling numbers (temperature, k, p, seed, eos id) are traced, never static.
* **Weights.** On CPU (no FP8 arithmetic) FP8 weights are dequantized once into the compute
  dtype when the generator is built (``weights="auto"``), not at every decode step: the same
  numbers, several times faster per token.
* **Prefill.** One naive-MLA pass over the right-padded prompts at positions ``0..Pb-1`` writes
  the latent cache (pad tokens sit at positions after every real token, so no real token sees
  them, and decode overwrites them before it can); each row's first new token is drawn from the
  logits at its own last prompt position (``lm_head`` runs on those ``B`` rows only).
* **Decode.** A ``jax.lax.while_loop`` runs one absorbed-MLA step per iteration for all rows at
  their own positions: feed the last token, draw the next, write it into a ``[Bb, S]`` token
  buffer indexed by absolute position. A row is done at eos (unless ``stop_at_eos=False``) or
  when its budget is spent; a done row stays frozen at its last position (it recomputes the same
  step, whose results are discarded), and the loop exits when every row is done or a step limit
  is reached. No host round trip happens inside the loop.
* **Streaming.** The step limit is a traced argument, so the *same* compiled decode executable
  serves both modes: without streaming it is called once with the full budget; with a
  ``stream`` callback it is called repeatedly with ``limit = step + stream_chunk`` and the
  loop state (cache included) is donated from one call to the next, so nothing is copied. After
  each chunk the host reads the token buffer and passes the new tokens on. This keeps the loop
  compiled and deterministic (a row's key for step ``i`` is ``fold_in(row_key, i)``, so chunked
  and unchunked runs draw the same tokens), at the cost of one host sync per ``stream_chunk``
  tokens. Host callbacks from inside the loop (``io_callback``) were the alternative: they sync
  on every token and tie the loop to an ordered host effect, which is worse on accelerators.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_jax.cache import LatentCache
from deepseek_jax.errors import DeepSeekError
from deepseek_jax.model import DeepSeekV3
from deepseek_jax.quant import dequantize
from deepseek_jax.sampling import GREEDY, SamplingParams, row_keys, sample

__all__ = ["Generator", "GenerationStats", "Result", "length_bucket", "batch_bucket"]

#: ``stream(row, new_ids)``: called with each row's newly generated ids as they arrive.
StreamFn = Callable[[int, list[int]], None]


def length_bucket(n: int, minimum: int = 16) -> int:
    """The smallest of 16, 32, 64, 128, 192, 256, 384, 512, 768, ... (powers of two, and from
    128 on also 1.5x powers of two: at most a third of a cache is ever waste) that holds ``n``."""
    n = max(int(n), minimum)
    p = 1 << (n - 1).bit_length()
    return p * 3 // 4 if p >= 256 and n <= p * 3 // 4 else p


def batch_bucket(n: int) -> int:
    """Powers of two."""
    return 1 << (max(int(n), 1) - 1).bit_length()


@dataclasses.dataclass
class Result:
    prompt_ids: list[int]
    output_ids: list[int]          # the new tokens, eos (when it ended the row) not included
    finish_reason: str             # "eos" | "length"
    text: str | None = None        # decoded output (generate_text / CLI), else None

    def to_json(self) -> dict[str, Any]:
        return {"prompt_ids": self.prompt_ids, "output_ids": self.output_ids, "text": self.text,
                "finish_reason": self.finish_reason}


@dataclasses.dataclass
class GenerationStats:
    batch: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0            # tokens returned (after cutting at eos), summed over rows
    steps: int = 0                 # decode steps run (the longest row's count)
    compile_s: float = 0.0         # compiling executables this call needed (0 when cached)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    buckets: tuple[int, int, int] = (0, 0, 0)   # (Bb, Pb, S)

    @property
    def tokens_per_s(self) -> float:
        t = self.prefill_s + self.decode_s
        return self.new_tokens / t if t > 0 else 0.0


class DecodeState(NamedTuple):
    cache: LatentCache
    buf_BS: jax.Array      # int32 tokens by absolute position: prompt, then generated
    cur_B: jax.Array       # position of each row's last drawn token (fed at the next step)
    end_B: jax.Array       # last position a row may fill (prompt_len + budget - 1)
    done_B: jax.Array      # bool
    keys_B: jax.Array      # per-row PRNG keys
    step: jax.Array        # tokens drawn so far per row (int32 scalar)


class _Knobs(NamedTuple):
    """Traced per-call settings (changing them never recompiles)."""
    eos: jax.Array
    stop: jax.Array
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array


def _draw(logits_BV, keys_B, step, knobs: _Knobs, greedy: bool, filtered: bool):
    return sample(logits_BV, keys_B, step, greedy=greedy, filtered=filtered,
                  temperature=knobs.temperature, top_k=knobs.top_k, top_p=knobs.top_p)


def _prefill(graphdef, greedy: bool, filtered: bool, S: int, params, ids_BP, lens_B, end_B, active_B,
             seed, knobs: _Knobs) -> DecodeState:
    model: DeepSeekV3 = nnx.merge(graphdef, params)
    B, P = ids_BP.shape
    dtype = model.prec.dtype
    cache = LatentCache.zeros(model.cfg, B, S, dtype=dtype)
    pos_BP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    out = model(ids_BP, pos_BP, cache=cache, absorbed=False, logits=False)
    h_B1D = jnp.take_along_axis(out.hidden, (lens_B - 1)[:, None, None], axis=1)
    logits_BV = model.lm_head(h_B1D, dtype)[:, 0]
    keys_B = row_keys(seed, B)
    tok_B = _draw(logits_BV, keys_B, jnp.int32(0), knobs, greedy, filtered)
    tok_B = jnp.where(active_B, tok_B, knobs.eos)
    n = min(P, S)
    rows = jnp.arange(B)
    buf_BS = jnp.zeros((B, S), jnp.int32).at[:, :n].set(ids_BP[:, :n]).at[rows, lens_B].set(tok_B, mode="drop")
    done_B = ~active_B | (knobs.stop & (tok_B == knobs.eos)) | (lens_B >= end_B)
    return DecodeState(out.cache, buf_BS, lens_B, end_B, done_B, keys_B, jnp.int32(1))


def _decode(graphdef, greedy: bool, filtered: bool, params, state: DecodeState, limit,
            knobs: _Knobs) -> DecodeState:
    rows = jnp.arange(state.buf_BS.shape[0])

    def cond(s: DecodeState):
        return (s.step < limit) & ~jnp.all(s.done_B)

    def body(s: DecodeState):
        model: DeepSeekV3 = nnx.merge(graphdef, params)
        tok_B = s.buf_BS[rows, s.cur_B]
        out = model(tok_B[:, None], s.cur_B[:, None], cache=s.cache, absorbed=True)
        new_B = _draw(out.logits[:, 0], s.keys_B, s.step, knobs, greedy, filtered)
        cur_B = jnp.where(s.done_B, s.cur_B, s.cur_B + 1)
        buf_BS = s.buf_BS.at[rows, cur_B].set(jnp.where(s.done_B, s.buf_BS[rows, cur_B], new_B))
        done_B = s.done_B | (knobs.stop & (new_B == knobs.eos)) | (cur_B >= s.end_B)
        return DecodeState(out.cache, buf_BS, cur_B, s.end_B, done_B, s.keys_B, s.step + 1)

    return jax.lax.while_loop(cond, body, state)


# Compiled (prefill, decode) pairs, shared by every Generator of the process: keyed by the model's
# graph (structure, config, precision), its parameters' shapes/dtypes/shardings and the buckets.
_EXECUTABLES: dict[tuple, tuple[Any, Any]] = {}
_MAX_EXECUTABLES = 64
# weights="auto" dequantizes FP8 weights once on CPU when the dense copy stays below this.
_AUTO_DEQUANTIZE_BYTES = 8 << 30


def _executables(graphdef, key: tuple, params, prefill_args, knobs):
    """AOT-compiled (prefill, decode) for ``key = (Bb, Pb, S, greedy, filtered)``, and the
    seconds spent compiling (0 on a cache hit)."""
    leaves = tuple((x.shape, str(x.dtype), getattr(x, "sharding", None)) for x in jax.tree.leaves(params))
    full_key = (graphdef, jax.tree.structure(params), leaves, key)
    hit = _EXECUTABLES.get(full_key)
    if hit is not None:
        return hit, 0.0
    _, _, S, greedy, filtered = key
    t0 = time.perf_counter()
    pre = jax.jit(lambda p, *a: _prefill(graphdef, greedy, filtered, S, p, *a))
    pre_c = pre.lower(params, *prefill_args, knobs).compile()
    state_shape = jax.eval_shape(pre, params, *prefill_args, knobs)
    dec = jax.jit(lambda p, st, lim, kn: _decode(graphdef, greedy, filtered, p, st, lim, kn), donate_argnums=1)
    dec_c = dec.lower(params, state_shape, jnp.int32(0), knobs).compile()
    if len(_EXECUTABLES) >= _MAX_EXECUTABLES:
        _EXECUTABLES.pop(next(iter(_EXECUTABLES)))
    _EXECUTABLES[full_key] = (pre_c, dec_c)
    return (pre_c, dec_c), time.perf_counter() - t0


_ROPES: dict = {}


def dequantized_model(model: DeepSeekV3) -> DeepSeekV3:
    """A copy of ``model`` whose FP8 linear weights are dequantized once into the compute dtype
    (``W = Wq * S``, the exact W8A16 weights), without the MTP module; other parameters are
    shared. Same numbers as the FP8 model, no per-step dequantization; 4x (float32) or 2x (bf16)
    the memory of the FP8 weights. What CPU generation uses (CPUs have no FP8 arithmetic)."""
    cfg, prec = model.cfg, model.prec
    if not cfg.fp8:
        return model
    dense_cfg = cfg.replace(fp8=False)
    twin = nnx.eval_shape(lambda: DeepSeekV3(dense_cfg, prec=prec, rngs=nnx.Rngs(0), with_mtp=False))
    # Rope is a static attribute compared by identity: one instance per config keeps the graphs
    # of equal models equal, so their compiled executables are shared (see _EXECUTABLES).
    twin.rope = _ROPES.setdefault(dense_cfg, twin.rope)
    graphdef, abstract = nnx.split(twin)
    src = dict(nnx.to_flat_state(nnx.state(model)))
    flat = []
    for path, var in nnx.to_flat_state(abstract):
        scale = src.get(path[:-1] + ("weight_scale_inv",))
        value = src[path][...]
        if path[-1] == "weight" and scale is not None:
            value = dequantize(value, scale[...], prec.dtype)
        flat.append((path, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _dequantized_bytes(model: DeepSeekV3) -> int:
    size = jnp.dtype(model.prec.dtype).itemsize
    return sum(x.size * size for x in jax.tree.leaves(nnx.state(model)) if x.dtype == jnp.float8_e4m3fn)


class Generator:
    """Batched generation with a pre-allocated latent cache and a compiled decode loop.

    ``max_len`` caps prompt + new tokens (default and upper bound: the config's
    ``max_position_embeddings``); prompts that leave no room for one new token are an error, and
    a row's budget is cut to what fits (finish reason "length"). ``stream_chunk``: decode steps
    per streamed chunk. ``weights``: "as-is" reads the model's own weights at every call (a model
    being trained can keep using the generator); "dequantize" works from a copy with the FP8
    weights dequantized once (a snapshot: build a new generator after changing the weights);
    "auto" picks "dequantize" on CPU for W8A16 models whose dense copy stays under 8 GiB.
    """

    def __init__(self, model: DeepSeekV3, tokenizer=None, *, max_len: int | None = None,
                 stream_chunk: int = 8, weights: str = "auto"):
        if weights not in ("auto", "as-is", "dequantize"):
            raise DeepSeekError(f"weights {weights!r}: expected auto|as-is|dequantize")
        if weights == "auto":
            weights = "dequantize" if (jax.default_backend() == "cpu" and model.cfg.fp8
                                       and model.prec.fp8_mode == "w8a16"
                                       and _dequantized_bytes(model) <= _AUTO_DEQUANTIZE_BYTES) else "as-is"
        self.weights = weights
        self.model = dequantized_model(model) if weights == "dequantize" else model
        self.tokenizer = tokenizer
        cfg = model.cfg
        self.vocab_size = cfg.vocab_size
        limit = cfg.max_position_embeddings
        if max_len is not None and not 2 <= max_len <= limit:
            raise DeepSeekError(f"max_len {max_len} outside [2, {limit}] (max_position_embeddings)")
        self.max_len = int(max_len or limit)
        if stream_chunk < 1:
            raise DeepSeekError(f"stream_chunk must be >= 1, got {stream_chunk}")
        self.stream_chunk = int(stream_chunk)
        self.eos_id = int(cfg.eos_token_id)
        self._compiles = 0
        self.last_stats = GenerationStats()

    # ---- compiled functions ----------------------------------------------------------------
    @property
    def compile_count(self) -> int:
        """Number of (prefill, decode) executable pairs this generator had to compile."""
        return self._compiles

    # ---- validation ------------------------------------------------------------------------
    def _check_prompts(self, prompts_ids) -> list[list[int]]:
        if isinstance(prompts_ids, np.ndarray):
            prompts_ids = prompts_ids.tolist() if prompts_ids.ndim == 2 else [prompts_ids.tolist()]
        if not isinstance(prompts_ids, Sequence) or isinstance(prompts_ids, (str, bytes)) or not prompts_ids:
            raise DeepSeekError("prompts: expected a non-empty list of token id lists")
        V, out = self.vocab_size, []
        for i, p in enumerate(prompts_ids):
            if isinstance(p, np.ndarray):
                p = p.tolist()
            if not isinstance(p, Sequence) or isinstance(p, (str, bytes)):
                raise DeepSeekError(f"prompt {i}: expected a list of token ids, got {type(p).__name__}")
            if len(p) == 0:
                raise DeepSeekError(f"prompt {i} is empty")
            ids = []
            for j, t in enumerate(p):
                if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                    raise DeepSeekError(f"prompt {i}: token {j} is {t!r}, not an integer id")
                if not 0 <= int(t) < V:
                    raise DeepSeekError(f"prompt {i}: token id {int(t)} at index {j} is outside the vocab [0, {V})")
                ids.append(int(t))
            if len(ids) >= self.max_len:
                raise DeepSeekError(f"prompt {i} has {len(ids)} tokens; at most {self.max_len - 1} fit "
                                    f"(max length {self.max_len} incl. at least one new token)")
            out.append(ids)
        return out

    # ---- generation ------------------------------------------------------------------------
    def generate(self, prompts_ids, *, max_new_tokens: int = 200, sampling: SamplingParams | None = None,
                 seed: int = 0, stop_at_eos: bool = True, eos_id: int | None = None,
                 stream: StreamFn | None = None, stream_chunk: int | None = None) -> list[Result]:
        """Generates up to ``max_new_tokens`` per prompt (fewer where the max length cuts in).

        ``sampling`` defaults to greedy; ``seed`` makes sampling reproducible. ``eos_id``
        overrides the config's eos. ``stream(row, new_ids)`` is called with each row's new
        tokens every ``stream_chunk`` decode steps. Returns one :class:`Result` per prompt.
        """
        prompts = self._check_prompts(prompts_ids)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
                or max_new_tokens < 0:
            raise DeepSeekError(f"max-new-tokens must be an integer >= 0, got {max_new_tokens!r}")
        sampling = (sampling or GREEDY).validate()
        eos = self.eos_id if eos_id is None else int(eos_id)
        if not 0 <= eos < self.vocab_size:
            raise DeepSeekError(f"eos id {eos} is outside the vocab [0, {self.vocab_size})")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise DeepSeekError(f"seed must be an integer, got {seed!r}")
        chunk = int(stream_chunk or self.stream_chunk)
        if chunk < 1:
            raise DeepSeekError(f"stream_chunk must be >= 1, got {chunk}")

        B = len(prompts)
        lens = np.array([len(p) for p in prompts], np.int32)
        budgets = np.minimum(int(max_new_tokens), self.max_len - lens)
        stats = GenerationStats(batch=B, prompt_tokens=int(lens.sum()))
        self.last_stats = stats
        if max_new_tokens == 0:
            return [Result(p, [], "length") for p in prompts]

        Bb = batch_bucket(B)
        S = min(length_bucket(int((lens + budgets).max())), self.max_len)
        Pb = min(length_bucket(int(lens.max())), S)
        ids = np.zeros((Bb, Pb), np.int32)
        lens_b = np.ones(Bb, np.int32)
        end_b = np.ones(Bb, np.int32)
        active = np.zeros(Bb, bool)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = p
        ids[B:, 0] = eos
        lens_b[:B], end_b[:B], active[:B] = lens, lens + budgets - 1, True
        stats.buckets = (Bb, Pb, S)

        graphdef, params = nnx.split(self.model)
        temp, top_k, top_p = sampling.traced()
        knobs = _Knobs(jnp.int32(eos), jnp.bool_(stop_at_eos), temp, top_k, top_p)
        prefill_args = (jnp.asarray(ids), jnp.asarray(lens_b), jnp.asarray(end_b), jnp.asarray(active),
                        jnp.uint32(int(seed) & 0xFFFFFFFF))
        (pre, dec), stats.compile_s = _executables(graphdef, (Bb, Pb, S, sampling.greedy, sampling.filtered),
                                                   params, prefill_args, knobs)
        self._compiles += stats.compile_s > 0

        t0 = time.perf_counter()
        state = pre(params, *prefill_args, knobs)
        jax.block_until_ready(state)
        t1 = time.perf_counter()
        stats.prefill_s = t1 - t0
        max_steps = int(budgets.max())
        emitted = lens.copy()   # next position to stream, per row

        def emit(buf, cur, done):
            for r in range(B):
                stop = int(cur[r]) + 1
                if stop_at_eos and done[r] and buf[r, cur[r]] == eos:
                    stop -= 1
                if stop > emitted[r]:
                    stream(r, buf[r, emitted[r]:stop].tolist())
                    emitted[r] = stop

        if stream is None:
            if max_steps > 1:
                state = dec(params, state, jnp.int32(max_steps), knobs)
            buf, cur, done, steps = jax.device_get((state.buf_BS, state.cur_B, state.done_B, state.step))
        else:
            while True:
                buf, cur, done, steps = jax.device_get((state.buf_BS, state.cur_B, state.done_B, state.step))
                emit(buf, cur, done)
                if int(steps) >= max_steps or done[:B].all():
                    break
                state = dec(params, state, jnp.int32(min(int(steps) + chunk, max_steps)), knobs)
        stats.decode_s = time.perf_counter() - t1
        stats.steps = int(steps)

        results = []
        for r, p in enumerate(prompts):
            out = buf[r, lens[r]:cur[r] + 1].tolist()
            reason = "length"
            if stop_at_eos and out and out[-1] == eos:
                out, reason = out[:-1], "eos"
            results.append(Result(p, out, reason))
        stats.new_tokens = sum(len(r.output_ids) for r in results)
        return results

    # ---- text ------------------------------------------------------------------------------
    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise DeepSeekError("text generation needs a tokenizer (tokenizer.json in the checkpoint)")
        return self.tokenizer

    def encode_prompt(self, text: str, chat: bool | None = None) -> list[int]:
        """Token ids of a text prompt: the chat template when ``chat`` (default: if the tokenizer
        has one) with a generation prompt, else the raw text (with bos per the tokenizer config)."""
        tok = self._need_tokenizer()
        if not isinstance(text, str) or not text:
            raise DeepSeekError("prompt is empty")
        if chat is None:
            chat = bool(tok.chat_template)
        if chat:
            return tok.encode_chat([{"role": "user", "content": text}])
        return tok.encode(text)

    def generate_text(self, texts: str | Sequence[str], *, chat: bool | None = None,
                      stream: Callable[[int, str], None] | None = None, **kw) -> list[Result]:
        """Like :meth:`generate` from text prompts; each result carries ``text``.

        ``stream(row, text_piece)`` receives decoded text as it completes.
        """
        tok = self._need_tokenizer()
        if isinstance(texts, str):
            texts = [texts]
        prompts = []
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t:
                raise DeepSeekError(f"prompt {i} is empty")
            prompts.append(self.encode_prompt(t, chat))
        id_stream = None
        if stream is not None:
            decoders = [tok.stream_decoder() for _ in prompts]

            def id_stream(row, ids):
                piece = decoders[row].feed_many(ids)
                if piece:
                    stream(row, piece)
        results = self.generate(prompts, stream=id_stream, **kw)
        if stream is not None:
            for r, d in enumerate(decoders):
                rest = d.flush()
                if rest:
                    stream(r, rest)
        for r in results:
            r.text = tok.decode(r.output_ids)
        return results
