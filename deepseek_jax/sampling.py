"""Next-token sampling: greedy, temperature, top-k and top-p (nucleus), seeded and reproducible.

:class:`SamplingParams` holds the user's settings; a temperature below 1e-5 (0 included) means
greedy. Inside the compiled decode loop the numbers (temperature, k, p) are traced values, so
changing them never recompiles; only two booleans are static: whether to sample at all
(``greedy``) and whether a top-k/top-p filter is needed (``filtered``, which costs one sort of
the vocabulary per step).

Order of operations (the usual one): divide the logits by the temperature, keep the ``top_k``
largest, then keep the smallest prefix of those (by probability, descending) whose mass reaches
``top_p``; the most likely token is always kept. Sampling draws from the renormalised
distribution with ``jax.random.categorical``. Each row of a batch has its own key, and the key
of step ``i`` is ``fold_in(row_key, i)``, so a row's samples do not depend on how the decode loop
is chunked (streaming or not).
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.errors import DeepSeekError

__all__ = ["SamplingParams", "GREEDY", "filter_logits", "sample", "row_keys"]


#: Temperatures below this sample greedily (as vLLM's sampling epsilon does).
MIN_TEMPERATURE = 1e-5


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen.

    temperature: >= 0; below :data:`MIN_TEMPERATURE` (0 included) means greedy (argmax); otherwise
      logits are divided by it. (Smaller positive values round to 0 in float32 arithmetic, where
      1e-38 is subnormal and flushed to zero, and the division gave NaN logits and token 0.)
    top_k: keep the ``k`` most likely tokens (0 = no limit).
    top_p: keep the smallest set of most likely tokens whose probability reaches ``p``, in (0, 1].
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def validate(self) -> "SamplingParams":
        """Returns ``self`` or raises a one-line :class:`DeepSeekError`."""
        t, k, p = self.temperature, self.top_k, self.top_p
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) or t < 0:
            raise DeepSeekError(f"temperature must be a finite number >= 0 (0: greedy), got {t!r}")
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
            raise DeepSeekError(f"top-k must be an integer >= 0 (0 = off), got {k!r}")
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or math.isnan(p) or not 0.0 < p <= 1.0:
            raise DeepSeekError(f"top-p must be in (0, 1], got {p!r}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    @property
    def filtered(self) -> bool:
        """Whether a top-k/top-p filter applies (static in the compiled loop)."""
        return not self.greedy and (self.top_k > 0 or self.top_p < 1.0)

    def traced(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(temperature, top_k, top_p)`` as typed scalars (dynamic arguments of compiled code;
        numpy, which a compiled call takes without dispatching an op per value)."""
        t = 1.0 if self.greedy else float(self.temperature)
        # (a k beyond int32 is "no limit" too, as any k >= the vocabulary is)
        return (np.float32(t), np.int32(min(int(self.top_k), 2 ** 31 - 1)), np.float32(float(self.top_p)))


GREEDY = SamplingParams()


def filter_logits(logits_BV: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Sets every logit outside the top-k / top-p set of its row to ``-inf``.

    ``top_k`` (0 = off) and ``top_p`` are traced scalars. One descending sort per row; the kept
    set is everything at or above the smallest kept value (exact ties at the threshold are kept).
    """
    V = logits_BV.shape[-1]
    logits_BV = logits_BV.astype(jnp.float32)
    sorted_BV = -jnp.sort(-logits_BV, axis=-1)
    rank_V = jnp.arange(V, dtype=jnp.int32)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    in_k_BV = rank_V[None, :] < k
    probs_BV = jax.nn.softmax(jnp.where(in_k_BV, sorted_BV, -jnp.inf), axis=-1)
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    keep_BV = in_k_BV & ((mass_before_BV < top_p) | (rank_V[None, :] == 0))
    n_keep_B = jnp.sum(keep_BV, axis=-1).astype(jnp.int32)
    thresh_B1 = jnp.take_along_axis(sorted_BV, (n_keep_B - 1)[:, None], axis=-1)
    return jnp.where(logits_BV >= thresh_B1, logits_BV, -jnp.inf)


def row_keys(seed: jax.Array, batch: int, first_row: jax.Array | int = 0) -> jax.Array:
    """One key per row: ``fold_in(key(seed), first_row + row)`` (a row's key does not depend on
    the batch size; ``first_row``: the batch's first row in a longer input cut into batches)."""
    base = jax.random.key(seed)
    rows = jnp.asarray(first_row, jnp.uint32) + jnp.arange(batch, dtype=jnp.uint32)
    return jax.vmap(lambda r: jax.random.fold_in(base, r))(rows)


def sample(logits_BV: jax.Array, keys_B: jax.Array, step: jax.Array, *, greedy: bool, filtered: bool,
           temperature: jax.Array | None = None, top_k: jax.Array | None = None,
           top_p: jax.Array | None = None) -> jax.Array:
    """Next token per row ``[B]`` int32 from float logits ``[B, V]``.

    ``greedy`` and ``filtered`` are static; ``keys_B`` are the per-row keys of :func:`row_keys` and
    ``step`` the index of the token being drawn (folded into each row's key).
    """
    if greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    lg = logits_BV.astype(jnp.float32) / temperature
    if filtered:
        lg = filter_logits(lg, top_k, top_p)
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys_B)
    return jax.vmap(jax.random.categorical)(step_keys, lg).astype(jnp.int32)
