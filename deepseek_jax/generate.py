"""The generation engine: one compiled prefill, then a compiled decode loop on device.

Layout of one :meth:`Generator.generate` call (SPEC §3, §8):

* **Buckets.** A batch of ``B`` prompts is padded to a batch bucket ``Bb`` (powers of two; on a
  mesh a multiple of its ``data`` size) and the longest prompt to a prompt bucket ``Pb``; the latent
  cache is allocated once with
  ``S = bucket(max(prompt_len + budget))`` positions (16, 32, 64, 128, 192, 256, 384, 512, ...:
  powers of two and 1.5x powers of two, capped at the model's maximum length). Compiled
  executables are cached per process by the model's graph and ``(Bb, Pb, S, greedy, filtered,
  speculative, prefill chunk, continuation, logprobs, top_logprobs)``:
  prompts and lengths that fall into the same buckets reuse them (across generators too), and
  sampling numbers (temperature, k, p, seed, eos id) are traced, never static.
* **Weights.** On CPU (no FP8 arithmetic) FP8 weights are dequantized once into the compute
  dtype when the generator is built (``weights="auto"``), not at every decode step: the same
  numbers, several times faster per token. A small such model's layers are also cut into
  per-layer arrays once, and prefill and decode run them over a per-layer cache (:class:`Weights`).
* **Prefill.** One naive-MLA pass over the right-padded prompts at positions ``0..Pb-1`` writes
  the latent cache (pad tokens sit at positions after every real token, so no real token sees
  them, and decode overwrites them before it can); each row's first new token is drawn from the
  logits at its own last prompt position (``lm_head`` runs on those ``B`` rows only). A long
  prompt goes in chunks (``prefill_chunk``): the first naive, the rest absorbed over the cache
  written so far, in a ``fori_loop`` inside the same executable, so the attention scores are
  ``[B, H, chunk, S]`` instead of ``[B, H, Pb, Pb]``. With ``reuse_prefix`` (chat), a
  single-prompt call keeps its cache, and the next one that starts with the same tokens runs
  only the rest, absorbed over that cache (:func:`_prefill_continue`). Prompts of a batch that
  all start with the same tokens (``share_prefix``) prefill those once, in a batch-1 program
  (:func:`_prefill_prefix`), and their rests the same way over copies of that cache. The
  generator keeps that batch-1 cache (one entry), and a later call whose prompts all start
  with the same tokens (a batch, or a single prompt) continues it without prefilling them again
  (:func:`_kept_prefix`).
* **Decode.** A ``jax.lax.while_loop`` runs one absorbed-MLA step per iteration for all rows at
  their own positions: feed the last token, draw the next, write it into a ``[Bb, S]`` token
  buffer indexed by absolute position. A row is done at eos (unless ``stop_at_eos=False``), at
  one of the call's ``stop_token_ids`` (a traced ``[16]`` array padded with -1), or when its
  budget is spent; a done row stays frozen at its last position (it recomputes the same
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
* **Stop strings** (:meth:`Generator.generate_text` with ``stop=``) are text, so they are found
  on the host: the loop runs in chunks as for streaming, each row's new tokens are detokenized
  after each chunk, and a row whose text now holds a stop string is marked done in the loop
  state (``done_B``) before the next chunk, so the loop ends once every row is done. Without
  stop strings nothing changes (no extra host round trip).
* **Speculative decoding** (``speculative="mtp"``, SPEC §6): the MTP module drafts a token
  ahead and the main model verifies it, in the same kind of compiled loop
  (:mod:`deepseek_jax.speculative`).
* **Log-probs** (``logprobs=True``): each generated token's log-probability under the model's
  own next-token distribution (``log_softmax`` of the raw logits: temperature 1, no top-k/top-p),
  the number :func:`deepseek_jax.sequence_logprobs` gives for that position. Taken on the device
  from the logits that drew the token (the prefill's for the first, each decode step's, and
  speculatively the verifier's for both positions) into a float32 ``[Bb, S]`` buffer ``lp_BS`` by
  absolute position beside ``buf_BS``; it comes to the host with the tokens. A static switch
  (part of the executables' key): without it the state has no such buffer and nothing changes.
  ``top_logprobs=K`` (1..20, implies ``logprobs``) adds the ``K`` most likely tokens of each
  generated position under the same raw distribution: ``jax.lax.top_k`` of the same float32
  logits (most likely first, ties lowest id first, so a greedy token is the first entry), minus
  their ``logsumexp``, into an int32 and a float32 ``[Bb, S, K]`` buffer (``top_ids_BSK``,
  ``top_lp_BSK``) written where ``lp_BS`` is. ``K`` is static (part of the key); with ``K = 0``
  the state has neither buffer and the programs are those of ``logprobs`` alone.
"""

from __future__ import annotations

import dataclasses
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np
from flax import nnx

from deepseek_jax.cache import LatentCache
from deepseek_jax.config import _is_int  # a JSON-style integer: int or numpy integer, not bool
from deepseek_jax.errors import DeepSeekError, check_bool
from deepseek_jax.model import DeepSeekV3
from deepseek_jax.quant import dequantize
from deepseek_jax.sampling import GREEDY, SamplingParams, row_keys, sample

__all__ = ["Generator", "GenerationStats", "Result", "Weights", "length_bucket", "batch_bucket",
           "MAX_STOP_TOKEN_IDS", "MAX_TOP_LOGPROBS"]

#: ``stream(row, new_ids)``: called with each row's newly generated ids as they arrive.
StreamFn = Callable[[int, list[int]], None]

#: At most this many ``stop_token_ids`` per call: they travel as a fixed-size traced array
#: (padded with -1), so changing them never recompiles.
MAX_STOP_TOKEN_IDS = 16
_NO_STOP_IDS = np.full(MAX_STOP_TOKEN_IDS, -1, np.int32)
_NO_STOP_IDS.setflags(write=False)

#: ``top_logprobs`` asks for at most this many alternatives per token (OpenAI's limit).
MAX_TOP_LOGPROBS = 20


def length_bucket(n: int, minimum: int = 16) -> int:
    """The smallest of 16, 32, 64, 128, 192, 256, 384, 512, 768, ... (powers of two, and from
    128 on also 1.5x powers of two: at most a third of a cache is ever waste) that holds ``n``."""
    n = max(int(n), minimum)
    p = 1 << (n - 1).bit_length()
    return p * 3 // 4 if p >= 256 and n <= p * 3 // 4 else p


def batch_bucket(n: int, data: int = 1) -> int:
    """The smallest power of two that holds ``n`` rows, rounded up to a multiple of ``data`` (the
    size of the mesh axis that splits the batch: a batch it cannot split made XLA gather and
    re-split it around the MoE exchange at every step, warning of "involuntary full
    rematerialization"; the padding rows cost what replicating the batch did)."""
    b = 1 << (max(int(n), 1) - 1).bit_length()
    return -(-b // data) * data


@dataclasses.dataclass
class Result:
    prompt_ids: list[int]
    # The new tokens; eos or a stop token id that ended the row is not included. A row ended
    # by a stop *string* (generate_text) keeps the tokens up to and including the one whose text
    # completed it (``text`` is cut right before the string).
    output_ids: list[int]
    finish_reason: str             # "eos" | "stop" (a stop token id or stop string) | "length"
    text: str | None = None        # decoded output (generate_text / CLI), else None
    # With ``logprobs=True``: one float per ``output_ids`` token, its log-probability under the
    # model's raw next-token distribution (temperature 1, unfiltered); else None.
    logprobs: list[float] | None = None
    # With ``top_logprobs=K > 0``: per ``output_ids`` token, the ``K`` most likely ``(token id,
    # log-prob)`` pairs of its position under that same distribution, most likely first (ties:
    # lowest id first); else None.
    top_logprobs: list[list[tuple[int, float]]] | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"prompt_ids": self.prompt_ids, "output_ids": self.output_ids, "text": self.text,
               "finish_reason": self.finish_reason}
        if self.logprobs is not None:
            out["logprobs"] = self.logprobs
        if self.top_logprobs is not None:   # [[id, logprob], ...] per output token
            out["top_logprobs"] = [[[i, v] for i, v in pos] for pos in self.top_logprobs]
        return out


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
    prefill_chunk: int | None = None  # prompt tokens per prefill chunk (None: one pass)
    reused_prefix: int = 0         # prompt tokens whose cache entries came from the last call
    shared_prefix: int = 0         # leading prompt tokens every row shares, prefilled once for the batch
    prefix_cached: bool = False    # ... whose cache was kept from an earlier call instead (not prefilled)
    speculative: str | None = None  # "mtp" when the call used speculative decoding
    drafted: int = 0               # speculative: drafts that could have been used, summed over rows
    accepted: int = 0              # speculative: drafts the main model accepted

    @property
    def tokens_per_s(self) -> float:
        t = self.prefill_s + self.decode_s
        return self.new_tokens / t if t > 0 else 0.0

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / drafted (speculative calls; None otherwise or when nothing was drafted)."""
        return self.accepted / self.drafted if self.speculative and self.drafted else None


class DecodeState(NamedTuple):
    cache: LatentCache
    buf_BS: jax.Array      # int32 tokens by absolute position: prompt, then generated
    cur_B: jax.Array       # position of each row's last drawn token (fed at the next step)
    end_B: jax.Array       # last position a row may fill (prompt_len + budget - 1)
    done_B: jax.Array      # bool
    keys_B: jax.Array      # per-row PRNG keys
    step: jax.Array        # tokens drawn so far per row (int32 scalar)
    lp_BS: Any = None      # logprobs: float32 log-prob of each generated token by position, else None
    top_ids_BSK: Any = None  # top_logprobs K > 0: int32 [B, S, K] the K most likely ids by position, else None
    top_lp_BSK: Any = None   # ... and their float32 log-probs


class _Knobs(NamedTuple):
    """Traced per-call settings (changing them never recompiles). ``stop``: whether eos ends a
    row; ``stop_ids``: further ids that end a row, int32 ``[MAX_STOP_TOKEN_IDS]`` padded with -1."""
    eos: jax.Array
    stop: jax.Array
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    stop_ids: Any = _NO_STOP_IDS


def _ends(tok_B, knobs: _Knobs):
    """Rows whose token ``tok_B`` ends them: eos (when ``knobs.stop``) or a stop token id."""
    return (knobs.stop & (tok_B == knobs.eos)) | jnp.any(tok_B[:, None] == knobs.stop_ids[None, :], axis=1)


def _draw(logits_BV, keys_B, step, knobs: _Knobs, greedy: bool, filtered: bool):
    return sample(logits_BV, keys_B, step, greedy=greedy, filtered=filtered,
                  temperature=knobs.temperature, top_k=knobs.top_k, top_p=knobs.top_p)


def _token_logprob(logits_BV, tok_B):
    """``log_softmax(logits)[tok]`` per row, float32 ``[B]``: the raw distribution's log-prob."""
    lg = logits_BV.astype(jnp.float32)
    picked = jnp.take_along_axis(lg, tok_B[:, None], axis=-1)[:, 0]
    return picked - jax.nn.logsumexp(lg, axis=-1)


