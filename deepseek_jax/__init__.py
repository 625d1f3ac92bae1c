"""deepseek_jax: DeepSeek-V3 in JAX/Flax NNX.

The small public API (the CLI and the notebooks use nothing else)::

    import deepseek_jax as dj
    model = dj.load("path/to/checkpoint")            # Hub-layout directory (FP8 or BF16)
    logits = dj.logits(model, ids)                   # [B, T, V] float32, prefill (naive MLA)
    logits = dj.logits(model, ids, mode="decode")    # token by token over the latent cache
    mtp = dj.mtp_logits(model, ids)                  # [B, T-1, V]: row i predicts token i+2
    lp = dj.token_logprobs(logits, ids)              # [B, T-1] log p(t_{i+1} | t_<=i)

Shape-suffix glossary used in array names throughout (``x_BTD``, ``w_ENK``):
    B batch · T new tokens · S cache positions · D hidden · H heads · N/K out/in dims of a
    weight (Hub ``[out, in]``) · L kv latent (512) · R rope dim (64) · C = L + R latent cache
    width (576) · A value head dim · E routed experts · F expert hidden · G expert groups ·
    V vocab · M flattened rows (B*T) · A (in MoE) token-expert assignments.
"""

from deepseek_jax.api import load, load_config, logits, mtp_logits, perplexity, token_logprobs
from deepseek_jax.config import DeepSeekConfig
from deepseek_jax.errors import DeepSeekError
from deepseek_jax.model import DeepSeekV3
from deepseek_jax.quant import Precision

__all__ = [
    "DeepSeekConfig", "DeepSeekError", "DeepSeekV3", "Precision",
    "load", "load_config", "logits", "mtp_logits", "token_logprobs", "perplexity",
]
