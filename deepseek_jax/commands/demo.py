"""``deepseek-jax demo``: the main job on an embedded default, no downloads.

Builds (once, deterministically) a small DeepSeek-V3-shaped FP8 checkpoint in the Hub layout
with the package's tiny tokenizer, then generates from a couple of chat prompts and prints
them with tokens/s. The model is random for now, so the text is gibberish: the point is the
whole path (Hub reader, FP8 weights, MLA latent cache, MoE, compiled decode loop, tokenizer and
chat template). Where the model comes from is :func:`demo_checkpoint` alone, so that a trained
model can replace the random one by changing that function.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

from deepseek_jax.commands.generate import add_sampling_args, load_generator, sampling_from_args, timing_line
from deepseek_jax.errors import DeepSeekError

DEFAULT_PROMPTS = ("Hello! Who are you?", "Write a short poem about the sea.")

#: Bump when the demo model changes: an existing cache directory with another stamp is rebuilt.
DEMO_VERSION = 1
_STAMP = "deepseek_jax_demo.json"


def demo_config() -> dict:
    """DeepSeek-V3's shape at small width: MLA with q-LoRA and YaRN, 1 dense + 3 MoE layers with
    grouped routing (32 experts in 8 groups, 4 groups kept, 4 experts per token, 1 shared), one
    MTP layer, vocab 512 (the tiny tokenizer's)."""
    from deepseek_jax.synthetic import tiny_config

    return tiny_config(
        vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
        num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=8, num_key_value_heads=8,
        n_routed_experts=32, n_shared_experts=1, num_experts_per_tok=4, n_group=8, topk_group=4,
        q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        max_position_embeddings=2048,
        rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 512,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    )


def default_demo_dir() -> str:
    root = os.environ.get("DEEPSEEK_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "deepseek_jax")
    return os.path.join(root, "demo")


def demo_checkpoint(directory: str | None = None) -> str:
    """The demo model as a Hub-layout checkpoint directory (with tokenizer files); built on first
    use, reused afterwards. This is the one place that decides where the demo model comes from."""
    from deepseek_jax.synthetic import random_hub_checkpoint
    from deepseek_jax.tokenizer import TINY_TOKENIZER_DIR

    directory = os.path.abspath(directory or default_demo_dir())
    stamp = {"version": DEMO_VERSION, "source": "random_hub_checkpoint", "seed": 0, "config": demo_config()}
    stamp_path = os.path.join(directory, _STAMP)
    if os.path.isfile(stamp_path):
        try:
            with open(stamp_path, encoding="utf-8") as f:
                if json.load(f) == stamp:
                    return directory
        except (OSError, ValueError):
            pass
    elif os.path.isdir(directory) and os.listdir(directory):
        raise DeepSeekError(f"demo: {directory} is not empty and holds no demo checkpoint; pick another --dir")
    parent = os.path.dirname(directory)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".demo-build-", dir=parent)
    except OSError as e:
        raise DeepSeekError(f"demo: cannot create a directory under {parent}: {e.strerror or e}") from None
    try:
        print(f"building the demo checkpoint in {directory} ...", file=sys.stderr)
        random_hub_checkpoint(tmp, stamp["config"], seed=stamp["seed"], fp8=True)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(TINY_TOKENIZER_DIR / name, os.path.join(tmp, name))
        with open(os.path.join(tmp, _STAMP), "w", encoding="utf-8") as f:
            json.dump(stamp, f, indent=1)
        if os.path.isdir(directory):
            shutil.rmtree(directory)   # empty, or an older demo build (it has our stamp)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="generate with a small built-in DeepSeek-V3-shaped model (no downloads)",
                       description="Builds a small DeepSeek-V3-shaped FP8 checkpoint (once, deterministically) "
                                   "and generates from a few chat prompts, printing tokens/s.")
    p.add_argument("--dir", help=f"where the demo checkpoint lives (default {default_demo_dir()})")
    p.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt instead of the defaults (repeatable)")
    add_sampling_args(p, max_new_tokens=48)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    sampling = sampling_from_args(args)
    prompts = args.prompt or list(DEFAULT_PROMPTS)
    ckpt = demo_checkpoint(args.dir)
    from deepseek_jax.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(ckpt)
    gen = load_generator(ckpt, args.dtype, tokenizer)
    cfg = gen.model.cfg
    print(f"demo model: {ckpt} (random weights, DeepSeek-V3 shape: {cfg.num_hidden_layers} layers, "
          f"hidden {cfg.hidden_size}, {cfg.n_routed_experts} experts, FP8 128x128 blocks, vocab {cfg.vocab_size})")
    results = gen.generate_text(prompts, max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed)
    for text, r in zip(prompts, results):
        print(f"\n>>> {text}\n{r.text}\n[{len(r.output_ids)} tokens, {r.finish_reason}]")
    print("\n" + timing_line(gen.last_stats))
    return 0
