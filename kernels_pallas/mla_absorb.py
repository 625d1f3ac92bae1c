"""MLA's absorbed products with ``kv_b_proj``'s block-scaled FP8 weight read as it is stored.

``kv_b_proj`` maps the latent ``c`` (``L = kv_lora_rank``) to ``[k_nope (N) | v (A)]`` per head: its
weight ``W`` is ``[H * (N + A), L]`` (the Hub's ``[out, in]``), head ``h``'s rows
``h (N + A) ... h (N + A) + N`` are ``W_UK[h]`` and the next ``A`` rows ``W_UV[h]``. The absorbed form
(SPEC §3) multiplies by them per head instead of expanding the cache:

* ``part="k"``: ``q_lat[m, h, l] = Σ_n x[m, h, n] · W_UK[h][n, l]``  (``x`` = ``q_nope``, ``[M, H, N]``,
  or the whole query ``[M, H, N + R]``, whose first ``N`` columns per head are ``q_nope``: the GPU
  kernel reads them in place, with no XLA slice before it)
* ``part="v"``: ``out[m, h, a]  = Σ_l x[m, h, l] · W_UV[h][a, l]``  (``x`` = ``o_lat``, ``[M, H, L]``)

with ``W = float(Wq) · S[row // 128, col // 128]`` and float32 accumulation.

Why a kernel: XLA's GPU compiler turns these few-row, 128-batch products into a dequantization
of the layer's whole ``kv_b_proj`` plus a transpose, writing float32 or bf16 copies of the weight
and reading them back. Compiled for an H200 (``kernels_pallas.aot``), the real-width decode step
moved ~172 MB per layer for them at batch 1 and ~126 MB at batch 16, against the 16.8 MB of
the FP8 weight (``benchmarks/gpu_compile.py --by traffic``).

* GPU (Triton-lowered Pallas): ``part="k"``: grid ``(head, 128 output columns, row tile)``, one
  ``[N, 128]`` weight tile per program, its block scales applied to each 128-row partial product;
  ``part="v"``: grid ``(head, 128 output columns, row tile)``, a loop over the latent's 128-wide
  blocks (``x @ Wᵀ``, as the W8A16 GEMM). The weight of a stacked ``[layers, H (N + A), L]``
  array is read in place (``layer=``). Needs ``N``, ``A``, ``L`` multiples of 128 (DeepSeek-V3:
  128, 128, 512) and an FP8 weight; other shapes take the reference.
* TPU (Mosaic TPU): grid ``(row tile, head, 128-row block of W_UK / W_UV)``, the weight's
  ``[128, L]`` row blocks DMA'd from the layer stack in place (block index from a
  scalar-prefetched layer), the layer's block scales scalar-prefetched to SMEM. XLA's TPU
  compiler had done as the GPU's: compiled for a v5p chip, ~318 MB per layer per batch-1 step of
  reshapes, broadcasts and f32 copies of the weight. Where a head's W_UK / W_UV is one 128-row
  block (DeepSeek-V3's N = A = 128), 16 heads per grid step instead (grid ``(row tile, head
  group)``): each step of a Mosaic kernel has a fixed cost, and one head's block is only 64 KiB.
* The reference dequantizes the layer's weight to ``x.dtype`` and multiplies with float32
  accumulation: the model's own numbers before this kernel, unchanged on CPU.

``part="v"`` also takes ``x`` as the split-T decode kernel's unmerged partial softmax states
(:class:`kernels_pallas.mla_decode.SplitT`: ``acc [S, ..., H, L]``, ``m`` and ``l [S, ..., H]``,
from ``mla_decode(..., merge=False)``): the product is that of the merged ``o_lat [..., H, L]``
(:func:`~kernels_pallas.mla_decode.combine_splits`, float32) cast to the compute dtype ``dtype``.
The GPU kernel merges in its prologue (per row tile and head: the ``S`` maxima and sums, then per
128-wide latent block the weighted sum of the ``S`` accumulator tiles over the denominator, cast
as ``o_lat.astype(dtype)`` is); the TPU kernel and the reference merge in XLA first. At batch 1
and 16 this takes the merge's XLA ops (3 launches per layer) and ``o_lat``'s round trip through
memory out of the decode step.

``dtype`` (every entry point): the compute dtype: ``x`` (or the merged ``o_lat``) is cast to it and
the weight dequantized to it; default ``x.dtype``, float32 for a ``SplitT`` (the merged ``o_lat``'s
dtype). So ``mla_absorb(parts, ...)`` computes ``mla_absorb(combine_splits(parts), ...)`` and
``mla_absorb(x, dtype=d, ...)`` computes ``mla_absorb(x.astype(d), ...)``; ``out_dtype`` defaults
to ``dtype``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton

from kernels_pallas import backend
from kernels_pallas._common import QBLOCK, cdiv, dequantize_blocks, einsum32, is_fp8, masked_load, next_pow2
from kernels_pallas.mla_decode import SplitT, combine_splits

__all__ = ["mla_absorb_ref", "mla_absorb"]

PARTS = ("k", "v")


def _check(x_MHI, wq, ws, part, nope, layer):
    if part not in PARTS:
        raise ValueError(f"mla_absorb: part must be 'k' or 'v', got {part!r}")
    stacked = layer is not None
    if wq.ndim != 2 + stacked:
        raise ValueError(f"mla_absorb: expected a {'[layers, R, L]' if stacked else '[R, L]'} kv_b weight"
                         f"{' (layer= given)' if stacked else ''}, got shape {tuple(wq.shape)}")
    if x_MHI.ndim < 2:
        raise ValueError(f"mla_absorb: x must be [..., heads, width], got shape {tuple(x_MHI.shape)}")
    rows, lat = wq.shape[-2:]
    h = x_MHI.shape[-2]
    if rows % h or not 0 < nope < rows // h:
        raise ValueError(f"mla_absorb: kv_b weight rows {rows} are not {h} heads of nope {nope} + v")
    if part == "k" and x_MHI.shape[-1] < nope:
        raise ValueError(f"mla_absorb: part 'k' takes q_nope [..., {h}, {nope}] (or the query [..., {h}, "
                         f"{nope} + rope], its first {nope} columns), got {tuple(x_MHI.shape)}")
    if part == "v" and x_MHI.shape[-1] != lat:
        raise ValueError(f"mla_absorb: part 'v' takes x [..., {h}, {lat}], got {tuple(x_MHI.shape)}")
    if ws is not None:
        want = (*wq.shape[:-2], cdiv(rows, QBLOCK), cdiv(lat, QBLOCK))
        if tuple(ws.shape) != want:
            raise ValueError(f"mla_absorb: scale shape {tuple(ws.shape)} != {want} for weight {tuple(wq.shape)}")


def _unpack(x, part: str, dtype):
    """``x`` (an array or a :class:`SplitT`) → ``(x_like, parts, cdt)``: ``x_like`` has the
    product's input shape ``[..., H, I]`` (for a ``SplitT`` a ``ShapeDtypeStruct`` of the merged
    ``o_lat``), ``parts`` the ``SplitT`` or ``None``, ``cdt`` the compute dtype."""
    if not isinstance(x, SplitT):
        return x, None, jnp.dtype(dtype or x.dtype)
    if part != "v":
        raise ValueError(f"mla_absorb: split-T partials (SplitT) are o_lat's, for part='v'; got part={part!r}")
    acc, m, l = x
    if acc.ndim < 3 or acc.shape[0] < 1 or tuple(m.shape) != tuple(acc.shape[:-1]) or tuple(l.shape) != tuple(m.shape):
        raise ValueError(f"mla_absorb: SplitT must be acc [S, ..., H, L], m and l [S, ..., H]; got acc "
                         f"{tuple(acc.shape)}, m {tuple(m.shape)}, l {tuple(l.shape)}")
    cdt = jnp.dtype(dtype or jnp.float32)
    return jax.ShapeDtypeStruct(tuple(acc.shape[1:]), cdt), x, cdt


def _merged(x, parts, cdt):
    """The product's input as an array: ``x``, or the merged partials, in the compute dtype."""
    return (x if parts is None else combine_splits(parts)).astype(cdt)


