"""Tests of the Mosaic GPU (Hopper wgmma + TMA) MLA decode kernel, ``kernels_pallas.mla_decode_mgpu``.

On CPU: JAX's Mosaic GPU interpreter against :func:`~kernels_pallas.mla_decode.mla_decode_ref`
(bf16 inputs, relative error < 1e-2 as in ``tests/test_kernels.py``), with its race detector on
for the first call (the two compute warpgroups exchange row maxima and probabilities through
shared memory), and lowering for CUDA with ``jax.export`` at the model's shapes (Mosaic's layout
inference, TMA and shared-memory checks; only the PTX compile needs a GPU). With a GPU, the
``compiled`` parametrizations run the kernel itself.

Interpreted kernels are slow, so shapes are small (64 heads, L=128/256, R=64, ~150 tokens).
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from kernels_pallas.mla_decode import mla_decode_ref
from kernels_pallas.mla_decode_mgpu import MlaMgpuConfig, mla_decode_mgpu, smem_bytes, supported
from tests.test_kernels import COMPILED, _assert_close, _mla_inputs, rel_err

BF16 = jnp.bfloat16


def _interpret_arg(interpret: bool, detect_races: bool = False):
    """``True`` → the interpreter, with the race detector on when asked."""
    if not interpret or not detect_races:
        return interpret
    from jax.experimental.pallas import mosaic_gpu as plgpu
    return plgpu.InterpretGPUParams(detect_races=True)


def _races_found():
    """Whether the last interpreted kernel had a data race (``None``: this JAX has no such query)."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import get_races
    except ImportError:
        return None
    return bool(get_races().races_found)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN garbage (masked)
@pytest.mark.parametrize("interpret", COMPILED)
def test_mla_mgpu_matches_ref(interpret):
    """Ragged lengths: full S (152, not a multiple of the 64-token block: the last block is
    partial and its rows past S come from TMA as zeros), 0, 1, 100 (the second warpgroup's half of
    the last block has 4 valid tokens), 70 (it has none). Large (sequence 0) and tiny (sequence
    4) score magnitudes. Then garbage past each length (large finite values and NaN/inf) must
    not change the result at all."""
    rng = np.random.default_rng(40)
    b, h, l, r, s = 5, 64, 128, 64, 152
    lens = [152, 0, 1, 100, 70]
    ql, qp, cache, lengths = _mla_inputs(rng, b, h, l, r, s, jnp.float32, lens)
    mag = jnp.asarray([20.0, 1.0, 1.0, 1.0, 1e-3], jnp.float32)[:, None, None]   # score magnitudes
    ql, qp, cache = (ql * mag).astype(BF16), (qp * mag).astype(BF16), cache.astype(BF16)
    scale = 0.1
    ref = mla_decode_ref(ql, qp, cache, lengths, scale=scale, kv_lora_rank=l)
    o = mla_decode_mgpu(ql, qp, cache, lengths, scale=scale, kv_lora_rank=l,
                        interpret=_interpret_arg(interpret, detect_races=True))
    if interpret:
        assert _races_found() is not True, "data race in the interpreted kernel"
    _assert_close(o, ref, BF16)
    o = np.asarray(o)
    assert np.all(o[1] == 0.0), "length 0 must give zeros"
    for i in range(b):   # per sequence too, so that the large one does not hide the others
        if lens[i]:
            assert rel_err(o[i], ref[i]) < 1e-2, (i, rel_err(o[i], ref[i]))

    garbage = np.array(cache.astype(jnp.float32))
    for i, n in enumerate(lens):
        junk = rng.uniform(-3e4, 3e4, garbage[i, n:].shape).astype(np.float32)
        junk[::3, ::5] = np.nan
        junk[1::3, ::7] = np.inf
        garbage[i, n:] = junk
    o_junk = mla_decode_mgpu(ql, qp, jnp.asarray(garbage, BF16), lengths, scale=scale, kv_lora_rank=l,
                             interpret=interpret)
    np.testing.assert_array_equal(np.asarray(o_junk), o)


@pytest.mark.parametrize("interpret", COMPILED)
def test_mla_mgpu_layer_of_a_cache_stack(interpret):
    """``layer=`` (traced, under jit) reads that layer of a ``[NL, B, S, C]`` stack in place; two
    head blocks (H=128) and L=256 (each compute warpgroup owns 128 output columns)."""
    rng = np.random.default_rng(41)
    nl, b, h, l, r, s = 3, 2, 128, 256, 64, 136
    lens = [136, 65]
    stack = jnp.asarray(rng.standard_normal((nl, b, s, l + r)), BF16)
    ql, qp, _, lengths = _mla_inputs(rng, b, h, l, r, s, BF16, lens)
    fn = jax.jit(lambda a, q, c, n, lay: mla_decode_mgpu(a, q, c, n, scale=0.06, kv_lora_rank=l,
                                                          layer=lay, interpret=interpret))
    o = fn(ql, qp, stack, lengths, jnp.int32(1))
    _assert_close(o, mla_decode_ref(ql, qp, stack[1], lengths, scale=0.06, kv_lora_rank=l), BF16)


