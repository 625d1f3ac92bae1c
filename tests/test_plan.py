"""``deepseek-jax plan``: weights per device equal a hand count; the tiny plan equals XLA's own."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from deepseek_jax.config import load_config
from deepseek_jax.hub import hub_tensor_specs


def _plan_json(*args) -> dict:
    env = dict(os.environ)
    env.pop("JAX_NUM_CPU_DEVICES", None)  # plan sets its own device count
    r = subprocess.run([sys.executable, "-m", "deepseek_jax.cli", "plan", *args, "--json"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _hand_count(split) -> float:
    """Per-device bytes from the Hub tensor list: each tensor's bytes / the ways it is split."""
    cfg = json.load(open(os.path.join(os.path.dirname(__file__), "..", "configs", "deepseek-v3-671b.json")))
    total = 0.0
    for name, spec in hub_tensor_specs(cfg, include_mtp=False).items():
        total += spec.nbytes / split(name)
    return total


def test_671b_on_16_h200_matches_hand_count():
    """2 nodes x 8 H200, experts over all 16: routed experts / 16, everything else replicated."""
    plan = _plan_json("--config", "deepseek-v3-671b", "--mesh", "expert=16", "--device", "h200", "--no-compile")
    hand = _hand_count(lambda n: 16 if ".mlp.experts." in n else 1)
    assert abs(plan["weights"] - hand) / hand < 0.02
    assert plan["weights"] < 141e9
    # nothing compiled: no temporaries reported as if measured (they were 0)
    assert plan["decode_temp"] is None and plan["prefill_temp"] is None
    assert plan["peak"] == plan["weights"] + plan["cache"]


def test_671b_on_v5p_64_matches_hand_count():
    """v5p-64 = 32 chips: experts over expert=8, heads / MLP hidden / expert hidden / vocab over model=4."""
    plan = _plan_json("--config", "deepseek-v3-671b", "--mesh", "expert=8,model=4", "--device", "v5p",
                      "--no-compile")

    def split(n: str) -> int:
        if ".mlp.experts." in n:
            return 8 * 4                      # experts over expert, hidden over model
        if any(k in n for k in ("q_b_proj", "kv_b_proj", "o_proj", "mlp.gate_proj", "mlp.up_proj",
                                "mlp.down_proj", "shared_experts", "embed_tokens", "lm_head")):
            return 4                          # heads / hidden / vocab over model
        return 1                              # q_a, kv_a, norms, router
    hand = _hand_count(split)
    assert abs(plan["weights"] - hand) / hand < 0.02


def test_tiny_plan_equals_compiled_executable():
    """Weights + cache + token inputs counted from the rules == XLA's argument bytes per device."""
    plan = _plan_json("--config", "tiny", "--mesh", "data=2,expert=2,model=2", "--batch", "4", "--max-len", "64")
    cfg = load_config("tiny")
    tokens = 2 * (4 // 2) * 4                 # ids + positions, int32, batch split over data
    assert plan["decode_args"] == plan["weights"] + plan["cache"] + tokens
    # the latent cache: layers x batch/data x max_len x (kv_lora_rank + rope dim) x bf16
    assert plan["cache"] == cfg.num_hidden_layers * 2 * 64 * cfg.latent_dim * 2
    assert plan["decode_temp"] > 0 and plan["prefill_temp"] > 0


def test_plan_bad_input(capsys):
    from deepseek_jax import cli
    assert cli.main(["plan", "--config", "nope", "--mesh", "expert=2"]) == 2
    assert "nope" in capsys.readouterr().err
    assert cli.main(["plan", "--config", "tiny", "--mesh", "expert=2", "--device", "abacus", "--no-compile"]) == 2


def test_plan_compiles_the_prefill_the_generator_runs():
    """``--prefill-chunk``: the prefill is compiled as the generator runs it. In 32-token chunks
    a 256-token prompt's attention scores are [H, 32, 256] instead of [H, 256, 256], and XLA's
    temporaries of the compiled prefill shrink accordingly; "auto" keeps one pass at this size."""
    common = ("--config", "tiny", "--mesh", "data=1,expert=1,model=1", "--max-len", "256", "--prompt-len", "200")
    one = _plan_json(*common, "--prefill-chunk", "none")
    chunked = _plan_json(*common, "--prefill-chunk", "32")
    auto = _plan_json(*common)
    assert one["prefill_tokens"] == chunked["prefill_tokens"] == 256     # 200 pads to its bucket
    assert one["prefill_chunk"] is None and auto["prefill_chunk"] is None and chunked["prefill_chunk"] == 32
    assert chunked["prefill_temp"] < one["prefill_temp"]
    assert chunked["decode_temp"] == one["decode_temp"]