def _top_logprobs(logits_BV, k: int):
    """``(top-k ids int32 [B, k], their log-probs [B, k])`` of the raw distribution:
    ``jax.lax.top_k`` of the float32 logits (stable: ties lowest id first, as ``argmax`` picks),
    minus the ``logsumexp`` of :func:`_token_logprob` (XLA computes it once for both)."""
    lg = logits_BV.astype(jnp.float32)
    vals_Bk, ids_Bk = jax.lax.top_k(lg, k)
    return ids_Bk.astype(jnp.int32), vals_Bk - jax.nn.logsumexp(lg, axis=-1)[:, None]


class Weights(NamedTuple):
    """What the executables take: the model's parameters and, for a small model on CPU, its
    layers' weights as per-layer arrays (:meth:`DeepSeekV3.unstacked`), made once by the
    generator. With ``layers``, prefill and decode run the layers from them over a per-layer cache
    (:meth:`LatentCache.per_layer`): XLA's CPU backend otherwise copies each layer's slice of
    the stacked weights and cache at every step. Test config A, batch 8, 2-core CPU: ~1.2x."""
    params: Any
    layers: Any = None


def prefill_chunk_for(batch: int, prompt: int, cache_len: int, heads: int, chunk: int | str | None,
                      budget_bytes: int = 2 << 30, over_cache: bool = False) -> int | None:
    """The static prefill chunk for a bucketed call (``None``: the whole prompt in one pass).

    The naive pass over ``P`` prompt tokens materializes ``[B, H, P, P]`` float32 scores per
    layer (8.6 GB at one 4K prompt with DeepSeek-V3's 128 heads; 137 GB at 16K). In chunks of
    ``C`` tokens, the first chunk runs naive and each later one runs the absorbed form over the
    cache written so far, with ``[B, H, C, S]`` scores. ``chunk="auto"`` chunks only when the
    one-pass scores would exceed ``budget_bytes``, with the largest power-of-two chunk (>= 64)
    whose scores stay within it; an int asks for that chunk. Either way the chunk is cut to a
    power of two dividing ``P`` (prompt buckets are 2^k or 3 x 2^k, but capped at the max length,
    which may be odd: a cut below 16 runs one pass if its scores fit the budget). ``over_cache``: the prompt
    continues a cached prefix, so even one pass attends over the cache (``[B, H, P, S]``)."""
    if chunk is None:
        return None
    if chunk == "auto":
        if batch * heads * prompt * (cache_len if over_cache else prompt) * 4 <= budget_bytes:
            return None
        c = 64
        while c * 2 < prompt and batch * heads * (c * 2) * cache_len * 4 <= budget_bytes:
            c *= 2
    else:
        c = 1 << (int(chunk).bit_length() - 1)   # a power of two <= chunk
    while prompt % c:
        c //= 2
    fits = batch * heads * prompt * (cache_len if over_cache else prompt) * 4 <= budget_bytes
    if c < 16 and fits:   # a bucket capped at an odd max length (37: chunks of 1) runs in one pass
        return None
    return None if c >= prompt else c


