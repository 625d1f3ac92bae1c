"""DeepSeekMoE: the exact ``noaux_tc`` router, sorted dispatch, grouped expert GEMMs (SPEC §5).

Router, per token (float32 throughout):
  1. ``s = sigmoid(x Wᵀ)``; 2. ``sb = s + bias`` (the bias steers selection only);
  3. group score = sum of the top 2 ``sb`` of each of ``n_group`` groups of consecutive experts;
  4. keep the ``topk_group`` best groups, the other experts get -inf (not 0: biases can be negative);
  5. top-``num_experts_per_tok`` experts by ``sb``; 6. weights from the unbiased ``s``, normalised
     if ``norm_topk_prob``, times ``routed_scaling_factor``.

Dispatch: the T*K (token, expert) assignments are sorted by expert, the rows gathered, three
grouped GEMMs run over contiguous expert groups, and each token's weighted results are summed
back (:func:`combine`: a scatter-add below 128 tokens, a gather from 128 on).
No token is ever dropped (no capacity factor). On the CPU reference backend, once the assignments
cover the experts, every expert runs on every token instead (three dense GEMMs, weighted).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

import kernels_pallas

from deepseek_jax import kernel_mesh
from deepseek_jax.config import DeepSeekConfig
from deepseek_jax.mla import _KERNEL_MAX_NEW  # the few-token (decode / verify) path's limit
from deepseek_jax.mlp import MLP
from deepseek_jax.quant import Linear, Precision, dequantize, einsum32, grouped_matmul, scan_layer_index
from deepseek_jax import expert_parallel


class RouterBias(nnx.Variable):
    """The aux-loss-free balancing bias: state moved by a sign rule, never by gradients."""


class Routing(NamedTuple):
    idx_TK: jax.Array      # chosen experts, int32
    weight_TK: jax.Array   # combine weights (float32), already x routed_scaling_factor
    scores_TE: jax.Array   # unbiased sigmoid scores (float32), for the balance loss


def route(logits_TE: jax.Array, bias_E: jax.Array, cfg: DeepSeekConfig, impl: str = "ref",
          placement: kernel_mesh.Placement | None = None, layer=None) -> Routing:
    """The noaux_tc selection of SPEC §5 on float32 router logits: ``kernels_pallas.moe_route``
    (one GPU kernel for what XLA ran as 8 launches; the jnp reference elsewhere), per shard of
    the tokens when ``placement`` is given (:func:`kernel_mesh.moe_route`). ``layer``: ``bias_E``
    is all scanned layers' ``[L, E]`` and this layer's is used (read in place)."""
    fn = kernels_pallas.moe_route
    if placement is not None and kernels_pallas.backend.split_impl(impl)[0] == "gpu":  # TPU: the reference
        fn = functools.partial(kernel_mesh.moe_route, fn, pl=placement)
    return Routing(*fn(logits_TE, bias_E, n_group=cfg.n_group, topk_group=cfg.topk_group,
                       top_k=cfg.num_experts_per_tok, norm_topk_prob=cfg.norm_topk_prob,
                       scaling=cfg.routed_scaling_factor, layer=layer, impl=impl))


class MoEStats(NamedTuple):
    """Per-layer routing statistics returned next to the output."""

    load_E: jax.Array       # tokens routed to each expert (float32 counts; pad tokens included)
    balance: jax.Array      # sequence-wise balance loss term sum_e f_e P_e, averaged over rows
    idx_BTK: jax.Array      # chosen experts per token
    weight_BTK: jax.Array   # their combine weights (float32, x routed_scaling_factor)
    scores_BTE: jax.Array   # unbiased sigmoid affinities of every expert (float32)


class Router(nnx.Module):
    def __init__(self, cfg: DeepSeekConfig, *, rngs: nnx.Rngs):
        E, D = cfg.n_routed_experts, cfg.hidden_size
        self.weight = nnx.Param((jax.random.normal(rngs.params(), (E, D)) / math.sqrt(D)).astype(jnp.bfloat16))
        self.e_score_correction_bias = RouterBias(jnp.zeros((E,), jnp.float32))

    def __call__(self, x_TD: jax.Array, cfg: DeepSeekConfig, impl: str = "ref",
                 placement: kernel_mesh.Placement | None = None) -> Routing:
        """``impl``: the kernels' choice (``Precision.kernels``); ``placement``: run the selection
        kernel per shard of the tokens (see :func:`route`)."""
        logits = jnp.dot(x_TD.astype(jnp.float32), self.weight[...].astype(jnp.float32).T,
                         precision=jax.lax.Precision.HIGHEST)
        bias = self.e_score_correction_bias[...]   # [L, E] with Precision.weights_in_place
        return route(logits, bias, cfg, impl, placement, scan_layer_index() if bias.ndim == 2 else None)


class Experts(nnx.Module):
    """The routed experts, stacked: ``gate_proj/up_proj [E, F, D]``, ``down_proj [E, D, F]``."""

    def __init__(self, cfg: DeepSeekConfig, *, prec: Precision, rngs: nnx.Rngs):
        E, D, F = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        kw = dict(fp8=cfg.fp8, prec=prec, rngs=rngs, stack=(E,))
        self.gate_proj = Linear(D, F, **kw)
        self.up_proj = Linear(D, F, **kw)
        self.down_proj = Linear(F, D, **kw)

    def arrays(self) -> tuple:
        """(weight, scale-or-None) of gate, up, down: what :func:`experts_apply` takes."""
        return tuple((lin.weight[...], lin.weight_scale_inv[...] if lin.fp8 else None)
                     for lin in (self.gate_proj, self.up_proj, self.down_proj))

    def __call__(self, x_MD: jax.Array, group_sizes_E: jax.Array) -> jax.Array:
        return experts_apply(self.arrays(), x_MD, group_sizes_E, self.gate_proj.prec)


def experts_apply(arrays: tuple, x_MD: jax.Array, group_sizes_E: jax.Array, prec: Precision,
                  expert_offset: jax.Array | None = None) -> jax.Array:
    """SwiGLU over rows sorted by expert, with (possibly local shards of) the stacked weights.

    ``expert_offset``: the weights are several layers' experts ``[L*E, ...]`` and this layer's
    start at that index (see ``Precision.weights_in_place``).
    Rows past ``sum(group_sizes)`` produce zeros (the grouped GEMM's contract)."""
    (wg, sg), (wu, su), (wd, sd) = arrays
    h = jax.nn.silu(grouped_matmul(wg, sg, x_MD, group_sizes_E, prec, expert_offset))
    h = h * grouped_matmul(wu, su, x_MD, group_sizes_E, prec, expert_offset)
    return grouped_matmul(wd, sd, h, group_sizes_E, prec, expert_offset)


class MoE(nnx.Module):
    def __init__(self, cfg: DeepSeekConfig, *, prec: Precision, rngs: nnx.Rngs):
        self.cfg, self.prec = cfg, prec
        self.gate = Router(cfg, rngs=rngs)
        self.experts = Experts(cfg, prec=prec, rngs=rngs)
        self.shared_experts = MLP(cfg.hidden_size, cfg.shared_intermediate_size, fp8=cfg.fp8, prec=prec,
                                  rngs=rngs) if cfg.n_shared_experts else None
        # Set by ``sharding.attach_mesh``: the mesh (static) for expert-parallel dispatch.
        self.mesh = None
        self.rules = None

    def in_shard_map(self) -> bool:
        """Whether the routed experts run in the expert-parallel ``shard_map``: experts split over
        the mesh, or the grouped GEMM kernel on any multi-device mesh (a Pallas call cannot be
        split by GSPMD: see :mod:`deepseek_jax.kernel_mesh`)."""
        if self.mesh is None:
            return False
        return expert_parallel.is_distributed(self.mesh) or (
            self.mesh.size > 1 and kernel_mesh.uses_kernel(self.prec.kernels))

    def __call__(self, x_BTD: jax.Array, layer_idx: jax.Array | None = None) -> tuple[jax.Array, MoEStats]:
        """``layer_idx``: set when the experts hold all scanned layers' weights ``[L*E, ...]``
        (``Precision.weights_in_place``); this layer's experts start at ``layer_idx * E``."""
        cfg, dtype = self.cfg, self.prec.dtype
        B, T, D = x_BTD.shape
        E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
        x_MD = x_BTD.reshape(B * T, D).astype(dtype)
        with jax.named_scope("router"):
            placement = (kernel_mesh.Placement(self.mesh, self.rules)
                         if self.mesh is not None and self.mesh.size > 1 else None)
            r = self.gate(x_MD, cfg, self.prec.kernels, placement)

        if self.in_shard_map():   # with ``layer_idx`` the experts are all layers' [L, E, ...]
            y_MD = expert_parallel.moe_apply(self.experts.arrays(), x_MD, r.idx_TK, r.weight_TK, self.prec,
                                             self.mesh, self.rules, n_experts=E, layer=layer_idx,
                                             decode=T <= _KERNEL_MAX_NEW)
        elif layer_idx is not None:
            y_MD = local_moe(self.experts.arrays(), x_MD, r.idx_TK, r.weight_TK, self.prec, E,
                             expert_offset=layer_idx * E, seq_len=T)
        else:
            y_MD = local_moe(self.experts.arrays(), x_MD, r.idx_TK, r.weight_TK, self.prec, E, seq_len=T)
        if self.shared_experts is not None:
            with jax.named_scope("shared_experts"):
                y_MD = y_MD + self.shared_experts(x_MD)
        return y_MD.reshape(B, T, D), _moe_stats(r, B, T, E, K)


def _moe_stats(r: Routing, B: int, T: int, E: int, K: int) -> MoEStats:
    """Expert load and the sequence-wise balance term (see :class:`MoEStats`)."""
    with jax.named_scope("moe_stats"):
        # Statistics: expert load, and the sequence-wise balance term of the technical report:
        # f_e = E/(K T) * #tokens of the row choosing e, P_e = mean_t of normalised scores.
        load_E = expert_counts(r.idx_TK.reshape(-1), E).astype(jnp.float32)
        chosen_BTE = jax.nn.one_hot(r.idx_TK, E, dtype=jnp.float32).sum(-2).reshape(B, T, E)
        f_BE = chosen_BTE.sum(1) * (E / (K * T))
        s_BTE = r.scores_TE.reshape(B, T, E)
        p_BE = jnp.mean(s_BTE / (jnp.sum(s_BTE, -1, keepdims=True) + 1e-20), axis=1)
        balance = jnp.mean(jnp.sum(f_BE * p_BE, axis=-1))
        return MoEStats(load_E, balance, r.idx_TK.reshape(B, T, K), r.weight_TK.reshape(B, T, K), s_BTE)


def expert_counts(expert_A: jax.Array, n_experts: int) -> jax.Array:
    """``[n_experts]`` int32: how many of the assignments ``expert_A`` chose each expert. At decode
    sizes a compare-and-sum (one fused reduction; XLA's GPU ``bincount`` is a scatter plus a
    zero-filled buffer and its copy: 3 launches per MoE layer), else ``bincount``."""
    if expert_A.size * n_experts <= 1 << 22:
        return jnp.sum(expert_A[:, None] == jnp.arange(n_experts, dtype=expert_A.dtype), axis=0, dtype=jnp.int32)
    return jnp.bincount(expert_A, length=n_experts).astype(jnp.int32)


#: :func:`every_expert_moe` is used while its ``[tokens, experts, moe_intermediate]`` activations
#: stay under this many elements (256 MiB in float32).
_EVERY_EXPERT_MAX_ELEMENTS = 1 << 26


def local_moe(arrays: tuple, x_MD: jax.Array, idx_MK: jax.Array, w_MK: jax.Array, prec: Precision,
              n_experts: int, expert_offset: jax.Array | None = None, seq_len: int = 1) -> jax.Array:
    """All experts on this device: :func:`sorted_moe`, or on the reference backend (CPU), once the
    tokens' choices cover the experts (``M*K >= E``), :func:`every_expert_moe` (see there).

    With a few tokens per row (``seq_len <= 4``: decoding, speculative verification) the switch
    counts one position's tokens (``M / seq_len``), not all of them, so that a verification pass
    computes each token exactly as one-token decoding of the same batch does."""
    M, K = idx_MK.shape
    F = arrays[0][0].shape[-2]
    tokens = M // seq_len if seq_len <= _KERNEL_MAX_NEW else M
    if (tokens * K >= n_experts and M * n_experts * F <= _EVERY_EXPERT_MAX_ELEMENTS
            and kernels_pallas.backend.split_impl(prec.kernels)[0] == "ref"):
        return every_expert_moe(arrays, x_MD, idx_MK, w_MK, prec, n_experts, expert_offset)
    return sorted_moe(arrays, x_MD, idx_MK, w_MK, prec, n_experts, expert_offset)


def sorted_moe(arrays: tuple, x_MD: jax.Array, idx_MK: jax.Array, w_MK: jax.Array, prec: Precision,
               n_experts: int, expert_offset: jax.Array | None = None) -> jax.Array:
    """:func:`local_moe` by sorting: assignments sorted by expert, grouped GEMMs, :func:`combine`."""
    M, K = idx_MK.shape
    with jax.named_scope("dispatch"):
        expert_A = idx_MK.reshape(-1)
        order_A = jnp.argsort(expert_A, stable=True)
        token_A = order_A // K
        group_sizes_E = expert_counts(expert_A, n_experts)
        x_AD = x_MD[token_A]
    with jax.named_scope("experts"):
        y_AD = experts_apply(arrays, x_AD, group_sizes_E, prec, expert_offset)
    with jax.named_scope("combine"):
        return combine(y_AD, order_A, w_MK, prec.dtype)


#: :func:`combine` gathers the experts' rows back from this many tokens on, scatter-adds below.
GATHER_COMBINE_MIN_TOKENS = 128


def combine(y_AD: jax.Array, order_A: jax.Array, w_MK: jax.Array, dtype) -> jax.Array:
    """The experts' outputs ``y_AD`` (rows in ``order_A``, the sorted order of the ``M * K``
    (token, choice) assignments) weighted by ``w_MK`` and summed per token → ``[M, D]``: each
    product rounded to ``y``'s dtype, the sum over a token's choices in float32.

    One token: the sum of its weighted rows. Few tokens (decode): a float32 scatter-add of the
    weighted rows (its zeroed buffer a launch of its own on a GPU). From
    :data:`GATHER_COMBINE_MIN_TOKENS` on: each assignment's sorted slot (a scatter of ``A`` ints),
    then one fusion that gathers a token's ``K`` rows, weights and sums them. Compiled for a v5p
    chip, a 1024-token prefill chunk's scatter-add moved ~1.1 GB per MoE layer (float32 copies
    of the ``[8192, 7168]`` rows, a gather and a scatter of them); the gather reads the bf16 rows
    once (117 MB) and writes ``[M, D]``."""
    M, K = w_MK.shape
    A, D = y_AD.shape
    if M == 1:
        # One token (batch-1 decode): every row is its own, so a sum instead of a scatter into a
        # zeroed buffer (on an H200 3 launches -> 1), added in the sorted order as the scatter-add
        # adds them on CPU: the same bits as a speculative pass's scatter for the same token.
        rows = (y_AD * w_MK.reshape(-1)[order_A][:, None].astype(y_AD.dtype)).astype(jnp.float32)
        acc = rows[0]
        for a in range(1, A):
            acc = acc + rows[a]
        return acc[None].astype(dtype)
    if M < GATHER_COMBINE_MIN_TOKENS:
        y_AD = y_AD * w_MK.reshape(-1)[order_A][:, None].astype(y_AD.dtype)
        y = jnp.zeros((M, D), jnp.float32).at[order_A // K].add(y_AD.astype(jnp.float32))
        return y.astype(dtype)
    slot_A = jnp.zeros((A,), jnp.int32).at[order_A].set(jnp.arange(A, dtype=jnp.int32))
    y_MKD = y_AD[slot_A].reshape(M, K, D) * w_MK[..., None].astype(y_AD.dtype)
    return jnp.sum(y_MKD.astype(jnp.float32), axis=1).astype(dtype)


def every_expert_moe(arrays: tuple, x_MD: jax.Array, idx_MK: jax.Array, w_MK: jax.Array, prec: Precision,
                     n_experts: int, expert_offset: jax.Array | None = None) -> jax.Array:
    """:func:`local_moe` as plain dense products: every expert on every token, each expert's
    output weighted by the token's combine weight for it (zero where not chosen).

    ``E/K`` times the multiply-adds of the routed form, but three dense GEMMs over all experts
    instead of a gather of each (token, expert) pair's weights (the reference grouped GEMM at few
    rows) or ``ragged_dot`` (which XLA's CPU backend lowers to a masked product over all experts
    for every *assignment*, ``K`` times this). Rounds like the routed form: each GEMM's output in
    the compute dtype, the weighting in the compute dtype, the sum over experts in float32; with
    FP8 weights in W8A8 mode, each GEMM's input rows fake-quantized 1x128 as the routed form's are.
    Test config A on a 2-core CPU (16 experts, top-4, batch-8 decode): 1.07-1.12x the step rate
    of the gather form; at batch 1 (4 assignments for 16 experts) it is slower, hence the switch
    in :func:`local_moe`.
    """
    dtype = prec.dtype
    w8a8 = arrays[0][1] is not None and prec.fp8_mode == "w8a8"
    ws = []
    for w, scale in arrays:
        if expert_offset is not None:
            w = jax.lax.dynamic_slice_in_dim(w, expert_offset, n_experts, 0)
            scale = None if scale is None else jax.lax.dynamic_slice_in_dim(scale, expert_offset, n_experts, 0)
        ws.append(w.astype(dtype) if scale is None else dequantize(w, scale, jnp.float32 if w8a8 else dtype))
    wg_EFD, wu_EFD, wd_EDF = ws
    x_MD = x_MD.astype(dtype)
    # W8A8: the rows each GEMM sees, as kernels_pallas.grouped_matmul(quantize_x=True) sees them
    # (float32 rows and weights: the products of e4m3 values and scales, unrounded)
    quant = (functools.partial(kernels_pallas.fake_quantize_act_1x128, dtype=jnp.float32)
             if w8a8 else lambda a: a)
    xq_MD = quant(x_MD)
    g_MEF = einsum32("md,efd->mef", xq_MD, wg_EFD).astype(dtype)
    u_MEF = einsum32("md,efd->mef", xq_MD, wu_EFD).astype(dtype)
    y_MED = einsum32("mef,edf->med", quant(jax.nn.silu(g_MEF) * u_MEF), wd_EDF).astype(dtype)
    M = x_MD.shape[0]
    c_ME = jnp.zeros((M, n_experts), jnp.float32).at[jnp.arange(M)[:, None], idx_MK].add(w_MK)
    y_MED = y_MED * c_ME[..., None].astype(dtype)
    return jnp.sum(y_MED.astype(jnp.float32), axis=1).astype(dtype)
