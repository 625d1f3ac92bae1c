"""MLA absorbed decode attention for Hopper on Mosaic GPU (``wgmma`` + TMA).

Same semantics as :func:`kernels_pallas.mla_decode.mla_decode_ref` (see that module): per sequence
``b`` and head ``h``, ``s[t] = (q_lat·c[t] + q_pe·k_pe[t]) * scale`` for ``t < lengths[b]``,
float32 softmax, ``o = Σ_t p[t] c[t]`` (float32 ``[B, H, L]``; ``lengths[b] == 0`` gives zeros).
It is meant to replace the Triton-lowered kernel of :mod:`kernels_pallas.mla_decode` on Hopper,
which reaches 0.96 TB/s of cache read at B=64, H=128, T=4096. At that shape the work is
compute-bound (~242 MMA FLOP per cache byte), so the design does the minimal number of MMA FLOPs
and keeps the tensor cores fed from shared memory.

Work split: one CTA per (sequence, 64-head block) and three warpgroups.

* **Memory warpgroup** (``wg == 2``, 40 registers): TMA-loads the CTA's query tile
  (``q_lat [64, L]`` and ``q_pe [64, R]``, shared memory, once) and streams the sequence's cache
  in ``block_t``-token blocks through ``stages`` shared-memory slots (``c [block_t, L]`` and
  ``k_pe [block_t, R]`` per slot, 128-byte swizzle). Its loop runs ``cdiv(lengths[b], block_t)``
  steps: blocks past the length are never loaded or computed.
* **Two compute warpgroups** (``wg`` 0 and 1, 232 registers): the float32 output accumulator
  ``[64, L]`` does not fit one warpgroup's registers, so warpgroup ``w`` owns output columns
  ``[w*L/2, (w+1)*L/2)`` (``[64, 256]`` float32 = 128 registers a thread at L=512). Both need
  the same probabilities ``P [64, block_t]``. Rather than both computing the whole
  ``S = Q Kᵀ`` (1.5x the minimal MMA FLOPs), the *tokens* of a block are split: warpgroup ``w``
  scores tokens ``[w*bt/2, (w+1)*bt/2)`` over the full ``L + R`` contraction (``wgmma`` M=64,
  N=bt/2, K=L+R; the cache tile fed transposed). Per block step, per warpgroup:

  1. ``S_w = Q K_wᵀ * scale``; tokens ``>= lengths[b]`` set to ``-inf``; row max of ``S_w``
     written to shared memory; barrier ``X`` (both warpgroups);
  2. the new running max from both halves (both warpgroups hold the same one), rescale factor,
     ``P_w = exp(S_w - m)`` (float32 row sums kept per warpgroup), ``P_w`` (bf16) written to its
     half of the shared ``[64, bt]`` tile; barrier ``Y``;
  3. ``acc_w = acc_w * alpha + P @ c[:, its L/2 columns]`` (``wgmma`` M=64, N=L/2, K=bt, P read
     back into registers as the A operand), then the slot is released to the memory warpgroup.

  Total MMA work per block: ``64 x bt x (L + R)`` for the scores plus ``64 x bt x L`` for the
  output, i.e. exactly the minimal FLOPs, split evenly; the exponentials are not duplicated
  either. The exchange buffers are single: the barrier ``X`` of step ``j+1`` cannot pass before
  the other warpgroup finished step ``j``'s P@V (which reads the P tile), and barrier ``Y`` of
  step ``j`` cannot pass before the other warpgroup read step ``j``'s row max.
  At the end the two per-warpgroup row sums are exchanged the same way and each warpgroup
  writes its ``[64, L/2]`` float32 output straight from registers to global memory (there is no
  shared memory left for a TMA store; the output is 1/18 of the cache bytes at L=512).

Why not the other options: splitting the *contraction* (each warpgroup half of the 576
columns) needs 9 swizzle tiles split 5:4 and a ``[64, bt]`` float32 exchange per warpgroup
(32 KB at bt=64, over the shared-memory budget); exchanging the float32 score halves instead of
the row max and bf16 P needs 16 KB (5 KB over) and doubles the exponentials; a "one warpgroup
scores, the other only multiplies" ping-pong leaves the MMA work unbalanced. P goes through an
unswizzled shared tile and registers because each warpgroup writes half of a 64-column swizzle
tile, which Mosaic rejects for swizzled buffers ("Expected slice start (0) and slice size (32) to
be divisible by the tile size (64)"), and ``wgmma`` takes one swizzle for both operands (the
cache slots need the 128-byte one), so a shared-memory A operand of two 32-wide halves is out.

Speed notes (not measured; the things a GPU run should look at):

* within a compute warpgroup nothing overlaps: scores ``wgmma`` → softmax → barriers → P@V
  ``wgmma`` (each waited for); the two warpgroups move in lockstep through the barriers, so the
  tensor cores idle during the softmax and barrier phases. The next step's score ``wgmma`` could
  be issued before waiting for this step's P@V (as FlashAttention-3 does), which needs the
  accumulator to stay an ``ACC`` reference across steps;
* the score ``wgmma`` has N = block_t/2 = 32 (36 k16 instructions for a 64x32 tile), the
  narrowest part of the MMA work;
* register pressure: 128 accumulator registers plus P, S and the masks within 232; the
  last-block zeroing (``[64, 64]`` tiles with an int32 row iota) is the peak; check for spills
  in the PTX compile;
* the grid is one CTA per (sequence, head block), not persistent: 128 CTAs at B=64, H=128 on
  132 SMs; at small B (e.g. 1: 2 CTAs) most SMs idle, where the Triton kernel's split-T path
  is the better choice.

Shared memory at L=512, R=64, bt=64, 2 stages (every allocation is 1 KB-aligned): Q 72 KB,
cache slots 2 x 72 KB, P tile 8 KB, row max/sum exchange 1 KB, barriers: 230,456 of the
232,448 bytes (227 KB) a block may use. There is no room for a third stage or a bigger block;
``reduction_scratch_bytes=0`` (all reductions are along the rows of the ``wgmma`` layout, which
need no shared memory) frees the 2 KB Mosaic reserves for cross-warp reductions by default.

Masking: scores of tokens ``t >= lengths[b]`` are replaced (``where``, so NaN-safe) by ``-inf``
before the max; in the last, partial block each compute warpgroup also zeroes the cache rows
``t >= lengths[b]`` of its own column half in shared memory before its P@V, so that garbage
there, even NaN/inf, cannot reach the output (``0 x NaN``). Rows past the end of the cache
(``S`` not a multiple of ``block_t``) come in as zeros from TMA (its out-of-bounds fill,
``OOBFillMode.ZEROS``; the window start is always traced, as a static window past ``S`` fails
JAX's trace-time bounds check).

``layer=``: the ``[NL, B, S, C]`` stack is viewed as ``[NL*B, S, C]`` (a free reshape) and the
CTA reads row ``layer*B + b`` in place; lengths and that row index reach the kernel as a small
``[B, 4]`` int32 table read with scalar loads from global memory.

Interpreter: JAX's Mosaic GPU interpreter (``interpret=True``) runs the whole kernel (all three
warpgroups, barriers, TMA, ``wgmma``) except two things it does not implement: accumulating
into an existing register accumulator (``pl.run_state`` with ``plgpu.ACC.init``, the in-place
``acc += P @ V``) and a ``wgmma`` A operand in registers. In interpret mode the P@V product goes
into a fresh accumulator that is added to ``acc`` (same arithmetic, more registers) and reads P
from shared memory; compiled, it accumulates in place with P loaded into registers (both as in
JAX's FlashAttention-3 example, ``ops/gpu/attention_mgpu.py``).

Shapes (:func:`supported`): bf16; H a multiple of 64; L a multiple of 128 up to 512 (each
compute warpgroup's L/2 output columns are one ``wgmma`` N <= 256); R a multiple of 64; the
cache length S a multiple of 8 (TMA views the cache in 8-row tiles) and at least ``block_t``.

Status: matches the reference in the interpreter on CPU and lowers for CUDA on CPU
(``jax.export``: Mosaic layout inference, TMA and shared-memory checks) at B=64, H=128, L=512,
R=64, S=4096 (``tests/test_mla_mgpu.py``). Not yet compiled to PTX or timed on a GPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas._common import mgpu_zeros, plgpu_module
from kernels_pallas.mla_decode import _check

__all__ = ["MlaMgpuConfig", "supported", "smem_bytes", "mla_decode_mgpu"]

_NEG = -1e30       # finite "minus infinity" for the initial running max (avoids inf - inf)
_SMEM_LIMIT = 227 * 1024  # shared memory a Hopper block may opt into
_SMEM_ALIGN = 1024  # Mosaic GPU aligns every scoped allocation to 1 KB
_TILE = 64          # bf16 elements per 128-byte swizzle row: the tile width of every smem operand


@dataclasses.dataclass(frozen=True)
class MlaMgpuConfig:
    block_h: int = 64            # heads per CTA: one wgmma M (fixed at 64)
    block_t: int = 64            # tokens per pipeline step (a multiple of 64: the K of the P@V wgmma
    #                              under the 128-byte swizzle); each compute warpgroup scores half
    stages: int = 2              # cache slots in shared memory (2 x 72 KB at L+R=576 with the 72 KB
    #                              query tile: all the shared memory there is)
    compute_registers: int = 232  # per thread, each of the two compute warpgroups
    memory_registers: int = 40    # per thread, the TMA warpgroup (2*128*232 + 128*40 <= 65536)


def _align(n: int) -> int:
    return -(-n // _SMEM_ALIGN) * _SMEM_ALIGN


def smem_bytes(l: int, r: int, cfg: MlaMgpuConfig = MlaMgpuConfig(), itemsize: int = 2) -> int:
    """Shared memory the kernel allocates (as Mosaic GPU counts it: 1 KB-aligned buffers, 8 bytes
    per barrier)."""
    bh, bt = cfg.block_h, cfg.block_t
    bufs = [bh * l * itemsize, bh * r * itemsize, cfg.stages * bt * l * itemsize,
            cfg.stages * bt * r * itemsize, bh * bt * itemsize, 2 * 2 * bh * 4]
    barriers = 1 + 2 * cfg.stages + 2
    return sum(_align(b) for b in bufs) + 8 * barriers


def supported(b: int, h: int, l: int, r: int, s: int, dtype, cfg: MlaMgpuConfig = MlaMgpuConfig()) -> bool:
    """Shapes the kernel tiles: bf16; ``h`` a multiple of 64; ``l`` a multiple of 128 with
    ``l/2 <= 256`` (each compute warpgroup's output columns are one wgmma N); ``r`` a multiple of
    64; the cache length ``s`` a multiple of 8 (TMA views the cache in 8-row tiles) and at least
    ``block_t`` (a multiple of 64); everything within the shared memory of one block."""
    return (jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16) and b > 0 and s >= cfg.block_t and s % 8 == 0
            and cfg.block_h == 64
            and h > 0 and h % cfg.block_h == 0 and l > 0 and l % (2 * _TILE) == 0 and l // 2 <= 256
            and r > 0 and r % _TILE == 0 and cfg.block_t > 0 and cfg.block_t % _TILE == 0
            and cfg.stages >= 1 and smem_bytes(l, r, cfg) <= _SMEM_LIMIT)


def _mma_into(acc, a_ref, b_ref, interpret: bool):
    """``acc + a_ref @ b_ref`` with ``wgmma`` (waited for). Compiled: in place in the register
    accumulator, A loaded into registers. Interpreted: the interpreter has neither in-place
    accumulation nor register A operands, so a fresh accumulator is added (see the module doc)."""
    plgpu = plgpu_module()
    if interpret:
        def fresh(acc_ref):
            plgpu.wgmma(acc_ref, a_ref, b_ref)
            return acc_ref[...]
        return acc + pl.run_scoped(fresh, plgpu.ACC(acc.shape, jnp.float32))
    a = plgpu.load(a_ref, layout=plgpu.Layout.WGMMA)

    def accumulate(acc_ref):
        plgpu.wgmma(acc_ref, a, b_ref)
    return pl.run_state(accumulate)(plgpu.ACC.init(acc))   # awaits the wgmma


def mla_decode_mgpu(q_lat_BHL, q_pe_BHR, cache, lengths_B, *, scale: float, kv_lora_rank: int, layer=None,
                    cfg: MlaMgpuConfig = MlaMgpuConfig(), interpret=False) -> jax.Array:
    """MLA absorbed decode attention (see the module doc) → ``o_BHL`` float32. ``cache``:
    ``[B, S, L+R]``, or with ``layer`` (int or traced int32) a ``[NL, B, S, L+R]`` stack whose
    layer ``layer`` is read in place. ``interpret``: JAX's Mosaic GPU interpreter (CPU); ``True`` or
    a ``plgpu.InterpretGPUParams`` (e.g. with ``detect_races=True``)."""
    plgpu = plgpu_module()
    if layer is not None:
        if cache.ndim != 4:
            raise ValueError(f"with layer=, the cache must be [NL, B, S, C], got {cache.shape}")
        _check(q_lat_BHL, q_pe_BHR, cache[0], lengths_B, kv_lora_rank)
    else:
        _check(q_lat_BHL, q_pe_BHR, cache, lengths_B, kv_lora_rank)
    bsz, h, l = q_lat_BHL.shape
    r = q_pe_BHR.shape[2]
    s_len = cache.shape[-2]
    dt = cache.dtype
    if not supported(bsz, h, l, r, s_len, dt, cfg) or q_lat_BHL.dtype != dt or q_pe_BHR.dtype != dt:
        raise ValueError(f"mla_decode_mgpu: unsupported shape B={bsz} H={h} L={l} R={r} S={s_len} "
                         f"q {jnp.dtype(q_lat_BHL.dtype).name}/{jnp.dtype(q_pe_BHR.dtype).name} cache "
                         f"{jnp.dtype(dt).name} (bf16, H % 64, L % 128 and <= 512, R % 64, block_t % 64, "
                         f"S % 8 and >= block_t, {_SMEM_LIMIT} bytes of shared memory) for {cfg}")
    nl = 1 if layer is None else cache.shape[0]
    cache_g = cache.reshape(nl * bsz, s_len, l + r)   # contiguous: a view, no copy of the stack
    lay = jnp.asarray(0 if layer is None else layer, jnp.int32)
    lens = lengths_B.astype(jnp.int32)
    zeros = jnp.zeros_like(lens)
    meta = jnp.stack([lens, lay * bsz + jnp.arange(bsz, dtype=jnp.int32), zeros, zeros], axis=1)  # [B, 4]

    bh, bt, st = cfg.block_h, cfg.block_t, cfg.stages
    hb = bt // 2            # tokens scored by each compute warpgroup per step
    lh = l // 2             # output columns of each compute warpgroup
    nhb = h // bh
    f32 = jnp.float32

    def swizzled():
        return (plgpu.TilingTransform((8, _TILE)), plgpu.SwizzleTransform(128))

    def body(ql_g, qp_g, c_g, meta_g, o_g):
        pl.run_scoped(
            functools.partial(kernel, ql_g, qp_g, c_g, meta_g, o_g),
            ql_s=plgpu.SMEM((bh, l), dt, transforms=swizzled()),
            qp_s=plgpu.SMEM((bh, r), dt, transforms=swizzled()),
            c_s=plgpu.SMEM((st, bt, l), dt, transforms=swizzled()),
            kp_s=plgpu.SMEM((st, bt, r), dt, transforms=swizzled()),
            p_x=plgpu.SMEM((bh, bt), dt),             # P of both halves (read back into registers)
            x_s=plgpu.SMEM((2, 2, bh), f32),          # [max | sum, warpgroup, head] exchange
            q_bar=plgpu.Barrier(num_arrivals=2),
            loaded=plgpu.Barrier(num_arrivals=2, num_barriers=st),
            consumed=plgpu.Barrier(num_arrivals=2, num_barriers=st),
            xbar=plgpu.Barrier(num_arrivals=2),
            ybar=plgpu.Barrier(num_arrivals=2),
            collective_axes="wg",
        )

    def kernel(ql_g, qp_g, c_g, meta_g, o_g, *, ql_s, qp_s, c_s, kp_s, p_x, x_s, q_bar, loaded, consumed,
               xbar, ybar):
        wg = lax.axis_index("wg")
        item = lax.axis_index("item")
        bi = item // nhb
        h0 = (item % nhb) * bh
        n = meta_g[bi, 0]                 # this sequence's length
        nblk = (n + bt - 1) // bt         # cache blocks holding tokens: the only ones read

        def load_block(j, row, slot):
            # one cache block: tokens [j*bt, (j+1)*bt) into a slot. j is always traced: a window
            # running past the end of the cache (S % bt != 0) is legal for TMA (rows past S are
            # zero-filled) but a static one fails JAX's trace-time bounds check
            toks = pl.ds(j * bt, bt)
            zeros_past_s = plgpu.OOBFillMode.ZEROS
            plgpu.copy_gmem_to_smem(c_g.at[row, toks, pl.ds(0, l)], c_s.at[slot], loaded.at[slot],
                                    oob_mode=zeros_past_s)
            plgpu.copy_gmem_to_smem(c_g.at[row, toks, pl.ds(l, r)], kp_s.at[slot], loaded.at[slot],
                                    oob_mode=zeros_past_s)

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(cfg.memory_registers, action="decrease")
            row = meta_g[bi, 1]
            plgpu.copy_gmem_to_smem(ql_g.at[bi, pl.ds(h0, bh)], ql_s, q_bar)
            plgpu.copy_gmem_to_smem(qp_g.at[bi, pl.ds(h0, bh)], qp_s, q_bar)

            @pl.loop(0, jnp.minimum(nblk, st))
            def _(j):   # fill the slots
                load_block(j, row, j)

            @pl.loop(st, nblk)
            def _(j):
                slot = j % st
                plgpu.barrier_wait(consumed.at[slot])   # both compute warpgroups are done with j - st
                load_block(j, row, slot)

            @pl.loop(jnp.maximum(nblk - st, 0), nblk)
            def _(j):  # observe the last release of each slot (all barrier phases are waited for)
                plgpu.barrier_wait(consumed.at[j % st])

        def compute(w: int):  # compute warpgroup w (static: all offsets below are static)
            plgpu.set_max_registers(cfg.compute_registers, action="increase")
            own = pl.ds(w * hb, hb)       # the block's tokens this warpgroup scores
            cols = pl.ds(w * lh, lh)      # the output columns it owns
            plgpu.barrier_wait(q_bar)

            def step(j, carry):
                m, lsum, acc = carry
                slot = j % st
                plgpu.barrier_wait(loaded.at[slot])

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, ql_s, c_s.at[slot, own].transpose((1, 0)))
                    plgpu.wgmma(acc_ref, qp_s, kp_s.at[slot, own].transpose((1, 0)))
                    return acc_ref[...]

                s = pl.run_scoped(qk, plgpu.ACC((bh, hb), f32)) * scale               # [64, bt/2]
                tok = plgpu.broadcasted_iota(jnp.int32, (bh, hb), 1, layout=plgpu.Layout.WGMMA)
                s = jnp.where(tok + (j * bt + w * hb) < n, s, -jnp.inf)
                m_own = jnp.max(s, axis=1)
                x_s[0, w] = m_own
                plgpu.barrier_arrive(xbar)
                plgpu.barrier_wait(xbar)
                # every processed block holds a valid token, so m_new is finite
                m_new = jnp.maximum(m, jnp.maximum(m_own, x_s[0, 1 - w]))
                alpha = jnp.exp(m - m_new)
                p = jnp.exp(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
                lsum = lsum * alpha + jnp.sum(p, axis=1)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                p_x[:, own] = p.astype(dt)

                @pl.when((j + 1) * bt > n)
                def _zero_tail():  # rows past the length may hold anything: zero them (our columns)
                    for c0 in range(0, lh, _TILE):
                        blk = c_s.at[slot, :, pl.ds(w * lh + c0, _TILE)]
                        t_row = plgpu.broadcasted_iota(jnp.int32, (bt, _TILE), 0, layout=plgpu.Layout.WGMMA)
                        blk[...] = jnp.where(t_row + j * bt < n, blk[...], jnp.zeros((), dt))
                    plgpu.commit_smem()   # generic-proxy writes before the wgmma reads them

                plgpu.barrier_arrive(ybar)
                plgpu.barrier_wait(ybar)
                acc = _mma_into(acc, p_x, c_s.at[slot, :, cols], bool(interpret))
                plgpu.barrier_arrive(consumed.at[slot])
                return m_new, lsum, acc

            row_layout = plgpu.Layout.WGMMA.reduce(1)
            init = (plgpu.layout_cast(jnp.full((bh,), _NEG, f32), row_layout),
                    plgpu.layout_cast(jnp.zeros((bh,), f32), row_layout),
                    mgpu_zeros((bh, lh)))
            _, lsum, acc = lax.fori_loop(0, nblk, step, init)
            x_s[1, w] = lsum
            plgpu.barrier_arrive(xbar)
            plgpu.barrier_wait(xbar)
            tot = lsum + x_s[1, 1 - w]
            inv = jnp.where(tot > 0, 1.0 / jnp.where(tot > 0, tot, 1.0), 0.0)   # length 0 → zeros
            o_g[bi, pl.ds(h0, bh), cols] = acc * lax.broadcast_in_dim(inv, acc.shape, [0])

        for w in range(2):
            pl.when(wg == w)(functools.partial(compute, w))

    kernel_fn = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((bsz, h, l), f32),
        grid=(bsz * nhb,),
        grid_names=("item",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup,
                                             reduction_scratch_bytes=0),
        interpret=(plgpu.InterpretGPUParams() if interpret is True else interpret) if interpret else False,
    )
    return kernel_fn(q_lat_BHL, q_pe_BHR, cache_g, meta)
