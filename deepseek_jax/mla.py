"""Multi-head Latent Attention (SPEC §3), naive and absorbed forms.

Per token, MLA compresses keys and values into a latent ``c`` (``kv_lora_rank``, 512 in V3,
after ``kv_a_layernorm``) plus one RoPE key ``k_pe`` (64) shared by all heads: the 576 values
per token per layer that the decode cache holds (``C = L + R``).

* naive form (training, prefill): expand ``c`` per head through ``kv_b_proj`` into ``k_nope``
  and ``v``; ordinary attention among the tokens of the call.
* absorbed form (decode): fold ``W_UK`` into the query and ``W_UV`` after the attention, so the
  scores and the weighted sum run directly over the latent cache.

Masking is by absolute position: key ``t`` is visible to query ``i`` iff ``pos(t) <= pos(i)``.
Rows are right-padded, so pad tokens sit after every real token and are never visible to it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

import kernels_pallas
from deepseek_jax import kernel_mesh
from kernels_pallas.mla_decode import SplitT

from deepseek_jax.config import DeepSeekConfig
from deepseek_jax.norm import RMSNorm
from deepseek_jax.quant import Linear, Precision, einsum32
from deepseek_jax.rope import Rope

_NEG = -1e30  # finite "minus infinity" for masked scores: a fully masked pad row stays NaN-free
# Absorbed calls with at most this many new tokens per row go through the decode kernel per token.
_KERNEL_MAX_NEW = 4
# The norms of the two low-rank latents (q_a_layernorm, kv_a_layernorm) use a fixed 1e-6, not
# config.rms_norm_eps: DeepSeek's reference builds them as RMSNorm(rank) with its default eps, and
# so does HF's deepseek_v3 (SPEC §3). The two agree at V3's own rms_norm_eps of 1e-6.
LORA_NORM_EPS = 1e-6


class MLA(nnx.Module):
    def __init__(self, cfg: DeepSeekConfig, *, prec: Precision, rngs: nnx.Rngs):
        D, H = cfg.hidden_size, cfg.num_attention_heads
        self.cfg, self.prec = cfg, prec
        self.num_heads = H
        self.nope, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.latent = cfg.kv_lora_rank
        self.scale = cfg.softmax_scale
        fp8 = cfg.fp8
        qk = H * cfg.qk_head_dim
        if cfg.q_lora_rank:
            self.q_a_proj = Linear(D, cfg.q_lora_rank, fp8=fp8, prec=prec, rngs=rngs)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LORA_NORM_EPS, dtype=prec.dtype, kernels=prec.kernels)
            self.q_b_proj = Linear(cfg.q_lora_rank, qk, fp8=fp8, prec=prec, rngs=rngs)
        else:
            self.q_proj = Linear(D, qk, fp8=fp8, prec=prec, rngs=rngs)
        self.kv_a_proj_with_mqa = Linear(D, cfg.latent_dim, fp8=fp8, prec=prec, rngs=rngs)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, LORA_NORM_EPS, dtype=prec.dtype)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                                fp8=fp8, prec=prec, rngs=rngs)
        self.o_proj = Linear(H * cfg.v_head_dim, D, fp8=fp8, prec=prec, rngs=rngs)
        self.placement = None   # set by sharding.attach_mesh: kernel calls then run per shard

    # ---- pieces shared by both forms -------------------------------------------------------
    def _query(self, x_BTD, cos, sin, rope: Rope):
        """``(q [B, T, H, N + R] as projected, roped q_pe [B, T, H, R])``."""
        if self.cfg.q_lora_rank:
            # q_a_proj's split-K partials (batch-1 decode) summed by the norm's kernel
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD, sum_splits=False)))
        else:
            q = self.q_proj(x_BTD)
        q_BTHK = q.reshape(*q.shape[:-1], self.num_heads, self.nope + self.rope_dim)
        return q_BTHK, rope.apply(q_BTHK[..., self.nope:], cos[..., None, :], sin[..., None, :])

    def latent_entries(self, x_BTD, cos, sin, rope: Rope) -> jax.Array:
        """The cache entries ``[c | roped k_pe]`` ``[B, T, L+R]`` of the new tokens."""
        kv = self.kv_a_proj_with_mqa(x_BTD)
        c = self.kv_a_layernorm(kv[..., :self.latent])
        k_pe = rope.apply(kv[..., self.latent:], cos, sin)
        return jnp.concatenate([c, k_pe.astype(c.dtype)], axis=-1)

    def _writes_by_kernel(self, layer) -> bool:
        """Whether a decode step's new cache entries go through ``kernels_pallas.write_latent`` (one
        GPU launch per layer for ``kv_a_layernorm``, the rope of ``k_pe`` and the cache write; XLA
        took 4-5): GPU kernels, off a mesh, and the norm weight stacked like the cache (a scanned
        layer's, ``Precision.weights_in_place``) or neither stacked."""
        stacked_w = self.kv_a_layernorm.weight[...].ndim == 2
        return (kernels_pallas.backend.split_impl(self.prec.kernels)[0] == "gpu" and self.placement is None
                and self.kv_a_proj_with_mqa.placement is None and stacked_w == (layer is not None))

    def _store(self, cache_BSC, new_BTC, pos_BT, layer, *, decode: bool):
        """Writes each row's new entries ``new_BTC`` at its positions (out-of-range writes drop)
        into the cache (with ``layer``: the layers' whole ``[L, B, S, C]`` stack, written in place
        inside the scan). ``decode`` (a few new tokens per row): through
        ``kernels_pallas.store_latent``, per shard on a mesh; on a TPU that is a kernel writing
        into the cache as a TPU lays it out (XLA's scatter there made XLA transpose the whole
        cache around each layer's write). A prefill's many tokens: XLA's scatter."""
        if not decode:
            return kernels_pallas.store_latent_ref(cache_BSC, new_BTC, pos_BT, layer=layer)
        store = kernels_pallas.store_latent
        if self.placement is not None and kernel_mesh.uses_kernel(self.prec.kernels):
            store = functools.partial(kernel_mesh.store_latent, store, pl=self.placement)
        return store(cache_BSC, new_BTC, pos_BT, layer=layer, impl=self.prec.kernels)

    def _softmax(self, s_BHTS, mask_BTS):
        s = jnp.where(mask_BTS[:, None], s_BHTS.astype(jnp.float32) * self.scale, _NEG)
        return jax.nn.softmax(s, axis=-1)

    def _absorb(self, x_BTHI, part: str) -> jax.Array:
        """``q_nope → q_lat`` (``part="k"``, ``W_UK``) or ``o_lat → o`` (``"v"``, ``W_UV``) through
        ``kv_b_proj``'s weight as stored (``kernels_pallas.mla_absorb``: a GPU kernel reading the FP8
        weight in place; XLA's own products wrote float32 copies of it, ~10x its bytes at batch 1).
        ``x_BTHI`` may be the decode kernel's unmerged split-T partials of ``o_lat`` (a
        ``kernels_pallas.mla_decode.SplitT``, ``[S, B, T, H, L]``, part "v"): the absorb kernel
        merges them. Either way it is cast to the compute dtype as it is loaded, as
        ``x.astype(dtype)`` would be (the decode kernel's float32 ``o_lat`` at batch 64 cost a
        convert launch per layer and 25 MB written and read)."""
        kvb = self.kv_b_proj
        fn = kernels_pallas.mla_absorb
        if kvb.placement is not None and kernel_mesh.uses_kernel(self.prec.kernels):
            fn = functools.partial(kernel_mesh.mla_absorb, fn, pl=kvb.placement)   # never a SplitT: see decode
        return fn(x_BTHI, kvb.weight[...], kvb.weight_scale_inv[...] if kvb.fp8 else None, part=part,
                  nope=self.nope, layer=kvb._stacked_layer(), out_dtype=self.prec.dtype, dtype=self.prec.dtype,
                  impl=self.prec.kernels)

    def _cached_attention(self, q_nope, q_pe, kvb, k_pe, pos_BT) -> jax.Array:
        """``kernels_pallas.cached_attention`` (per shard on a mesh) over keys ``kvb``, kv_b_proj's
        output ``[B, S, H * (N + A)]``, and their rope keys ``k_pe`` ``[B, S, R]``."""
        dtype = self.prec.dtype
        attn = kernels_pallas.cached_attention
        if self.placement is not None and kernel_mesh.uses_kernel(self.prec.kernels):
            attn = functools.partial(kernel_mesh.cached_attention, attn, pl=self.placement)
        kvb = kvb.reshape(*kvb.shape[:2], self.num_heads, self.nope + self.v_dim)
        return attn(q_nope.astype(dtype), q_pe.astype(dtype), kvb, k_pe.astype(dtype), pos_BT,
                    scale=self.scale, impl=self.prec.kernels).astype(dtype)

    def _naive_qkv(self, q_nope, q_pe, new_BTC):
        """The naive form's per-head ``q [B, T, H, N+R]``, ``k [B, S, H, N+R]`` and ``v [B, S, H, A]``
        from the queries and the latent entries ``[c | roped k_pe]`` (expanded by ``kv_b_proj``)."""
        dtype = self.prec.dtype
        H, N, A, L = self.num_heads, self.nope, self.v_dim, self.latent
        w_kvb = self.kv_b_proj.dense_weight(dtype).reshape(H, N + A, L)
        c, k_pe = new_BTC[..., :L], new_BTC[..., L:]
        k_nope = einsum32("btl,hnl->bthn", c, w_kvb[:, :N]).astype(dtype)
        v = einsum32("btl,hal->btha", c, w_kvb[:, N:]).astype(dtype)
        # One score product over [nope | rope] (192 wide), not two [B, H, T, S] float32
        # products added: at a 4K prompt each is 8.6 GB per layer (the H200 profile of a
        # real-width prefill: ~15 of ~35 ms per layer go to the scores and softmax). Saving
        # the second product and the sum is not measured on a GPU yet.
        k_pe_BSHR = jnp.broadcast_to(k_pe[:, :, None, :], (*k_pe.shape[:2], H, k_pe.shape[-1]))
        q_BTHK = jnp.concatenate([q_nope, q_pe.astype(dtype)], -1)
        k_BSHK = jnp.concatenate([k_nope, k_pe_BSHR.astype(dtype)], -1)
        return q_BTHK, k_BSHK, v

    def _naive_probs(self, q_BTHK, k_BSHK, pos_BT) -> jax.Array:
        """float32 causal softmax probabilities ``[B, H, T, S]`` among the call's tokens."""
        s = einsum32("bthk,bshk->bhts", q_BTHK, k_BSHK)
        return self._softmax(s, pos_BT[:, None, :] <= pos_BT[:, :, None])

    def attention_probs(self, x_BTD: jax.Array, pos_BT: jax.Array, rope: Rope) -> jax.Array:
        """float32 ``[B, H, T, T]``: each head's attention weights among ``x``'s tokens (the
        attention input, after ``input_layernorm``), as the naive form computes them; for
        studying the model (``dj.internals(..., attention=True)``)."""
        cos, sin = rope.cos_sin(pos_BT)
        q_proj_BTHK, q_pe = self._query(x_BTD, cos, sin, rope)
        q_BTHK, k_BSHK, _ = self._naive_qkv(q_proj_BTHK[..., :self.nope], q_pe,
                                            self.latent_entries(x_BTD, cos, sin, rope))
        return self._naive_probs(q_BTHK, k_BSHK, pos_BT)

    # ---- forward ---------------------------------------------------------------------------
    def __call__(self, x_BTD: jax.Array, pos_BT: jax.Array, rope: Rope, *,
                 cache_BSC: jax.Array | None = None, absorbed: bool = False, layer=None, sum_splits: bool = True):
        """Returns ``(out_BTD, cache_BSC)``; the cache (if given) gets the new tokens written.

        ``absorbed=False``: naive form among this call's tokens (the cache is only written).
        ``absorbed=True``: absorbed form over the whole cache after the write (decode, or
        prefill continuing an existing cache). Both compute the same function.
        ``layer``: the cache is the scanned layers' whole ``[L, B, S, C]`` stack, this is layer
        ``layer`` (traced); it is written and read in place and returned whole.
        ``sum_splits=False``: the output may be ``o_proj``'s unsummed split-K partials
        (``kernels_pallas.SplitK``, see ``Linear``), for the next norm's kernel to sum.
        """
        dtype = self.prec.dtype
        T = x_BTD.shape[1]
        if absorbed and 1 < T <= _KERNEL_MAX_NEW and cache_BSC is not None \
                and kernels_pallas.backend.split_impl(self.prec.kernels)[0] == "ref":
            # A few new tokens per row (speculative verification) on the jnp reference backend
            # (CPU): one token at a time through the one-token path, each writing its entry and
            # then attending up to its own position (later entries are masked anyway, so this is
            # the same function). Every new token is then computed exactly as plain decoding
            # computes it, and it is cheaper here: XLA's CPU backend runs the one-row projections
            # as matrix-vector products, while a batched T-token attention costs transposes and
            # copies of cache slices plus a YNNPACK call per dot (demo model, batch 1: a main-model
            # pass over 2 tokens went from ~145 to ~125-130 us; 1 token: ~70 us).
            outs = []
            for t in range(T):
                o, cache_BSC = self(x_BTD[:, t:t + 1], pos_BT[:, t:t + 1], rope, cache_BSC=cache_BSC,
                                    absorbed=True, layer=layer)
                outs.append(o)
            return jnp.concatenate(outs, axis=1), cache_BSC
        entry_kernel = absorbed and T <= _KERNEL_MAX_NEW and cache_BSC is not None and self._writes_by_kernel(layer)
        with jax.named_scope("qkv"):
            cos, sin = rope.cos_sin(pos_BT)
            q_proj_BTHK, q_pe = self._query(x_BTD, cos, sin, rope)
            q_nope = q_proj_BTHK[..., :self.nope]
            new_BTC = None if entry_kernel else self.latent_entries(x_BTD, cos, sin, rope)
        if cache_BSC is not None:
            with jax.named_scope("cache_write"):
                if entry_kernel:
                    # decode on a GPU: kv_a's output (its split-K partials at batch 1) to the
                    # cache through one kernel that norms, ropes and writes in place
                    ln = self.kv_a_layernorm
                    cache_BSC = kernels_pallas.write_latent(
                        cache_BSC, self.kv_a_proj_with_mqa(x_BTD, sum_splits=False), ln.weight[...], pos_BT,
                        rope.inv_freq, mult=rope.mult, eps=ln.eps, dtype=dtype, layer=layer, impl=self.prec.kernels)
                else:
                    cache_BSC = self._store(cache_BSC, new_BTC, pos_BT, layer, decode=absorbed and T <= _KERNEL_MAX_NEW)
        H, N, A, L = self.num_heads, self.nope, self.v_dim, self.latent
        flash_target = (kernels_pallas.backend.split_impl(self.prec.kernels)[0]
                        if self.prec.prefill_attention == "flash" else None)
        if not absorbed and flash_target in ("tpu", "ref"):
            # TPU: the call's own tokens through the flash kernel of a chunk over the cache (below),
            # with token indices for positions: causal by index, as the GPU's flash kernel is.
            # Elsewhere (CPU) the same call runs its blocked jnp form: forward and backward hold
            # [B, T, H, 512] float32 scores at most, not [B, H, T, T] (training, long scores).
            c, k_pe = new_BTC[..., :L], new_BTC[..., L:]
            idx_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), pos_BT.shape)
            o_BTHA = self._cached_attention(q_nope, q_pe, self.kv_b_proj(c.astype(dtype)), k_pe, idx_BT)
        elif not absorbed:
            q_BTHK, k_BSHK, v = self._naive_qkv(q_nope, q_pe, new_BTC)
            if self.prec.prefill_attention == "flash":  # causal by index (see Precision)
                attn = kernels_pallas.causal_attention
                if self.placement is not None and kernel_mesh.uses_kernel(self.prec.kernels):
                    attn = functools.partial(kernel_mesh.causal_attention, attn, pl=self.placement)
                o_BTHA = attn(q_BTHK, k_BSHK, v, scale=self.scale, impl=self.prec.kernels).astype(dtype)
            else:
                p = self._naive_probs(q_BTHK, k_BSHK, pos_BT).astype(dtype)
                o_BTHA = einsum32("bhts,bsha->btha", p, v).astype(dtype)
        elif T > _KERNEL_MAX_NEW and cache_BSC is not None and flash_target is not None:
            # A prefill chunk over the cache written so far, as DeepSeek prefills: the cache's
            # latents expanded per head by kv_b_proj (the naive form) and a flash kernel by
            # position (kernels_pallas.cached_attention). The absorbed form below costs ~3x the
            # FLOPs at a 4K cache and writes [B, T, H, S] float32 scores (2.1 GB per 1K-token
            # chunk per layer).
            kv = cache_BSC if layer is None else jax.lax.dynamic_index_in_dim(cache_BSC, layer, 0, False)
            o_BTHA = self._cached_attention(q_nope, q_pe, self.kv_b_proj(kv[..., :L].astype(dtype)), kv[..., L:],
                                            pos_BT)
        else:
            if cache_BSC is None:
                raise ValueError("absorbed attention needs a cache")
            # the whole query: the W_UK kernel reads its q_nope columns in place (no slice launch)
            q_lat = self._absorb(q_proj_BTHK.astype(dtype), "k")
            if T <= _KERNEL_MAX_NEW:
                # One new token per row (decode), or a few (speculative verification on GPU/TPU;
                # the reference backend took the one-token-at-a-time branch above): the MLA
                # decode kernel once per new token, each query seeing the cache up to its own
                # position, so that a verified token is computed like the same token in plain
                # decoding.
                decode = kernels_pallas.mla_decode
                per_shard = kernel_mesh.uses_kernel(self.prec.kernels) and (
                    self.placement is not None or self.kv_b_proj.placement is not None)
                if self.placement is not None and kernel_mesh.uses_kernel(self.prec.kernels):
                    decode = functools.partial(kernel_mesh.mla_decode, decode, pl=self.placement)
                # Off a mesh, where the GPU kernel splits the cache (small batches), its partial
                # softmax states go unmerged to the W_UV absorb kernel, which merges them in its
                # prologue: no XLA merge (3 launches per layer) and no o_lat round trip. Each
                # verified token (T > 1) is merged there too, as plain decoding merges it. On a
                # mesh (kernels per shard) the decode returns o_lat merged, as other paths do.
                # lengths pos + 1 (clamped to the cache), added by the GPU kernel itself
                outs = [decode(q_lat[:, t], q_pe[:, t], cache_BSC, pos_BT[:, t], scale=self.scale,
                               kv_lora_rank=L, impl=self.prec.kernels, layer=layer, length_offset=1,
                               **({} if per_shard else {"merge": False}))
                        for t in range(T)]
                if isinstance(outs[0], SplitT):   # [S, B, T, H, L] partials
                    o_lat = SplitT(*(jnp.stack(parts, axis=2) for parts in zip(*outs)))
                else:   # float32: the absorb kernel casts it as it loads (a convert launch less)
                    o_lat = jnp.stack(outs, axis=1)
            else:  # several new tokens (chunked prefill over an existing cache)
                kv = cache_BSC if layer is None else jax.lax.dynamic_index_in_dim(cache_BSC, layer, 0, False)
                kv = kv.astype(dtype)
                # one score product with [q_lat | q_pe] over the whole entry [c | k_pe], in the
                # [B, T, H, S] order the product comes out in: [B, H, T, S] cost a transpose of
                # the float32 scores (2.1 GB written and read per 1K-token chunk per layer at a
                # 4K cache, compiled for an H200)
                s = einsum32("bthc,bsc->bths", jnp.concatenate([q_lat, q_pe.astype(dtype)], -1), kv)
                c = kv[..., :L]
                mask = jnp.arange(kv.shape[1])[None, None, :] <= pos_BT[:, :, None]
                s = jnp.where(mask[:, :, None], s.astype(jnp.float32) * self.scale, _NEG)
                p = jax.nn.softmax(s, axis=-1).astype(dtype)
                o_lat = einsum32("bths,bsl->bthl", p, c).astype(dtype)
            o_BTHA = self._absorb(o_lat, "v")
        with jax.named_scope("o_proj"):
            out = self.o_proj(o_BTHA.reshape(*o_BTHA.shape[:2], H * A), sum_splits=sum_splits)
        return out, cache_BSC