def _prompt_pass(fn, cache, P: int, chunk: int | None, last_B, keep_all: bool, absorbed_first: bool = False):
    """Run ``fn(start, size, cache, absorbed) -> (hidden [B, size, D], cache)`` over ``P`` tokens:
    in one naive pass, or (``chunk``) a naive first chunk and then the rest chunk by chunk in a
    ``fori_loop``, absorbed over the cache (``absorbed_first``: the first pass absorbed too, for
    tokens that continue a cached prefix). Returns the cache, each row's hidden state at its
    token ``last_B`` (an index into the ``P``) ``[B, D]`` and, with ``keep_all``, every hidden
    state ``[B, P, D]``."""
    if chunk is None:
        h_BPD, cache = fn(jnp.int32(0), P, cache, absorbed_first)
        h_BD = jnp.take_along_axis(h_BPD, last_B[:, None, None], axis=1)[:, 0]
        return cache, h_BD, (h_BPD if keep_all else None)
    h_BCD, cache = fn(jnp.int32(0), chunk, cache, absorbed_first)
    h_BD = jnp.take_along_axis(h_BCD, jnp.clip(last_B, 0, chunk - 1)[:, None, None], axis=1)[:, 0]
    all_BPD = None
    if keep_all:
        all_BPD = jnp.zeros((h_BCD.shape[0], P, h_BCD.shape[2]), h_BCD.dtype).at[:, :chunk].set(h_BCD)

    def body(i, carry):
        cache, h_BD, all_BPD = carry
        start = i * chunk
        h_BCD, cache = fn(start, chunk, cache, True)
        idx_B = last_B - start
        inside_B = (idx_B >= 0) & (idx_B < chunk)
        h_here = jnp.take_along_axis(h_BCD, jnp.clip(idx_B, 0, chunk - 1)[:, None, None], axis=1)[:, 0]
        h_BD = jnp.where(inside_B[:, None], h_here, h_BD)
        if all_BPD is not None:
            all_BPD = jax.lax.dynamic_update_slice_in_dim(all_BPD, h_BCD, start, axis=1)
        return cache, h_BD, all_BPD

    return jax.lax.fori_loop(1, P // chunk, body, (cache, h_BD, all_BPD))


def _runner(model: DeepSeekV3, weights: Weights, ids_BQ, offset=0):
    """``run(start, n, cache, absorbed) -> (hidden [B, n, D], cache)`` for :func:`_prompt_pass`:
    the model on tokens ``start..start+n`` of ``ids_BQ``, at positions ``offset + start..``."""
    B = ids_BQ.shape[0]

    def run(start, n, cache, absorbed):
        ids = jax.lax.dynamic_slice_in_dim(ids_BQ, start, n, axis=1)
        pos = jnp.broadcast_to(offset + start + jnp.arange(n, dtype=jnp.int32), (B, n))
        out = model(ids, pos, cache=cache, absorbed=absorbed, logits=False, unstacked=weights.layers)
        return out.hidden, out.cache

    return run


def _new_cache(model: DeepSeekV3, weights: Weights, B: int, S: int):
    cache = LatentCache.zeros(model.cfg, B, S, dtype=model.prec.dtype)
    return cache if weights.layers is None else cache.per_layer()


def _prefill_prefix(graphdef, weights: Weights, ids_1P, chunk: int | None = None):
    """The latent cache of one prompt prefix ``ids_1P`` ``[1, P]`` (``P`` positions), which every
    row of a batch then continues (:func:`_prefill_continue` broadcasts it to the rows)."""
    model: DeepSeekV3 = nnx.merge(graphdef, weights.params)
    P = ids_1P.shape[1]
    cache, _, _ = _prompt_pass(_runner(model, weights, ids_1P), _new_cache(model, weights, 1, P), P, chunk,
                               jnp.zeros((1,), jnp.int32), False)
    return cache


def _prefill(graphdef, greedy: bool, filtered: bool, S: int, weights: Weights, ids_BP, lens_B, end_B,
             active_B, seed, knobs: _Knobs, keep_hidden: bool = False, chunk: int | None = None,
             logprobs: bool = False, top_logprobs: int = 0):
    """The prefill state (and, with ``keep_hidden``, the prompt's hidden states ``[B, P, D]``);
    with ``weights.layers``, the layers run from them and the state's cache is per layer;
    ``chunk``: the prompt in chunks of that many tokens (see :func:`prefill_chunk_for`);
    ``logprobs``: the state carries the generated tokens' log-probs (``lp_BS``), and with
    ``top_logprobs`` > 0 their positions' most likely tokens (``top_ids_BSK``, ``top_lp_BSK``)."""
    model: DeepSeekV3 = nnx.merge(graphdef, weights.params)
    B, P = ids_BP.shape
    cache, h_BD, hidden_BPD = _prompt_pass(_runner(model, weights, ids_BP), _new_cache(model, weights, B, S), P,
                                           chunk, lens_B - 1, keep_hidden)
    state = _first_state(model, h_BD, cache, S, ids_BP, lens_B, end_B, active_B, seed, knobs, greedy, filtered,
                         logprobs, top_logprobs)
    return (state, hidden_BPD) if keep_hidden else state


def _first_state(model: DeepSeekV3, h_BD, cache, S: int, ids_BP, lens_B, end_B, active_B, seed, knobs: _Knobs,
                 greedy: bool, filtered: bool, logprobs: bool = False, top_logprobs: int = 0) -> DecodeState:
    """The decode state after a prompt: the first new token drawn from each row's last hidden
    state ``h_BD``, the token buffer holding the prompts ``ids_BP`` and that token (and with
    ``logprobs`` its log-prob, in a float32 ``[B, S]`` buffer at the same position; with
    ``top_logprobs`` K > 0 also that position's K most likely ids and log-probs, ``[B, S, K]``)."""
    B, P = ids_BP.shape
    logits_BV = model.lm_head(h_BD[:, None], model.prec.dtype)[:, 0]
    # seed: a uint32 scalar, or (seed, the batch's first row in a longer input)
    keys_B = row_keys(seed, B) if jnp.ndim(seed) == 0 else row_keys(seed[0], B, seed[1])
    tok_B = _draw(logits_BV, keys_B, jnp.int32(0), knobs, greedy, filtered)
    tok_B = jnp.where(active_B, tok_B, knobs.eos)
    n = min(P, S)
    rows = jnp.arange(B)
    buf_BS = jnp.zeros((B, S), jnp.int32).at[:, :n].set(ids_BP[:, :n]).at[rows, lens_B].set(tok_B, mode="drop")
    done_B = ~active_B | _ends(tok_B, knobs) | (lens_B >= end_B)
    lp_BS = top_ids = top_lp = None
    if logprobs:
        lp_BS = jnp.zeros((B, S), jnp.float32).at[rows, lens_B].set(_token_logprob(logits_BV, tok_B), mode="drop")
    if logprobs and top_logprobs:
        ids_BK, vals_BK = _top_logprobs(logits_BV, top_logprobs)
        top_ids = jnp.zeros((B, S, top_logprobs), jnp.int32).at[rows, lens_B].set(ids_BK, mode="drop")
        top_lp = jnp.zeros((B, S, top_logprobs), jnp.float32).at[rows, lens_B].set(vals_BK, mode="drop")
    return DecodeState(cache, buf_BS, lens_B, end_B, done_B, keys_B, jnp.int32(1), lp_BS, top_ids, top_lp)


def _resize_positions(cache, S: int):
    """A latent cache (any layout: stacked or per layer) cut or zero-padded to ``S`` positions."""
    def one(a):
        n = a.shape[-2]
        if n >= S:
            return a[..., :S, :]
        return jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, S - n), (0, 0)])
    return jax.tree.map(one, cache)


def _prefill_continue(graphdef, greedy: bool, filtered: bool, S: int, weights: Weights, cache, sfx_BQ, start,
                      ids_BP, lens_B, end_B, active_B, seed, knobs: _Knobs, chunk: int | None = None,
                      logprobs: bool = False, top_logprobs: int = 0) -> DecodeState:
    """Prefill that continues a cached prefix: ``cache`` (any length) holds positions ``< start``
    of these prompts (a previous call's cache, or one row's that every row shares: a cache of
    batch 1 is broadcast to the rows); the suffix tokens ``sfx_BQ`` (right-padded) run at
    positions ``start..`` absorbed over it, in chunks when ``chunk``. ``ids_BP``: the whole
    prompts, for the token buffer."""
    model: DeepSeekV3 = nnx.merge(graphdef, weights.params)
    B, Q = sfx_BQ.shape
    cache = _resize_positions(cache, S)
    cache = jax.tree.map(lambda a: jnp.broadcast_to(a, a.shape[:-3] + (B,) + a.shape[-2:]), cache)
    # (a batch's padding rows have a 1-token prompt, which ends before ``start``)
    cache, h_BD, _ = _prompt_pass(_runner(model, weights, sfx_BQ, start), cache, Q, chunk,
                                  jnp.maximum(lens_B - 1 - start, 0), False, absorbed_first=True)
    return _first_state(model, h_BD, cache, S, ids_BP, lens_B, end_B, active_B, seed, knobs, greedy, filtered,
                        logprobs, top_logprobs)


def _decode(graphdef, greedy: bool, filtered: bool, weights: Weights, state: DecodeState, limit,
            knobs: _Knobs) -> DecodeState:
    """Decode steps until ``limit`` or every row is done (recording log-probs when the state
    has an ``lp_BS`` buffer, and top log-probs when it has ``top_ids_BSK``: static properties of
    its structure)."""
    rows = jnp.arange(state.buf_BS.shape[0])

    def cond(s: DecodeState):
        return (s.step < limit) & ~jnp.all(s.done_B)

    def body(s: DecodeState):
        model: DeepSeekV3 = nnx.merge(graphdef, weights.params)
        tok_B = s.buf_BS[rows, s.cur_B]
        out = model(tok_B[:, None], s.cur_B[:, None], cache=s.cache, absorbed=True, unstacked=weights.layers)
        new_B = _draw(out.logits[:, 0], s.keys_B, s.step, knobs, greedy, filtered)
        cur_B = jnp.where(s.done_B, s.cur_B, s.cur_B + 1)
        buf_BS = s.buf_BS.at[rows, cur_B].set(jnp.where(s.done_B, s.buf_BS[rows, cur_B], new_B))
        done_B = s.done_B | _ends(new_B, knobs) | (cur_B >= s.end_B)
        lp_BS = top_ids = top_lp = None
        if s.lp_BS is not None:
            lp_B = _token_logprob(out.logits[:, 0], new_B)
            lp_BS = s.lp_BS.at[rows, cur_B].set(jnp.where(s.done_B, s.lp_BS[rows, cur_B], lp_B))
        if s.top_ids_BSK is not None:
            ids_BK, vals_BK = _top_logprobs(out.logits[:, 0], s.top_ids_BSK.shape[-1])
            top_ids = s.top_ids_BSK.at[rows, cur_B].set(
                jnp.where(s.done_B[:, None], s.top_ids_BSK[rows, cur_B], ids_BK))
            top_lp = s.top_lp_BSK.at[rows, cur_B].set(jnp.where(s.done_B[:, None], s.top_lp_BSK[rows, cur_B], vals_BK))
        return DecodeState(out.cache, buf_BS, cur_B, s.end_B, done_B, s.keys_B, s.step + 1, lp_BS, top_ids, top_lp)

    return jax.lax.while_loop(cond, body, state)


#: A kept cache is reused from this many shared leading tokens on (fewer: a fresh prefill).
MIN_REUSED_PREFIX = 16


class _Kept(NamedTuple):
    """What a ``reuse_prefix`` generator keeps from its last single-prompt call, or a
    ``share_prefix`` one from the last shared prefix it prefilled: the tokens whose latent-cache
    entries are written, and the cache itself (on device); for the shared prefix also weak
    references to the weights' arrays it was computed with (see :func:`_same_weights`)."""
    ident: Any
    ids: list
    cache: Any
    weights: tuple | None = None


def _reusable(kept: _Kept | None, prep, prompt: list[int]) -> int:
    """How many leading tokens of ``prompt`` the kept cache covers (0: none worth reusing). At
    least the last prompt token is always recomputed: its logits draw the first new token."""
    if kept is None or kept.ident != prep.ident:
        return 0
    n = min(len(kept.ids), len(prompt) - 1)
    k = 0
    while k < n and kept.ids[k] == prompt[k]:
        k += 1
    return k if k >= MIN_REUSED_PREFIX else 0