def _geometry(x_MHI, wq, part: str, nope: int):
    """``(lead dims, heads, x width, latent, v width, rows, out width)`` of a product."""
    *lead, h, width_in = x_MHI.shape
    rows, lat = wq.shape[-2:]
    v_dim = rows // h - nope
    return tuple(lead), h, width_in, lat, v_dim, math.prod(lead), lat if part == "k" else v_dim


def mla_absorb_ref(x_MHI, wq, ws, *, part: str, nope: int, layer=None, out_dtype=None, dtype=None) -> jax.Array:
    """Plain-jnp reference: ``[..., H, N]`` → ``[..., H, L]`` (``part="k"``) or ``[..., H, L]`` →
    ``[..., H, A]`` (``part="v"``; ``x`` may be a :class:`SplitT`, merged here) in ``out_dtype``
    (default ``dtype``), computed in ``dtype`` (see the module doc; default ``x.dtype``).
    ``ws=None``: ``wq`` is an unquantized weight. ``layer``: ``wq``/``ws`` are stacks of layers,
    this one is used."""
    x_like, parts, dtype = _unpack(x_MHI, part, dtype)
    _check(x_like, wq, ws, part, nope, layer)
    x_MHI = _merged(x_MHI, parts, dtype)
    if part == "k":
        x_MHI = x_MHI[..., :nope]
    if layer is not None:
        wq = lax.dynamic_index_in_dim(wq, layer, 0, False)
        ws = None if ws is None else lax.dynamic_index_in_dim(ws, layer, 0, False)
    w = (wq if ws is None else dequantize_blocks(wq, ws)).astype(dtype)
    h = x_MHI.shape[-2]
    w_HRL = w.reshape(h, -1, w.shape[-1])
    if part == "k":
        y = einsum32("...hn,hnl->...hl", x_MHI, w_HRL[:, :nope])
    else:
        y = einsum32("...hl,hal->...ha", x_MHI, w_HRL[:, nope:])
    return y.astype(out_dtype or dtype)