def test_mla_mgpu_supported_shapes():
    bf = BF16
    assert supported(64, 128, 512, 64, 4096, bf)          # the model's decode shape
    assert supported(1, 64, 128, 64, 72, bf)
    assert not supported(1, 64, 128, 64, 100, bf)                  # S: whole 8-row TMA tiles
    assert not supported(1, 64, 128, 64, 40, bf)                   # S >= block_t
    assert smem_bytes(512, 64) <= 227 * 1024
    assert not supported(64, 128, 512, 64, 4096, jnp.float32)     # bf16 only
    assert not supported(64, 48, 512, 64, 4096, bf)                # heads in blocks of 64
    assert not supported(64, 128, 448, 64, 4096, bf)               # L/2 in 64-column tiles
    assert not supported(64, 128, 640, 64, 4096, bf)               # L/2 > 256: one wgmma N
    assert not supported(64, 128, 512, 32, 4096, bf)               # R in 64-column tiles
    assert not supported(64, 128, 512, 64, 4096, bf, MlaMgpuConfig(stages=3))    # 299 KB of smem
    assert not supported(64, 128, 512, 64, 4096, bf, MlaMgpuConfig(block_t=32))  # P@V K: 64s
    assert not supported(0, 128, 512, 64, 4096, bf)


def test_mla_mgpu_rejects_what_it_does_not_tile():
    def args(b=2, h=64, l=128, r=64, s=70, dtype=BF16, qdtype=None):
        q = qdtype or dtype
        return (jnp.zeros((b, h, l), q), jnp.zeros((b, h, r), q), jnp.zeros((b, s, l + r), dtype),
                jnp.zeros((b,), jnp.int32))

    for bad in (dict(h=48), dict(l=192), dict(r=32), dict(s=100), dict(dtype=jnp.float32),
                dict(qdtype=jnp.float32)):
        a = args(**bad)
        with pytest.raises(ValueError, match=r"^mla_decode_mgpu: unsupported shape B=2 "):
            mla_decode_mgpu(*a, scale=0.1, kv_lora_rank=a[0].shape[2], interpret=True)
    a = args()
    with pytest.raises(ValueError, match="kv_lora_rank"):              # shape checks as mla_decode's
        mla_decode_mgpu(*a, scale=0.1, kv_lora_rank=64, interpret=True)
    with pytest.raises(ValueError, match="cache must be"):
        mla_decode_mgpu(*a, scale=0.1, kv_lora_rank=128, layer=0, interpret=True)


@pytest.mark.parametrize("b,s,layered", [(64, 4096, False), (64, 4096, True), (1, 4096, False), (2, 200, False)],
                         ids=["b64", "b64-layer", "b1", "b2-s200"])
def test_mla_mgpu_lowers_for_the_gpu(b, s, layered):
    """Lowered for CUDA on the CPU host (``jax.export``) at the model's decode shape (H=128,
    L=512, R=64, a 4096-token cache; with ``layer`` a traced index into a 4-layer stack), and with
    a cache length that is not a multiple of the block (the last TMA window runs past S)."""
    from jax import export
    h, l, r = 128, 512, 64
    S = jax.ShapeDtypeStruct
    args = [S((b, h, l), BF16), S((b, h, r), BF16), S((4, b, s, l + r) if layered else (b, s, l + r), BF16),
            S((b,), jnp.int32)]
    if layered:
        args.append(S((), jnp.int32))
        fn = lambda a, q, c, n, lay: mla_decode_mgpu(a, q, c, n, scale=0.1, kv_lora_rank=l, layer=lay)  # noqa: E731
    else:
        fn = lambda a, q, c, n: mla_decode_mgpu(a, q, c, n, scale=0.1, kv_lora_rank=l)  # noqa: E731
    exp = export.export(jax.jit(fn), platforms=["cuda"])(*args)
    assert "mosaic_gpu" in exp.mlir_module() and exp.out_avals[0].shape == (b, h, l)
    assert exp.out_avals[0].dtype == jnp.float32


def test_mla_decode_takes_the_mosaic_gpu_kernel_when_asked(monkeypatch):
    """``$DEEPSEEK_JAX_MLA_GPU=mosaic_gpu``: ``mla_decode`` on a GPU runs the wgmma kernel where it
    tiles the shape and the batch gives it ``MGPU_MIN_PROGRAMS`` CTAs (a stack read in place via
    ``layer=``); the Triton kernel otherwise (too few CTAs, or an untiled shape)."""
    import importlib
    md = importlib.import_module("kernels_pallas.mla_decode")   # (the package exports a function of that name)
    rng = np.random.default_rng(42)
    b, h, l, r, s = 2, 64, 128, 64, 72
    ql, qp, _, lengths = _mla_inputs(rng, b, h, l, r, s, BF16, [72, 9])
    stack = jnp.asarray(rng.standard_normal((2, b, s, l + r)), BF16)
    call = lambda a, q, c, n, lay: md.mla_decode(a, q, c, n, scale=0.08, kv_lora_rank=l,  # noqa: E731
                                                 impl="interpret_gpu", layer=lay)
    jaxpr = lambda: str(jax.make_jaxpr(call)(ql, qp, stack, lengths, jnp.int32(1)))  # noqa: E731
    assert "wgmma" not in jaxpr()
    monkeypatch.setenv("DEEPSEEK_JAX_MLA_GPU", "mosaic_gpu")
    jax.clear_caches()
    assert "wgmma" not in jaxpr()          # 2 CTAs < MGPU_MIN_PROGRAMS: split-T Triton
    monkeypatch.setattr(md, "MGPU_MIN_PROGRAMS", 2)
    jax.clear_caches()
    assert "wgmma" in jaxpr()
    o = call(ql, qp, stack, lengths, jnp.int32(1))
    _assert_close(o, mla_decode_ref(ql, qp, stack[1], lengths, scale=0.08, kv_lora_rank=l), BF16)
    assert "wgmma" not in str(jax.make_jaxpr(call)(ql[:, :48], qp[:, :48], stack, lengths, jnp.int32(1)))