def _cache_len(cache) -> int:
    return jax.tree.leaves(cache)[0].shape[-2]


def _weight_refs(leaves) -> tuple | None:
    """Weak references to the weights' arrays (None when one cannot be referenced weakly)."""
    try:
        return tuple(weakref.ref(x) for x in leaves)
    except TypeError:
        return None


def _same_weights(kept: _Kept | None, prep) -> bool:
    """Whether ``kept`` was computed by this model with these very weight arrays: the same
    program identity (shapes, dtypes, shardings) and, array by array, the same objects (a jax
    array never changes, so new weights, e.g. a training step under ``weights="as-is"``, are new
    objects; held weakly, a freed array is never taken for a new one at its address)."""
    if kept is None or kept.weights is None or kept.ident != prep.ident or len(kept.weights) != len(prep.leaves):
        return False
    return all(r() is x for r, x in zip(kept.weights, prep.leaves))


def _prefix_floor(n: int) -> int:
    """``n`` rounded down to a multiple of the largest power of two (>= 16) that is at most an
    eighth of it: a few shared-prefix lengths per doubling compile, and at most an eighth is lost."""
    g = 1 << max(4, int(n).bit_length() - 4)
    return n // g * g


def _shared_prefix(prompts: list[list[int]], max_len: int) -> tuple[int, int]:
    """``(c, Q)``: every prompt starts with the same ``c`` tokens (at least
    :data:`MIN_REUSED_PREFIX`, at least one token short of the shortest prompt, and cut by
    :func:`_prefix_floor`), worth prefilling once for the batch, and ``Q`` is the bucket of the
    longest prompt's rest. ``(0, 0)`` when that would not save a quarter of the padded prompt
    tokens."""
    lens = [len(p) for p in prompts]
    n = min(lens) - 1
    if len(prompts) < 2 or n < MIN_REUSED_PREFIX:
        return 0, 0
    starts = np.array([p[:n] for p in prompts])
    same = (starts == starts[0]).all(axis=0)
    c = _prefix_floor(n if same.all() else int(np.argmin(same)))
    if c < MIN_REUSED_PREFIX:
        return 0, 0
    Q = length_bucket(max(lens) - c)
    Bb, Pb = batch_bucket(len(prompts)), length_bucket(max(lens))
    if c + Q > max_len or c + Bb * Q > 0.75 * Bb * Pb:
        return 0, 0
    return c, Q


def _kept_prefix(kept: _Kept | None, prep, prompts: list[list[int]], max_len: int) -> tuple[int, int]:
    """``(c, Q)`` as :func:`_shared_prefix` gives them, for continuing the kept shared prefix
    ``kept`` (``c`` tokens): when it was computed with these weights (:func:`_same_weights`),
    every prompt (one or more) starts with its ``c`` tokens and has at least one more (its last
    token draws the first new one), the longest rest's bucket ``Q`` fits the max length after
    them, and prefilling only the rests saves a quarter of the padded prompt tokens
    (``Q <= 0.75 Pb``: the prefix itself costs nothing). Else ``(0, 0)``."""
    if not _same_weights(kept, prep):
        return 0, 0
    c, ids = len(kept.ids), kept.ids
    if any(len(p) <= c or p[:c] != ids for p in prompts):
        return 0, 0
    longest = max(len(p) for p in prompts)
    Q = length_bucket(longest - c)
    if c + Q > max_len or Q > 0.75 * length_bucket(longest):
        return 0, 0
    return c, Q


# Compiled (prefill, decode) pairs, shared by every Generator of the process: keyed by the model's
# graph (structure, config, precision), its parameters' shapes/dtypes/shardings and the buckets.
_EXECUTABLES: dict[tuple, tuple[Any, Any]] = {}
_MAX_EXECUTABLES = 64
# weights="auto" dequantizes FP8 weights once on CPU when the dense copy stays below this.
_AUTO_DEQUANTIZE_BYTES = 8 << 30


class _Prepared(NamedTuple):
    """A model split for the executables: they take ``leaves``, the :class:`Weights` flattened.
    A list of arrays crosses the call boundary at C++ speed; the ``nnx.State`` pytree costs
    ~2.5 us of Python per array at every call (demo model, 101 arrays: a decode call with no
    step 545 -> 299 us, a prefill 1007 -> 756 us)."""
    graphdef: Any
    weights: Weights
    treedef: Any
    leaves: list
    ident: "_Ident"    # what the executables are compiled for (part of their cache key)


class _Ident:
    """``(graphdef, treedef, (shape, dtype, sharding) per leaf)`` with its hash computed once:
    hashing a graphdef walks the module graph in Python (~1.5 ms per generate call on the demo
    model before this)."""

    def __init__(self, *parts):
        self.parts = parts
        self._hash = hash(parts)

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return self is other or (isinstance(other, _Ident) and self._hash == other._hash and self.parts == other.parts)


def _prepare(graphdef, weights: Weights) -> _Prepared:
    leaves, treedef = jax.tree.flatten(weights)
    signature = tuple((x.shape, str(x.dtype), getattr(x, "sharding", None)) for x in leaves)
    return _Prepared(graphdef, weights, treedef, leaves, _Ident(graphdef, treedef, signature))


def _remember(full_key, value):
    if len(_EXECUTABLES) >= _MAX_EXECUTABLES:   # the least recently used goes
        _EXECUTABLES.pop(next(iter(_EXECUTABLES)))
    _EXECUTABLES[full_key] = value


def _recall(full_key):
    """The cached executables of ``full_key`` (None if absent), now the most recently used."""
    hit = _EXECUTABLES.pop(full_key, None)
    if hit is not None:
        _EXECUTABLES[full_key] = hit
    return hit


def _prefix_executable(prep: _Prepared, ids_1P, chunk: int | None):
    """The compiled :func:`_prefill_prefix` for this prefix length (and chunk), taking
    ``prep.leaves``, and the seconds spent compiling it (0 on a cache hit)."""
    full_key = (prep.ident, ("shared prefix", ids_1P.shape[1], chunk))
    hit = _recall(full_key)
    if hit is not None:
        return hit[0], 0.0
    graphdef, treedef = prep.graphdef, prep.treedef
    t0 = time.perf_counter()
    fn = jax.jit(lambda w, ids: _prefill_prefix(graphdef, jax.tree.unflatten(treedef, w), ids, chunk))
    compiled = fn.lower(prep.leaves, ids_1P).compile()
    _remember(full_key, (compiled, None))
    return compiled, time.perf_counter() - t0


def _host_readable(graphdef, weights: Weights, state):
    """``state`` with every array the host reads (all but the latent caches) whole on each device
    of the model's mesh: the rules split the batch over ``data``, and a process of a multi-host
    mesh can read only what its own devices hold. The decode loop keeps the prefill's placement."""
    pl = nnx.merge(graphdef, weights.params).norm.placement
    if pl is None:
        return state
    from deepseek_jax.kernel_mesh import shard_map_mesh   # noqa: PLC0415
    whole = NamedSharding(shard_map_mesh(pl.mesh), PartitionSpec())
    return state._replace(**{k: jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, whole), v)
                             for k, v in state._asdict().items() if k not in ("cache", "mtp_cache")})


def _executables(prep: _Prepared, key: tuple, prefill_args, knobs):
    """AOT-compiled (prefill, decode) for ``key = (Bb, Pb, S, greedy, filtered, speculative,
    prefill chunk, continuation[, logprobs[, top_logprobs]])`` (continuation: None, or the suffix
    bucket and the cached cache's length for :func:`_prefill_continue`; logprobs: the state
    records the generated tokens' log-probs, False when left out; top_logprobs: K > 0 records
    their positions' K most likely tokens too (with logprobs), 0 when left out),
    taking ``prep.leaves``, and the seconds spent compiling (0 on a cache hit)."""
    graphdef, treedef = prep.graphdef, prep.treedef
    full_key = (prep.ident, key)
    hit = _recall(full_key)
    if hit is not None:
        return hit, 0.0
    _, _, S, greedy, filtered, spec, chunk, cont, *rest = key
    lp = bool(rest[0]) if rest else False
    top = int(rest[1]) if len(rest) > 1 and lp else 0
    if spec:
        from deepseek_jax.speculative import decode_spec, prefill_spec   # (it builds on this module)
        prefill_fn, decode_fn = prefill_spec, decode_spec
    else:
        prefill_fn, decode_fn = _prefill, _decode
    if cont is not None:   # (suffix bucket, cached positions): the prefill continues a cached prefix
        prefill_fn = _prefill_continue

    def weights(leaves):
        return jax.tree.unflatten(treedef, leaves)

    t0 = time.perf_counter()
    pre = jax.jit(lambda w, *a: _host_readable(graphdef, weights(w), prefill_fn(
        graphdef, greedy, filtered, S, weights(w), *a, chunk=chunk, logprobs=lp, top_logprobs=top)))
    pre_c = pre.lower(prep.leaves, *prefill_args, knobs).compile()
    # The decode loop takes the state as the prefill leaves it, and leaves it so (streaming feeds
    # it back): on a mesh XLA may split a state array (the token buffer over ``expert``), and a
    # decode compiled for the replicated default refused the prefill's output.
    state_sh = pre_c.output_shardings
    state_shape = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                               jax.eval_shape(pre, prep.leaves, *prefill_args, knobs), state_sh)
    dec = jax.jit(lambda w, st, lim, kn: decode_fn(graphdef, greedy, filtered, weights(w), st, lim, kn),
                  donate_argnums=1, out_shardings=state_sh)
    dec_c = dec.lower(prep.leaves, state_shape, np.int32(0), knobs).compile()
    _remember(full_key, (pre_c, dec_c))
    return (pre_c, dec_c), time.perf_counter() - t0