# ---------------------------------------------------------------------------------------------------
# GPU kernel (Triton-lowered Pallas)
# ---------------------------------------------------------------------------------------------------


def _dot(a, b, nt: bool, precision):
    dims = (((1,), (1,)), ((), ())) if nt else (((1,), (0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _gpu_absorb_kernel(l_ref, *refs, part, m, bm, nope, v_dim, lat, cdt, splits, x_head):
    """One ``[bm, 128]`` output tile of head ``h``: ``x_ref`` ``[M, H * I]``, ``wq_ref``
    ``[layers, H (N + A), L]`` e4m3, ``ws_ref`` its scales, ``o_ref`` ``[M, H * O]``.
    With ``splits`` (``part="v"``), ``x_ref`` is three refs, split-T partial states: ``acc``
    ``[S, M, H * L]``, maxima ``m`` and sums ``[S, M, H]``, merged here tile by tile. ``x_head``:
    ``x``'s columns per head (``I``; for ``part="k"`` the query's ``N + R``, of which the first
    ``N`` are used)."""
    if splits is None:
        x_ref, wq_ref, ws_ref, o_ref = refs
    else:
        acc_ref, mx_ref, sum_ref, wq_ref, ws_ref, o_ref = refs
    layer = l_ref[0]
    h, j, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    row0 = i * bm
    rows = row0 + jnp.arange(bm)
    row_ok = (rows < m)[:, None] if m % bm else None
    head_row0 = h * (nope + v_dim)
    precision = lax.Precision.HIGHEST if jnp.dtype(cdt) == jnp.float32 else None
    width_in = nope if part == "k" else lat
    width_out = lat if part == "k" else v_dim

    if splits is not None:
        # the merge's prologue (combine_splits, per row of the tile): M = max_s m_s, then the
        # denominator Σ_s e^{m_s - M} l_s; the latent blocks' weighted sums follow in load_x
        row_ok1 = None if row_ok is None else row_ok[:, 0]
        part_m = lambda s: masked_load(mx_ref.at[s, pl.ds(row0, bm), h], row_ok1)   # [bm]
        mx = lax.fori_loop(0, splits, lambda s, a: jnp.maximum(a, part_m(s)), jnp.full((bm,), -jnp.inf, jnp.float32))
        den = lax.fori_loop(0, splits, lambda s, d: d + masked_load(sum_ref.at[s, pl.ds(row0, bm), h], row_ok1)
                            * jnp.exp(part_m(s) - mx), jnp.zeros((bm,), jnp.float32))
        has = (den > 0)[:, None]
        den = jnp.where(den > 0, den, 1.0)[:, None]

    def load_x(k0):
        """The ``[bm, 128]`` input tile at latent / nope column ``k0``, in the compute dtype."""
        if splits is None:
            return masked_load(x_ref.at[pl.ds(row0, bm), pl.ds(h * x_head + k0, QBLOCK)], row_ok).astype(cdt)

        def add(s, num):
            a = masked_load(acc_ref.at[s, pl.ds(row0, bm), pl.ds(h * lat + k0, QBLOCK)], row_ok)
            return num + a * jnp.exp(part_m(s) - mx)[:, None]

        num = lax.fori_loop(0, splits, add, jnp.zeros((bm, QBLOCK), jnp.float32))
        return jnp.where(has, num / den, 0.0).astype(cdt)   # o_lat.astype(dtype), as the reference

    def block(kb, acc):
        """Adds the product over the k-th 128-wide block of the contracted dim."""
        k0 = pl.multiple_of(kb * QBLOCK, QBLOCK)
        x = load_x(k0)
        if part == "k":   # W_UK rows = contracted (n), columns = output (l)
            w = plgpu_triton.load(wq_ref.at[layer, pl.ds(head_row0 + k0, QBLOCK), pl.ds(j * QBLOCK, QBLOCK)])
            s = ws_ref[layer, head_row0 // QBLOCK + kb, j]
            return acc + _dot(x, w.astype(cdt), False, precision) * s
        # W_UV rows = output (a), columns = contracted (l)
        w = plgpu_triton.load(wq_ref.at[layer, pl.ds(head_row0 + nope + j * QBLOCK, QBLOCK), pl.ds(k0, QBLOCK)])
        s = ws_ref[layer, (head_row0 + nope) // QBLOCK + j, kb]
        return acc + _dot(x, w.astype(cdt), True, precision) * s

    acc = lax.fori_loop(0, width_in // QBLOCK, block, jnp.zeros((bm, QBLOCK), jnp.float32))
    out = o_ref.at[pl.ds(row0, bm), pl.ds(h * width_out + j * QBLOCK, QBLOCK)]
    val = acc.astype(o_ref.dtype)
    if row_ok is None:
        plgpu_triton.store(out, val)
    else:
        plgpu_triton.store(out, val, mask=row_ok)


# ---------------------------------------------------------------------------------------------------
# TPU kernel (Mosaic TPU)
# ---------------------------------------------------------------------------------------------------


def _tpu_absorb_kernel(lay_ref, s_ref, x_ref, w_ref, o_ref, *acc, part, nope, v_dim, lat, cdt):
    """``part="k"``: grid (row tile, head, 128-row block of W_UK) accumulating ``[bm, L]``;
    ``part="v"``: grid (row tile, head, 128-row block of W_UV), one ``[bm, 128]`` output block.
    ``s_ref``: this layer's block scales (SMEM), ``x_ref`` ``[bm, 128]`` / ``[bm, L]``, ``w_ref``
    ``[128, L]`` e4m3."""
    h, r = pl.program_id(1), pl.program_id(2)
    srow = (h * (nope + v_dim) + (0 if part == "k" else nope)) // QBLOCK + r
    precision = lax.Precision.HIGHEST if jnp.dtype(cdt) == jnp.float32 else None
    x = x_ref[...].astype(cdt)
    if part == "k":
        (acc_ref,) = acc

        @pl.when(r == 0)
        def _init():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        for c in range(lat // QBLOCK):  # static lane-aligned 128-column blocks, each its scale
            w = w_ref[:, c * QBLOCK:(c + 1) * QBLOCK].astype(cdt)
            acc_ref[:, c * QBLOCK:(c + 1) * QBLOCK] += _dot(x, w, False, precision) * s_ref[srow, c]

        @pl.when(r == pl.num_programs(2) - 1)
        def _store():
            o_ref[...] = acc_ref[...].astype(o_ref.dtype)
        return
    out = jnp.zeros(o_ref.shape, jnp.float32)
    for c in range(lat // QBLOCK):
        w = w_ref[:, c * QBLOCK:(c + 1) * QBLOCK].astype(cdt)
        out = out + _dot(x[:, c * QBLOCK:(c + 1) * QBLOCK], w, True, precision) * s_ref[srow, c]
    o_ref[...] = out.astype(o_ref.dtype)


def _tpu_absorb_heads_kernel(lay_ref, s_ref, x_ref, w_ref, o_ref, *, part, g_heads, head_blocks, nope, lat, cdt):
    """``G`` heads per grid step, for heads whose W_UK and W_UV are one 128-row block each (N = A =
    128): grid (row tile, head group); ``x_ref`` ``[bm, G * 128]`` (``part="k"``) or ``[bm, G * L]``,
    ``w_ref`` ``[G, 128, L]`` e4m3 (each head's W_UK or W_UV), ``o_ref`` ``[bm, G * L]`` or
    ``[bm, G * 128]``."""
    hg = pl.program_id(1)
    precision = lax.Precision.HIGHEST if jnp.dtype(cdt) == jnp.float32 else None
    x = x_ref[...].astype(cdt)
    nb = lat // QBLOCK
    for g in range(g_heads):
        srow = (hg * g_heads + g) * head_blocks + (0 if part == "k" else nope // QBLOCK)
        w_g = w_ref[g]                                   # [128, L]
        if part == "k":
            xg = x[:, g * QBLOCK:(g + 1) * QBLOCK]
            for c in range(nb):
                w = w_g[:, c * QBLOCK:(c + 1) * QBLOCK].astype(cdt)
                col = (g * nb + c) * QBLOCK
                o_ref[:, col:col + QBLOCK] = (_dot(xg, w, False, precision) * s_ref[srow, c]).astype(o_ref.dtype)
        else:
            out = jnp.zeros((x.shape[0], QBLOCK), jnp.float32)
            for c in range(nb):
                w = w_g[:, c * QBLOCK:(c + 1) * QBLOCK].astype(cdt)
                xc = x[:, (g * nb + c) * QBLOCK:(g * nb + c + 1) * QBLOCK]
                out = out + _dot(xc, w, True, precision) * s_ref[srow, c]
            o_ref[:, g * QBLOCK:(g + 1) * QBLOCK] = out.astype(o_ref.dtype)


#: heads per grid step of the TPU kernel where a head's W_UK / W_UV is one 128-row block
#: (DeepSeek-V3): 16 heads read 1 MiB of e4m3 per step instead of one head's 64 KiB
TPU_HEADS_PER_STEP = 16


def mla_absorb_tpu(x_MHI, wq, ws, *, part: str, nope: int, layer=None, out_dtype=None, dtype=None,
                   interpret: bool = False, block_m: int = 256, heads_per_step: int = TPU_HEADS_PER_STEP) -> jax.Array:
    """The TPU kernel (arguments as :func:`mla_absorb_ref`): the weight of a layer stack read in
    place in ``[128, L]`` row blocks (block index from a scalar-prefetched layer), that layer's
    block scales scalar-prefetched to SMEM, rows padded to a multiple of 16. A :class:`SplitT`
    ``x`` is merged and cast to ``dtype`` in XLA first."""
    from jax.experimental.pallas import tpu as pltpu

    x_like, parts, cdt = _unpack(x_MHI, part, dtype)
    _check(x_like, wq, ws, part, nope, layer)
    if parts is not None:
        x_MHI = _merged(x_MHI, parts, cdt)
    if part == "k":   # the query's first N columns per head (XLA's TPU compiler fuses the slice)
        x_MHI = x_MHI[..., :nope]
    if layer is None:
        wq = wq[None]
    else:
        ws = lax.dynamic_index_in_dim(ws, layer, 0, False)
    lay = jnp.reshape(jnp.asarray(0 if layer is None else layer, jnp.int32), (1,))
    lead, h, width_in, lat, v_dim, m, width_out = _geometry(x_MHI, wq, part, nope)
    out_dtype = out_dtype or cdt
    if m == 0:
        return jnp.zeros((*lead, h, width_out), out_dtype)
    bm = min(block_m, -(-m // 16) * 16)
    mp = -(-m // bm) * bm
    x2 = x_MHI.reshape(m, h * width_in)
    if mp != m:
        x2 = jnp.pad(x2, [(0, mp - m), (0, 0)])
    head_blocks = (nope + v_dim) // QBLOCK
    g_heads = math.gcd(h, max(1, heads_per_step))
    if (nope if part == "k" else v_dim) == QBLOCK and g_heads > 1:
        # G heads per step: the weight viewed [layers, H, head blocks, 128, L] (a free reshape),
        # one step reads G heads' W_UK (block 0) or W_UV (block nope / 128)
        w5 = wq.reshape(wq.shape[0], h, head_blocks, QBLOCK, lat)
        blk = 0 if part == "k" else nope // QBLOCK
        x_w = QBLOCK if part == "k" else lat
        o_w = lat if part == "k" else QBLOCK
        kernel = functools.partial(_tpu_absorb_heads_kernel, part=part, g_heads=g_heads, head_blocks=head_blocks,
                                   nope=nope, lat=lat, cdt=cdt)
        y = pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct((mp, h * width_out), out_dtype),
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=2, grid=(mp // bm, h // g_heads),
                in_specs=[pl.BlockSpec((bm, g_heads * x_w), lambda i, hg, lay, s: (i, hg)),
                          pl.BlockSpec((None, g_heads, None, QBLOCK, lat),
                                       lambda i, hg, lay, s: (lay[0], hg, blk, 0, 0))],
                out_specs=pl.BlockSpec((bm, g_heads * o_w), lambda i, hg, lay, s: (i, hg))),
            compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
            interpret=backend.tpu_interpret_arg(interpret),
            name=f"mla_absorb_{part}_tpu",
        )(lay, ws.astype(jnp.float32), x2, w5)
        return y[:m].reshape(*lead, h, width_out)
    if part == "k":
        nr = nope // QBLOCK
        in_specs = [pl.BlockSpec((bm, QBLOCK), lambda i, hh, r, lay, s: (i, hh * nr + r)),
                    pl.BlockSpec((None, QBLOCK, lat), lambda i, hh, r, lay, s: (lay[0], hh * head_blocks + r, 0))]
        out_spec = pl.BlockSpec((bm, lat), lambda i, hh, r, lay, s: (i, hh))
        scratch = [pltpu.VMEM((bm, lat), jnp.float32)]
        sem = ("parallel", "parallel", "arbitrary")
    else:
        nr = v_dim // QBLOCK
        in_specs = [pl.BlockSpec((bm, lat), lambda i, hh, r, lay, s: (i, hh)),
                    pl.BlockSpec((None, QBLOCK, lat),
                                 lambda i, hh, r, lay, s: (lay[0], hh * head_blocks + nope // QBLOCK + r, 0))]
        out_spec = pl.BlockSpec((bm, QBLOCK), lambda i, hh, r, lay, s: (i, hh * nr + r))
        scratch = []
        sem = ("parallel", "parallel", "parallel")
    kernel = functools.partial(_tpu_absorb_kernel, part=part, nope=nope, v_dim=v_dim, lat=lat, cdt=cdt)
    y = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((mp, h * width_out), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(mp // bm, h, nr), in_specs=in_specs, out_specs=out_spec,
            scratch_shapes=scratch),
        compiler_params=pltpu.CompilerParams(dimension_semantics=sem),
        interpret=backend.tpu_interpret_arg(interpret),
        name=f"mla_absorb_{part}_tpu",
    )(lay, ws.astype(jnp.float32), x2, wq)
    return y[:m].reshape(*lead, h, width_out)


def kernel_takes(x_MHI, wq, ws, nope: int) -> bool:
    """Whether the GPU kernel computes this product (FP8 weight, 128-multiple widths); ``x_MHI``'s
    dtype is the compute dtype (an array or a ``ShapeDtypeStruct``)."""
    rows, lat = wq.shape[-2:]
    v_dim = rows // x_MHI.shape[-2] - nope
    return (ws is not None and is_fp8(wq.dtype) and x_MHI.dtype in (jnp.bfloat16, jnp.float32)
            and nope % QBLOCK == 0 and v_dim % QBLOCK == 0 and lat % QBLOCK == 0)


def mla_absorb_gpu(x_MHI, wq, ws, *, part: str, nope: int, layer=None, out_dtype=None, dtype=None,
                   interpret: bool = False, num_warps: int = 4, num_stages: int = 3) -> jax.Array:
    """The GPU kernel (see module doc); arguments as :func:`mla_absorb_ref`. A :class:`SplitT`
    ``x`` is merged in the kernel's prologue (its ``S`` chunks need not be a power of two)."""
    x_like, parts, cdt = _unpack(x_MHI, part, dtype)
    _check(x_like, wq, ws, part, nope, layer)
    if layer is None:
        wq, ws = wq[None], ws[None]
    l_1 = jnp.reshape(jnp.asarray(0 if layer is None else layer, jnp.int32), (1,))
    lead, h, width_in, lat, v_dim, m, width_out = _geometry(x_like, wq, part, nope)
    out_dtype = out_dtype or cdt
    if m == 0:
        return jnp.zeros((*lead, h, width_out), out_dtype)
    bm = min(64, max(16, next_pow2(m)))
    if parts is None:
        splits, xs = None, (x_MHI.reshape(m, h * width_in),)
    else:
        splits = parts.acc.shape[0]
        xs = (parts.acc.reshape(splits, m, h * lat), parts.m.reshape(splits, m, h), parts.l.reshape(splits, m, h))
    kernel = functools.partial(_gpu_absorb_kernel, part=part, m=m, bm=bm, nope=nope, v_dim=v_dim, lat=lat,
                               cdt=cdt, splits=splits, x_head=width_in)
    y = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, h * width_out), out_dtype),
        grid=(h, width_out // QBLOCK, cdiv(m, bm)),
        compiler_params=plgpu_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"mla_absorb_{part}_gpu",
    )(l_1, *xs, wq, ws)
    return y.reshape(*lead, h, width_out)


def mla_absorb(x_MHI, wq, ws, *, part: str, nope: int, layer=None, out_dtype=None, dtype=None,
               impl: str = "auto") -> jax.Array:
    """``q_nope → q_lat`` (``part="k"``) or ``o_lat → o`` (``part="v"``; ``x`` an array or the
    split-T partials of ``o_lat``, a :class:`SplitT`) through ``kv_b_proj``'s weight ``wq`` (e4m3
    with block scales ``ws``, or unquantized with ``ws=None``), computed in ``dtype``, see the
    module doc; ``impl`` as in :mod:`kernels_pallas.backend` (unsupported shapes: the reference)."""
    target, interpret = backend.split_impl(impl)
    x_like, _, cdt = _unpack(x_MHI, part, dtype)
    if target != "ref" and kernel_takes(jax.ShapeDtypeStruct(tuple(x_like.shape), cdt), wq, ws, nope):
        fn = mla_absorb_gpu if target == "gpu" else mla_absorb_tpu
        return fn(x_MHI, wq, ws, part=part, nope=nope, layer=layer, out_dtype=out_dtype, dtype=dtype,
                  interpret=interpret)
    return mla_absorb_ref(x_MHI, wq, ws, part=part, nope=nope, layer=layer, out_dtype=out_dtype, dtype=dtype)
