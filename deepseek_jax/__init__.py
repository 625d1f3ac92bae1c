"""deepseek_jax: DeepSeek-V3 in JAX/Flax NNX.

The small public API (the CLI and the notebooks use nothing else)::

    import deepseek_jax as dj
    model = dj.load("path/to/checkpoint")            # Hub-layout directory (FP8 or BF16)
    model = dj.load(dj.demo_checkpoint())            # the small model the package ships
    logits = dj.logits(model, ids)                   # [B, T, V] float32, prefill (naive MLA)
    logits = dj.logits(model, ids, mode="decode")    # token by token over the latent cache
    mtp = dj.mtp_logits(model, ids)                  # [B, T-1, V]: row i predicts token i+2
    lp = dj.token_logprobs(logits, ids)              # [B, T-1] log p(t_{i+1} | t_<=i)
    lps = dj.sequence_logprobs(model, [ids_a, ids_b])  # sequences of any lengths: a [n-1] array each
    lls = dj.loglikelihood(model, [(ctx, cont)])     # log p(cont | ctx), is_greedy: multiple-choice eval
    ins = dj.internals(model, ids)                   # every layer's hidden states, every token's experts

Shape-suffix glossary used in array names throughout (``x_BTD``, ``w_ENK``):
    B batch · T new tokens · S cache positions · D hidden · H heads · N/K out/in dims of a
    weight (Hub ``[out, in]``) · L kv latent (512; as a leading axis, ``cache_LBSC``, the stacked
    layers) · R rope dim (64) · C = L + R latent cache
    width (576) · A value head dim · E routed experts · F expert hidden · G expert groups ·
    V vocab · M flattened rows (B*T) · A (in MoE) token-expert assignments.
"""

from typing import TYPE_CHECKING

from deepseek_jax.errors import DeepSeekError

__version__ = "0.1.0"   # the package's one version (pyproject.toml reads it from here)

# Attributes are imported lazily so that light modules (config, hub, tokenizer) can be used
# without importing jax: `import deepseek_jax.config` does not pull in the model.
_LAZY = {
    "load": "deepseek_jax.api", "load_config": "deepseek_jax.api", "init_random": "deepseek_jax.api",
    "logits": "deepseek_jax.scoring", "mtp_logits": "deepseek_jax.scoring",
    "token_logprobs": "deepseek_jax.scoring", "perplexity": "deepseek_jax.scoring",
    "sequence_logprobs": "deepseek_jax.scoring", "loglikelihood": "deepseek_jax.scoring",
    "Likelihood": "deepseek_jax.scoring",
    "DeepSeekConfig": "deepseek_jax.config", "DeepSeekV3": "deepseek_jax.model",
    "Precision": "deepseek_jax.quant",
    "demo_checkpoint": "deepseek_jax.commands.demo",
    "internals": "deepseek_jax.introspect", "Internals": "deepseek_jax.introspect",
}

__all__ = ["DeepSeekError", "__version__", *_LAZY]


def __getattr__(name: str):
    import importlib
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in ("scoring", "api", "checkpoint", "model", "config"):
        return importlib.import_module(f"deepseek_jax.{name}")
    raise AttributeError(f"module 'deepseek_jax' has no attribute {name!r}")


if TYPE_CHECKING:  # for type checkers and IDEs
    from deepseek_jax.api import init_random, load, load_config  # noqa: F401
    from deepseek_jax.commands.demo import demo_checkpoint  # noqa: F401
    from deepseek_jax.config import DeepSeekConfig  # noqa: F401
    from deepseek_jax.introspect import Internals, internals  # noqa: F401
    from deepseek_jax.model import DeepSeekV3  # noqa: F401
    from deepseek_jax.quant import Precision  # noqa: F401
    from deepseek_jax.scoring import (  # noqa: F401
        Likelihood, logits, loglikelihood, mtp_logits, perplexity, sequence_logprobs, token_logprobs)