_ROPES: dict = {}
#: Dequantized models with at most this many layers decode from per-layer weights and cache
#: (:class:`Weights`): tracing grows with the layer count, the gain is per step.
_PER_LAYER_MAX_LAYERS = 8
#: ... and whose stacked layers take at most this much (the per-layer copy doubles them).
_PER_LAYER_MAX_BYTES = 1 << 30


def _layer_bytes(model: DeepSeekV3) -> int:
    layers = [m for m in (model.dense_layers, model.moe_layers) if m is not None]
    return sum(x.nbytes for m in layers for x in jax.tree.leaves(nnx.state(m)))


def _as_is(model: DeepSeekV3) -> _Prepared:
    graphdef, params = nnx.split(model)
    return _prepare(graphdef, Weights(params))


def dequantized_model(model: DeepSeekV3) -> DeepSeekV3:
    """A copy of ``model`` whose FP8 linear weights are dequantized once into the compute dtype
    (``W = Wq * S``, the exact W8A16 weights), with the MTP module if ``model`` has one (the
    speculative drafter); other parameters are shared. Same numbers as the FP8 model, no
    per-step dequantization; 4x (float32) or 2x (bf16) the memory of the FP8 weights. What CPU
    generation uses (CPUs have no FP8 arithmetic). LoRA adapters are folded into the weights."""
    cfg, prec = model.cfg, model.prec
    if not cfg.fp8:
        return model
    dense_cfg = cfg.replace(fp8=False)
    with_mtp = model.mtp is not None
    twin = nnx.eval_shape(lambda: DeepSeekV3(dense_cfg, prec=prec, rngs=nnx.Rngs(0), with_mtp=with_mtp))
    # Rope is a static attribute compared by identity: one instance per config keeps the graphs
    # of equal models equal, so their compiled executables are shared (see _EXECUTABLES).
    twin.rope = _ROPES.setdefault(dense_cfg, twin.rope)
    graphdef, abstract = nnx.split(twin)
    src = dict(nnx.to_flat_state(nnx.state(model)))
    from deepseek_jax.lora import lora_deltas   # noqa: PLC0415
    deltas = lora_deltas(model)   # LoRA adapters are folded into the dense weights
    flat = []
    for path, var in nnx.to_flat_state(abstract):
        scale = src.get(path[:-1] + ("weight_scale_inv",))
        value = src[path][...]
        delta = deltas.get(tuple(str(p) for p in path)) if path[-1] == "weight" else None
        if path[-1] == "weight" and scale is not None:
            value = dequantize(value, scale[...], jnp.float32 if delta is not None else prec.dtype)
        if delta is not None:
            value = (value.astype(jnp.float32) + delta).astype(prec.dtype)
        flat.append((path, var.replace(value)))
    out = nnx.merge(graphdef, nnx.from_flat_state(flat))
    pl = model.norm.placement
    if pl is not None:   # on the model's mesh as the model is: its batch, cache and expert dispatch split
        from deepseek_jax import sharding   # noqa: PLC0415
        sharding.attach_mesh(out, pl.mesh, pl.rule)
    return out


def _dequantized_bytes(model: DeepSeekV3) -> int:
    size = jnp.dtype(model.prec.dtype).itemsize
    return sum(x.size * size for x in jax.tree.leaves(nnx.state(model)) if x.dtype == jnp.float8_e4m3fn)


def _check_stop(stop) -> list[str]:
    """``stop=`` of :meth:`Generator.generate_text`: None, a string or a list of non-empty strings."""
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, Sequence) or isinstance(stop, bytes):
        raise DeepSeekError(f"stop: expected a string or a list of strings, got {type(stop).__name__}")
    out = []
    for s in stop:
        if not isinstance(s, str):
            raise DeepSeekError(f"stop: {s!r} is not a string")
        if not s:
            raise DeepSeekError("stop: a stop string must not be empty")
        if s not in out:
            out.append(s)
    return out


class _StopText:
    """One row's text as it is generated (generate_text with stop strings): detokenized token by
    token, watched for the stop strings, and streamed without anything that is or may become part
    of one."""

    def __init__(self, decoder, stops: Sequence[str]):
        self.decoder, self.stops = decoder, list(stops)
        self.longest = max(map(len, self.stops))
        self.text = ""       # the text so far
        self.n = 0           # ids fed
        self.cut: int | None = None   # where the earliest stop string starts, once one is found
        self.kept = 0        # ids up to the one whose text completed it
        self.sent = 0        # characters streamed

    def _add(self, piece: str) -> bool:
        start = max(0, len(self.text) - self.longest + 1)   # a new occurrence ends in the new piece
        self.text += piece
        hits = [(i, len(s)) for i, s in ((self.text.find(s, start), s) for s in self.stops) if i >= 0]
        if hits:
            # The token that completed the first occurrence may be an earlier one: one whose bytes
            # also began a character the decoder held back (a byte-level token "b" + 0xC3)
            # released its text only with a later token, and a run of such tokens (each ending
            # mid-emoji, say) holds it back for as long as it lasts.
            cut, n = min(hits)
            stop = self.text[cut:cut + n]
            k = self.n
            while k > 1 and self.decoder.text_of(k - 1)[cut:cut + n] == stop:
                k -= 1
            self.cut, self.kept = cut, k
        return bool(hits)

    def feed(self, ids: Sequence[int]) -> bool:
        """Adds the row's new ids (up to a stop string); True once the text holds one."""
        for t in ids:
            if self.cut is not None:
                break
            self.n += 1
            piece = self.decoder.feed(t)
            if piece:
                self._add(piece)
        return self.cut is not None

    def finish(self) -> str:
        """The row's final text (the decoder's held-back rest included), cut at a stop string."""
        if self.cut is None:
            rest = self.decoder.flush()
            if rest:
                self._add(rest)
            self.longest = 0   # nothing is held back any more
        return self.text if self.cut is None else self.text[:self.cut]

    def send(self, stream: Callable[[int, str], None], row: int) -> None:
        """Streams what is safe: up to a found stop string, else all but the longest suffix that
        begins some stop string."""
        end = self.cut
        if end is None:
            end = len(self.text)
            for k in range(min(self.longest - 1, len(self.text) - self.sent), 0, -1):
                if any(s.startswith(self.text[-k:]) for s in self.stops):
                    end -= k
                    break
        if end > self.sent:
            stream(row, self.text[self.sent:end])
            self.sent = end


def _host_ids(name: str, x) -> np.ndarray:
    """A jax array of token ids as numpy."""
    try:
        return np.asarray(x)
    except jax.errors.TracerArrayConversionError:
        raise DeepSeekError(f"{name}: a traced array: generate runs its own compiled programs, call it "
                            "outside jax.jit") from None


def _check_stream_chunk(stream_chunk) -> int:
    if not _is_int(stream_chunk) or stream_chunk < 1:
        raise DeepSeekError(f"stream_chunk must be an integer >= 1, got {stream_chunk!r}")
    return int(stream_chunk)


def _as_sampling(sampling) -> SamplingParams:
    """``sampling=`` of :meth:`Generator.generate`: None (greedy), a :class:`SamplingParams` or a
    dict of its fields (``{"temperature": 0.7, "top_p": 0.9}``), validated."""
    if sampling is None:
        return GREEDY
    if isinstance(sampling, Mapping):
        fields = [f.name for f in dataclasses.fields(SamplingParams)]
        unknown = [k for k in sampling if k not in fields]
        if unknown:
            raise DeepSeekError(f"sampling: unknown field {unknown[0]!r} (fields: {', '.join(fields)})")
        sampling = SamplingParams(**sampling)
    if not isinstance(sampling, SamplingParams):
        raise DeepSeekError(f"sampling must be a SamplingParams, a dict of its fields or None, "
                            f"got {type(sampling).__name__}")
    return sampling.validate()


