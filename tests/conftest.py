"""Shared fixtures: tiny random checkpoints in the Hub's layout, built once per session."""

from __future__ import annotations

import gc
import glob
import os

# Eight fake CPU devices for the mesh tests; must be set before jax initialises its backends.
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
# XLA's CPU backend with LLVM's optimizations off: the suite's time is mostly XLA compiling tiny
# programs that then run for milliseconds (a generate test: 18.3 of its 27 s in
# backend_compile), and at level 0 the suite ran in 1318 s instead of 1589 (2 cores). The
# programs compute the same functions, rounded differently in the last bits. Subprocesses
# inherit it; the GPU and TPU compile tests drop it (their launch and traffic counts are of the
# programs a user's accelerator would get), and a machine with a GPU or TPU attached
# (benchmarks/gpu_session.sh runs the kernel tests there) goes without.
CPU_FAST_COMPILE = "--xla_backend_optimization_level=0"
_accelerator = glob.glob("/dev/nvidia[0-9]*") or glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*")
if not _accelerator and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_FAST_COMPILE}".strip()

import jax  # noqa: E402
import pytest  # noqa: E402

from deepseek_jax.synthetic import random_hub_checkpoint, tiny_config  # noqa: E402

# Config A: the stock tiny config (q_lora, YaRN factor 4 over 32 original positions, 16 experts
# in 4 groups). Config B: no q_lora, dims above 128 with partial FP8 edge blocks, negative and
# positive router biases, 2 groups.
CONFIG_A = tiny_config()
CONFIG_B = tiny_config(
    vocab_size=300, hidden_size=160, intermediate_size=200, moe_intermediate_size=144,
    num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2,
    q_lora_rank=None, max_position_embeddings=128,
    kv_lora_rank=136, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24,
    n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=2,
    rope_scaling={"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16,
                  "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Free the compiled programs after a test module once a worker holds too many.

    XLA's CPU client maps about three memory regions per loaded program, and jax keeps each one it
    compiled (jit caches, and every eager op at every shape the Pallas interpreter runs). One
    worker of the full suite reached 55,806 mappings against Linux's `vm.max_map_count` of 65,530,
    and a mapping past that limit segfaults XLA's compiler in whichever test is compiling. Past
    20,000 mappings, the caches are cleared when a module ends (clearing after every module
    costs recompiles: 28% on two modules).
    """
    yield
    if _mapped_regions() > 20_000:
        jax.clear_caches()
        gc.collect()


def _mapped_regions() -> int:
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:          # not Linux
        return 0


@pytest.fixture(scope="session")
def ckpt_a(tmp_path_factory) -> str:
    return random_hub_checkpoint(tmp_path_factory.mktemp("ckpt_a"), CONFIG_A, seed=1,
                                 max_shard_bytes=200_000, bias_range=(0.0, 0.5))


@pytest.fixture(scope="session")
def ckpt_b(tmp_path_factory) -> str:
    return random_hub_checkpoint(tmp_path_factory.mktemp("ckpt_b"), CONFIG_B, seed=2,
                                 max_shard_bytes=300_000, bias_range=(-0.5, 0.3))


@pytest.fixture(scope="session")
def ckpt_a_bf16(tmp_path_factory) -> str:
    return random_hub_checkpoint(tmp_path_factory.mktemp("ckpt_a_bf16"), CONFIG_A, seed=1, fp8=False)