class Generator:
    """Batched generation with a pre-allocated latent cache and a compiled decode loop.

    ``max_len`` caps prompt + new tokens (default and upper bound: the config's
    ``max_position_embeddings``); prompts that leave no room for one new token are an error, and
    a row's budget is cut to what fits (finish reason "length"). ``stream_chunk``: decode steps
    per streamed chunk. ``weights``: "as-is" reads the model's own weights at every call (a model
    being trained can keep using the generator); "dequantize" works from a copy with the FP8
    weights dequantized once (a snapshot: build a new generator after changing the weights);
    "auto" picks "dequantize" on CPU for W8A16 models whose dense copy stays under 8 GiB.
    ``prefill_chunk``: prompts in chunks of this many tokens (a power of two >= 16), "auto"
    (default: only when one naive pass would hold over 2 GiB of attention scores, e.g. a 4K prompt
    at DeepSeek-V3's 128 heads) or None (always one pass); see :func:`prefill_chunk_for`.
    ``reuse_prefix`` (what ``chat`` uses): after a single-prompt call the generator keeps its
    latent cache, and the next single-prompt call that starts with the same tokens (at least
    :data:`MIN_REUSED_PREFIX`) prefills only the rest, over that cache. Keep it off while the
    model's weights change between calls (the kept cache would be stale).
    ``share_prefix`` (default on): when every prompt of a batch starts with the same tokens (a
    system prompt, few-shot examples; at least :data:`MIN_REUSED_PREFIX`, rounded down to a
    multiple of 16, 32, 64, ..., at most an eighth of it), they are prefilled once for the
    batch, and each row prefills only its rest over a copy of that cache; only where that saves
    at least a quarter of the padded prompt tokens (``last_stats.shared_prefix`` says how many
    tokens were shared). The generator keeps the batch-1 cache of the last shared prefix it
    prefilled (one entry: ``c`` positions of one row), and a later call whose prompts all start
    with those ``c`` tokens (a batch, or a single prompt: the next batch of a long input, a
    question after a batch with the same system prompt) continues that cache instead of
    prefilling them again (``last_stats.prefix_cached``), unless the batch shares a longer prefix
    on its own, which is then prefilled and kept instead (see :func:`_kept_prefix`). Never with
    ``speculative``, and only while the model's weight arrays are the very ones it was computed
    with (new weights are new arrays). It stays until another shared prefix replaces it, a
    call fails, or :meth:`forget_prefix`.
    """

    def __init__(self, model: DeepSeekV3, tokenizer=None, *, max_len: int | None = None,
                 stream_chunk: int = 8, weights: str = "auto", prefill_chunk: int | str | None = "auto",
                 reuse_prefix: bool = False, share_prefix: bool = True):
        if weights not in ("auto", "as-is", "dequantize"):
            raise DeepSeekError(f"weights {weights!r}: expected auto|as-is|dequantize")
        if not (prefill_chunk is None or prefill_chunk == "auto"
                or (_is_int(prefill_chunk) and prefill_chunk >= 16 and not prefill_chunk & (prefill_chunk - 1))):
            raise DeepSeekError(f"prefill_chunk {prefill_chunk!r}: expected a power of two >= 16, 'auto' or None")
        if not isinstance(model, DeepSeekV3):
            raise DeepSeekError(f"model: expected a DeepSeekV3 (from dj.load), got {type(model).__name__}")
        self.prefill_chunk = prefill_chunk
        self.reuse_prefix = check_bool("reuse_prefix", reuse_prefix)
        self.share_prefix = check_bool("share_prefix", share_prefix)
        self._kept: _Kept | None = None
        self._prefix: _Kept | None = None   # the last shared prefix's batch-1 cache (share_prefix)
        if weights == "auto":
            weights = "dequantize" if (jax.default_backend() == "cpu" and model.cfg.fp8
                                       and model.prec.fp8_mode == "w8a16"
                                       and _dequantized_bytes(model) <= _AUTO_DEQUANTIZE_BYTES) else "as-is"
        self.weights = weights
        # (the batch buckets are multiples of the mesh's data axis: see batch_bucket)
        pl = getattr(getattr(model, "norm", None), "placement", None)
        self._data = 1 if pl is None else int(dict(pl.mesh.shape).get("data", 1))
        self.model = dequantized_model(model) if weights == "dequantize" else model
        # The dequantized copy is private and never changes: split and flatten it once (nnx.split
        # walks the module graph, ~2 ms per call on the demo model; see _Prepared for the
        # flattening), and cut a small one's layers into per-layer weights once (see Weights).
        # "as-is" splits at every call, so that a caller's weight updates are seen.
        self._prepared = None
        if weights == "dequantize":
            graphdef, params = nnx.split(self.model)
            per_layer = (model.cfg.num_hidden_layers <= _PER_LAYER_MAX_LAYERS
                         and _layer_bytes(self.model) <= _PER_LAYER_MAX_BYTES)
            self._prepared = _prepare(graphdef, Weights(params, self.model.unstacked() if per_layer else None))
        self.tokenizer = tokenizer
        cfg = model.cfg
        self.vocab_size = cfg.vocab_size
        limit = cfg.max_position_embeddings
        if max_len is not None and (not _is_int(max_len) or not 2 <= max_len <= limit):
            raise DeepSeekError(f"max_len must be an integer in [2, {limit}] (max_position_embeddings), "
                                f"got {max_len!r}")
        self.max_len = int(max_len or limit)
        self.stream_chunk = _check_stream_chunk(stream_chunk)
        self.eos_id = int(cfg.eos_token_id)
        self.eos_ids = cfg.eos_token_ids   # (a Hub config's eos list: the first is eos_id)
        self._compiles = 0
        self.last_stats = GenerationStats()

    # ---- compiled functions ----------------------------------------------------------------
    @property
    def compile_count(self) -> int:
        """Number of programs this generator had to compile: (prefill, decode) pairs, and shared prefixes' prefills."""
        return self._compiles

    def forget_prefix(self) -> None:
        """Drops the latent caches the generator keeps on the device: the last shared prefix's
        (``share_prefix``) and the last single-prompt call's (``reuse_prefix``). The next call
        prefills its prompts whole."""
        self._prefix = self._kept = None

    # ---- validation ------------------------------------------------------------------------
    def _check_prompts(self, prompts_ids, names: Sequence[str] | None = None) -> list[list[int]]:
        """The prompts as lists of ints, checked; ``names[i]`` names prompt i in errors (default
        ``prompt i``; the CLI passes ``--input-file line n``)."""
        if isinstance(prompts_ids, jax.Array):
            prompts_ids = _host_ids("prompts", prompts_ids)
        if isinstance(prompts_ids, np.ndarray):
            prompts_ids = prompts_ids.tolist() if prompts_ids.ndim == 2 else [prompts_ids.tolist()]
        if not isinstance(prompts_ids, Sequence) or isinstance(prompts_ids, (str, bytes)) or not prompts_ids:
            raise DeepSeekError("prompts: expected a non-empty list of token id lists")
        V, out = self.vocab_size, []
        for i, p in enumerate(prompts_ids):
            name = names[i] if names is not None else f"prompt {i}"
            if isinstance(p, jax.Array):
                p = _host_ids(name, p)
            if isinstance(p, np.ndarray):
                p = p.tolist()
            if not isinstance(p, Sequence) or isinstance(p, (str, bytes)):
                raise DeepSeekError(f"{name}: expected a list of token ids, got {type(p).__name__}")
            if len(p) == 0:
                raise DeepSeekError(f"{name} is empty")
            ids = []
            for j, t in enumerate(p):
                if isinstance(t, (jax.Array, np.ndarray)) and t.ndim == 0:   # (a 0-d array, as dj.logits takes)
                    t = _host_ids(name, t)[()]
                if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                    raise DeepSeekError(f"{name}: token {j} is {t!r}, not an integer id")
                if not 0 <= int(t) < V:
                    raise DeepSeekError(f"{name}: token id {int(t)} at index {j} is outside the vocab [0, {V})")
                ids.append(int(t))
            if len(ids) >= self.max_len:
                raise DeepSeekError(f"{name} has {len(ids)} tokens; at most {self.max_len - 1} fit "
                                    f"(max length {self.max_len} incl. at least one new token)")
            out.append(ids)
        return out

    def _check_stop_token_ids(self, ids, more_eos: Sequence[int] = ()) -> np.ndarray:
        """``stop_token_ids`` and ``more_eos`` (the config's further eos ids) as the traced knob:
        int32 ``[MAX_STOP_TOKEN_IDS]``, padded with -1."""
        if ids is None and not more_eos:
            return _NO_STOP_IDS
        if ids is None:
            ids = []
        if isinstance(ids, jax.Array):
            ids = _host_ids("stop_token_ids", ids)
        if isinstance(ids, np.ndarray):
            ids = ids.tolist() if ids.ndim == 1 else ids
        if not isinstance(ids, Sequence) or isinstance(ids, (str, bytes)):
            raise DeepSeekError(f"stop_token_ids: expected a list of token ids, got {type(ids).__name__}")
        out = []
        for t in ids:
            if not _is_int(t):
                raise DeepSeekError(f"stop_token_ids: {t!r} is not an integer token id")
            if not 0 <= int(t) < self.vocab_size:
                raise DeepSeekError(f"stop token id {int(t)} is outside the vocab [0, {self.vocab_size})")
            if int(t) not in out:
                out.append(int(t))
        out += [t for t in more_eos if t not in out]
        if len(out) > MAX_STOP_TOKEN_IDS:
            also = f" (with the config's {len(more_eos)} further eos ids)" if more_eos else ""
            raise DeepSeekError(f"stop_token_ids: at most {MAX_STOP_TOKEN_IDS} distinct ids{also}, got {len(out)}")
        arr = np.full(MAX_STOP_TOKEN_IDS, -1, np.int32)
        arr[:len(out)] = out
        return arr

    # ---- generation ------------------------------------------------------------------------
    def generate(self, prompts_ids, *, max_new_tokens: int = 200, sampling: SamplingParams | dict | None = None,
                 seed: int = 0, stop_at_eos: bool = True, eos_id: int | None = None,
                 stream: StreamFn | None = None, stream_chunk: int | None = None,
                 speculative: str | None = None, stop_token_ids: Sequence[int] | None = None,
                 logprobs: bool = False, top_logprobs: int = 0, first_row: int = 0,
                 _watch: Callable[[int, list[int]], bool] | None = None) -> list[Result]:
        """Generates up to ``max_new_tokens`` per prompt (fewer where the max length cuts in).

        ``sampling`` (a :class:`SamplingParams` or a dict of its fields) defaults to greedy;
        ``seed`` makes sampling reproducible. ``eos_id``
        overrides the config's eos (default: every id of a Hub config's ``eos_token_id`` list). ``stop_token_ids``: up to :data:`MAX_STOP_TOKEN_IDS` further
        ids that end a row as eos does (even with ``stop_at_eos=False``), checked inside the
        compiled loop (changing them never recompiles); the stop token is not in
        ``output_ids`` and the finish reason is ``"stop"``. ``stream(row, new_ids)`` is called
        with each row's new tokens every ``stream_chunk`` decode steps. ``speculative="mtp"``: the model's MTP module
        drafts a token ahead and the main model verifies it (see :mod:`deepseek_jax.speculative`; needs a
        model with its MTP module). ``logprobs=True``: each result's ``logprobs`` holds one float
        per ``output_ids`` token, its log-probability under the model's raw next-token
        distribution (``log_softmax`` of the logits: temperature 1, no top-k/top-p, whatever
        ``sampling`` is), computed in the compiled loop (its own executables; calls without it
        are unchanged). ``top_logprobs=K`` (an integer in 0..:data:`MAX_TOP_LOGPROBS`; K > 0
        implies ``logprobs=True``): each result's ``top_logprobs`` also holds, per ``output_ids``
        token, the K most likely ``(token id, log-prob)`` pairs of its position under that same
        distribution, most likely first (ties: lowest id first; the sampled token is among them
        whenever its rank is below K, and a greedy token comes first); K is static (its own
        executables). ``first_row``: these prompts' index in a longer input generated batch by
        batch; row ``r`` samples with the key of row ``first_row + r``, so every batch draws what
        one call over the whole input would (traced: no recompile). Returns one :class:`Result`
        per prompt.

        (``_watch(row, new_ids) -> bool``, internal: like ``stream``, and True ends the row; it
        runs the loop in chunks. :meth:`generate_text` finds stop strings with it.)
        """
        if speculative not in (None, "none", "mtp"):
            raise DeepSeekError(f"speculative {speculative!r}: expected 'mtp', 'none' or None")
        from deepseek_jax import sharding   # noqa: PLC0415
        sharding.check_context_mesh(self.model)
        spec = speculative == "mtp"
        if spec and self.model.mtp is None:
            raise DeepSeekError("speculative decoding with 'mtp' needs the model's MTP module: this model has "
                                "none (load the checkpoint with mtp=True; it must have an MTP layer)")
        prompts = self._check_prompts(prompts_ids)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
                or max_new_tokens < 0:
            raise DeepSeekError(f"max-new-tokens must be an integer >= 0, got {max_new_tokens!r}")
        sampling = _as_sampling(sampling)
        if eos_id is not None and not _is_int(eos_id):
            raise DeepSeekError(f"eos_id must be an integer token id or None, got {eos_id!r}")
        eos = self.eos_id if eos_id is None else int(eos_id)
        if not 0 <= eos < self.vocab_size:
            raise DeepSeekError(f"eos id {eos} is outside the vocab [0, {self.vocab_size})")
        # a config's eos list: its further ids end rows as eos does (via the traced stop ids)
        more_eos = list(self.eos_ids[1:]) if eos_id is None else []
        eos_set = {eos, *more_eos}
        if not _is_int(seed) or not 0 <= seed < 2 ** 32:
            raise DeepSeekError(f"seed must be an integer in [0, 2**32), got {seed!r}")
        if not _is_int(first_row) or not 0 <= first_row < 2 ** 32:
            raise DeepSeekError(f"first_row must be an integer in [0, 2**32), got {first_row!r}")
        stop_at_eos = check_bool("stop_at_eos", stop_at_eos)
        if stream is not None and not callable(stream):
            raise DeepSeekError(f"stream must be a callable stream(row, new_ids) or None, got {type(stream).__name__}")
        chunk = self.stream_chunk if stream_chunk is None else _check_stream_chunk(stream_chunk)
        stop_ids = self._check_stop_token_ids(stop_token_ids, more_eos if stop_at_eos else ())
        stop_set = frozenset() if stop_ids is _NO_STOP_IDS else set(stop_ids.tolist()) - {-1}
        if stop_at_eos:
            stop_set -= eos_set   # (those end as "eos")
        logprobs = check_bool("logprobs", logprobs)
        if not _is_int(top_logprobs) or not 0 <= top_logprobs <= min(MAX_TOP_LOGPROBS, self.vocab_size):
            raise DeepSeekError(f"top_logprobs must be an integer in [0, {min(MAX_TOP_LOGPROBS, self.vocab_size)}], "
                                f"got {top_logprobs!r}")
        top = int(top_logprobs)
        logprobs = bool(logprobs) or top > 0   # top log-probs come with the chosen tokens' log-probs

        B = len(prompts)
        lens = np.array([len(p) for p in prompts], np.int32)
        budgets = np.minimum(min(int(max_new_tokens), self.max_len), self.max_len - lens)
        stats = GenerationStats(batch=B, prompt_tokens=int(lens.sum()), speculative="mtp" if spec else None)
        self.last_stats = stats
        if max_new_tokens == 0:
            return [Result(p, [], "length", logprobs=[] if logprobs else None, top_logprobs=[] if top else None)
                    for p in prompts]

        prep = self._prepared or _as_is(self.model)
        keep = self.reuse_prefix and B == 1 and not spec
        kept, self._kept = self._kept, None   # (a failing call leaves nothing stale behind)
        kept_prefix, self._prefix = self._prefix, None
        k = _reusable(kept, prep, prompts[0]) if keep else 0
        Q = length_bucket(int(lens[0]) - k) if k else 0
        if k and k + Q > self.max_len:    # the suffix bucket would run past the model's length
            k = Q = 0
        stats.reused_prefix = k
        shared = 0
        if not k and self.share_prefix and not spec:
            shared, Q = _shared_prefix(prompts, self.max_len) if B > 1 else (0, 0)
            c, q = _kept_prefix(kept_prefix, prep, prompts, self.max_len)
            if c and c >= shared:   # (a longer prefix the batch shares is prefilled, and kept instead)
                shared, Q, stats.prefix_cached = c, q, True
        stats.shared_prefix = shared
        # what to keep after the call: this call's shared prefix, else the kept one if still valid
        keep_prefix = kept_prefix if self.share_prefix and _same_weights(kept_prefix, prep) else None

        Bb = batch_bucket(B, self._data)
        S = min(length_bucket(max(int((lens + budgets).max()), k + shared + Q)), self.max_len)
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

        params = prep.leaves
        temp, top_k, top_p = sampling.traced()
        # (numpy inputs: the executables copy them in at C++ speed; jnp.asarray dispatches an op
        # per array, ~50 us each.)
        knobs = _Knobs(np.int32(eos), np.bool_(stop_at_eos), temp, top_k, top_p, stop_ids)
        prefill_args = (ids, lens_b, end_b, active, np.array([seed, first_row], np.uint32))
        heads = self.model.cfg.num_attention_heads
        cont = None
        if k:   # continue the kept cache: only the suffix is prefilled, absorbed over it
            sfx = np.zeros((Bb, Q), np.int32)
            sfx[0, :int(lens[0]) - k] = prompts[0][k:]
            cont = (Q, _cache_len(kept.cache))
            prefill_args = (kept.cache, sfx, np.int32(k)) + prefill_args
            p_chunk = prefill_chunk_for(Bb, Q, S, heads, self.prefill_chunk, over_cache=True)
        elif shared:   # the prefix once (or kept), then every row's rest over a copy of its cache
            if stats.prefix_cached:
                prefix_cache = kept_prefix.cache
            else:
                ids_1P = np.array([prompts[0][:shared]], np.int32)
                pre_prefix, compile_s = _prefix_executable(
                    prep, ids_1P, prefill_chunk_for(1, shared, shared, heads, self.prefill_chunk))
                t0 = time.perf_counter()
                prefix_cache = jax.block_until_ready(pre_prefix(params, ids_1P))
                stats.prefill_s = time.perf_counter() - t0
                stats.compile_s += compile_s
                self._compiles += compile_s > 0
                refs = _weight_refs(prep.leaves)
                keep_prefix = None if refs is None else _Kept(prep.ident, prompts[0][:shared], prefix_cache, refs)
            sfx = np.zeros((Bb, Q), np.int32)
            for i, p in enumerate(prompts):
                sfx[i, :len(p) - shared] = p[shared:]
            cont = (Q, shared)
            prefill_args = (prefix_cache, sfx, np.int32(shared)) + prefill_args
            p_chunk = prefill_chunk_for(Bb, Q, S, heads, self.prefill_chunk, over_cache=True)
        else:
            p_chunk = prefill_chunk_for(Bb, Pb, S, heads, self.prefill_chunk)
        stats.prefill_chunk = p_chunk
        key = (Bb, Pb, S, sampling.greedy, sampling.filtered, spec, p_chunk, cont, logprobs, top)
        (pre, dec), compile_s = _executables(prep, key, prefill_args, knobs)
        stats.compile_s += compile_s
        self._compiles += compile_s > 0

        t0 = time.perf_counter()
        state = pre(params, *prefill_args, knobs)
        jax.block_until_ready(state)
        t1 = time.perf_counter()
        stats.prefill_s += t1 - t0
        max_steps = int(budgets.max())
        emitted = lens.copy()   # next position to stream, per row

        def ended(tok: int) -> bool:   # a token that ended its (done) row and is not output
            return (stop_at_eos and tok in eos_set) or tok in stop_set

        def emit(buf, cur, done):
            """Streams each row's new tokens; returns the rows ``_watch`` ended (or None)."""
            ended_rows = None
            for r in range(B):
                stop = int(cur[r]) + 1
                if done[r] and ended(int(buf[r, cur[r]])):
                    stop -= 1
                if stop > emitted[r]:
                    new = buf[r, emitted[r]:stop].tolist()
                    emitted[r] = stop
                    if _watch is not None and _watch(r, new):
                        ended_rows = np.zeros(done.shape, bool) if ended_rows is None else ended_rows
                        ended_rows[r] = True
                    if stream is not None:
                        stream(r, new)
            return ended_rows

        if stream is None and _watch is None:
            if max_steps > 1:
                state = dec(params, state, np.int32(max_steps), knobs)
            # (Speculative: the draft counters come back in the same transfer; so do log-probs.)
            buf, cur, done, steps, lp, top_ids, top_lp, *counts = jax.device_get(
                (state.buf_BS, state.cur_B, state.done_B, state.step, state.lp_BS, state.top_ids_BSK,
                 state.top_lp_BSK) + ((state.drafted_B, state.accepted_B) if spec else ()))
        else:
            while True:
                buf, cur, done, steps, lp = jax.device_get(
                    (state.buf_BS, state.cur_B, state.done_B, state.step, state.lp_BS))
                stopped = emit(buf, cur, done)
                if stopped is not None:   # stop strings: those rows are done (the loop skips them)
                    done = done | stopped
                    state = state._replace(done_B=jax.device_put(done, state.done_B.sharding))
                if int(steps) >= max_steps or done[:B].all():
                    break
                state = dec(params, state, np.int32(min(int(steps) + chunk, max_steps)), knobs)
            # (the top log-probs, [Bb, S, K] twice, once at the end rather than with every chunk)
            top_ids, top_lp = jax.device_get((state.top_ids_BSK, state.top_lp_BSK))
        stats.decode_s = time.perf_counter() - t1
        stats.steps = int(steps)
        if spec:
            drafted, accepted = counts if stream is None and _watch is None else \
                jax.device_get((state.drafted_B, state.accepted_B))
            stats.drafted, stats.accepted = int(drafted[:B].sum()), int(accepted[:B].sum())

        if keep:   # the cache holds the entries of positions < cur: the prompt and all but the last token
            self._kept = _Kept(prep.ident, buf[0, :int(cur[0])].tolist(), state.cache)
        self._prefix = keep_prefix
        results = []
        for r, p in enumerate(prompts):
            out = buf[r, lens[r]:cur[r] + 1].tolist()
            reason = "length"
            if stop_at_eos and out and out[-1] in eos_set:
                out, reason = out[:-1], "eos"
            elif out and out[-1] in stop_set and done[r]:
                out, reason = out[:-1], "stop"
            span = slice(lens[r], lens[r] + len(out))
            results.append(Result(p, out, reason, logprobs=lp[r, span].tolist() if logprobs else None,
                                  top_logprobs=[list(zip(i, v)) for i, v in zip(top_ids[r, span].tolist(),
                                                                                top_lp[r, span].tolist())]
                                  if top else None))
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
        chat = tok.has_chat_template if chat is None else check_bool("chat", chat)
        if chat:
            return tok.encode_chat([{"role": "user", "content": text}])
        return tok.encode(text)

    def generate_text(self, texts: str | Sequence[str], *, chat: bool | None = None,
                      stream: Callable[[int, str], None] | None = None, stop: str | Sequence[str] | None = None,
                      **kw) -> list[Result]:
        """Like :meth:`generate` from text prompts; each result carries ``text``.

        ``stream(row, text_piece)`` receives decoded text as it completes. ``stop``: a string or
        a list of (non-empty) strings; a row ends once its text holds one of them. Its ``text``
        is cut right before the earliest occurrence, its ``output_ids`` keep the tokens up to and
        including the one whose text completed that string, and its finish reason is ``"stop"``.
        Found on the host: the loop then runs in chunks of ``stream_chunk`` steps (the tokens of
        a row that run past its stop string within a chunk are dropped). Text that is or may
        become part of a stop string is never streamed: the pieces always add up to ``text``.
        """
        tok = self._need_tokenizer()
        if stream is not None and not callable(stream):   # (before any work, as generate's own check)
            raise DeepSeekError(f"stream must be a callable stream(row, text) or None, got {type(stream).__name__}")
        if chat is not None:
            chat = check_bool("chat", chat)
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, Sequence) or isinstance(texts, bytes) or not texts:
            raise DeepSeekError("prompts: expected a string or a non-empty list of strings")
        prompts = []
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise DeepSeekError(f"prompt {i}: expected a string, got {type(t).__name__}")
            if not t:
                raise DeepSeekError(f"prompt {i} is empty")
            prompts.append(self.encode_prompt(t, chat))
        stops = _check_stop(stop)
        if stops:
            return self._generate_text_ids(prompts, stream=stream, stops=stops, **kw)
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

    def _generate_text_ids(self, prompts, *, stream: Callable[[int, str], None] | None = None,
                           stops: Sequence[str] = (), **kw) -> list[Result]:
        """:meth:`generate` of token-id prompts with each result's ``text`` and stop strings
        ``stops`` (see :meth:`generate_text`; the ``generate --stop`` command uses it)."""
        tok = self._need_tokenizer()
        stops = _check_stop(stops)
        if not stops:
            raise DeepSeekError("stop: expected at least one stop string")
        if stream is not None and not callable(stream):
            raise DeepSeekError(f"stream must be a callable stream(row, text) or None, got {type(stream).__name__}")
        prompts = self._check_prompts(prompts)
        texts = [_StopText(tok.stream_decoder(), stops) for _ in prompts]

        def watch(row: int, ids: list[int]) -> bool:
            t = texts[row]
            hit = t.feed(ids)
            if stream is not None:
                t.send(stream, row)
            return hit

        results = self.generate(prompts, _watch=watch, **kw)
        for row, (r, t) in enumerate(zip(results, texts)):
            r.text = t.finish()
            if t.cut is not None:
                r.output_ids, r.finish_reason = r.output_ids[:t.kept], "stop"
                if r.logprobs is not None:
                    r.logprobs = r.logprobs[:t.kept]
                if r.top_logprobs is not None:
                    r.top_logprobs = r.top_logprobs[:t.kept]
            if stream is not None:
                t.send(stream, row)
        self.last_stats.new_tokens = sum(len(r.output_ids) for r in results)
        return results
