"""End-to-end decode / prefill at DeepSeek-V3's real width, against the HBM roofline and HF.

    PYTHONPATH=. python benchmarks/e2e_gpu.py                 # H200: 1 dense + 3 MoE layers, real width
    PYTHONPATH=. python benchmarks/e2e_gpu.py --small         # CPU smoke test on a tiny config (seconds)

A reduced-depth model (``--layers``, default 4 = 1 dense + 3 MoE) with the real hidden size,
heads, ranks and 256 experts measures exactly the per-layer cost that 61 layers multiply. Random
FP8 weights are made on the device (no files). Measured side by side in one run:

* decode step time at batch 1/16/64/256 with a ``--context`` (4096) token latent cache (steps
  run in an on-device loop, :data:`DECODE_STEPS` per call, like the generator's), against
  the HBM roofline of the step: bytes touched (FP8 weights of the dense layer and attention,
  shared experts, the distinct experts the step's tokens actually routed to, the latent cache rows read,
  lm_head) over the HBM bandwidth measured in the same run (a large on-device copy);
* prefill tokens/s at 4K and 32K prompt tokens (32K in 4K chunks over the cache: prefill
  attention is not flash-style), against the FP8 GEMM roofline (2 x the weights each token
  multiplies x tokens over the fp8 dot throughput measured in the same run: :func:`prefill_gemm_params`;
  attention's own products are not counted); the first length also with flash
  prefill attention (``--compare-flash``), with the routed experts on the Mosaic GPU grouped
  kernel (``--compare-mosaic``) and in W8A8 on the Mosaic GPU e4m3 kernels (``--compare-w8a8``),
  side by side;
* decode at the first batch >= 64 with attention on the Mosaic GPU MLA kernel
  (``--compare-mosaic-mla``), side by side;
* HF transformers' ``deepseek_v3`` on the same config in bf16 (random weights) as the peer:
  decode ms/step at the same batch sizes (``--no-hf`` skips it);
* the :class:`~deepseek_jax.generate.Generator` itself (``--rows generator``; the model then has
  its MTP layer at real width too): compiled prefill and on-device decode loop, plain and with
  MTP speculative decoding, ms per decode-loop iteration at batch 1 and 16. Random weights make
  the drafts' acceptance meaningless, but a speculative iteration costs the same whatever is
  accepted (it always verifies 2 tokens and runs the MTP on 2 rows), so the table gives the
  speed-up that DeepSeek's reported acceptance (85-90%) would reach: ``(1 + a) x plain / spec``.

Prints one table with ratios; ``--json FILE`` saves the rows.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# not this folder itself: its kernels.py would shadow the `kernels` package transformers imports
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
sys.path.insert(0, os.path.dirname(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from deepseek_jax.cache import LatentCache  # noqa: E402
from deepseek_jax.checkpoint import abstract_model  # noqa: E402
from deepseek_jax.config import DeepSeekConfig, load_config  # noqa: E402
from deepseek_jax.quant import Precision  # noqa: E402
from deepseek_jax.synthetic import tiny_config  # noqa: E402

from benchmarks._args import ArgumentParser, at_least, int_list, positive_int  # noqa: E402  (argparse only)
from benchmarks._profile import device_op_table, print_table  # noqa: E402


def bench_config(layers: int, small: bool, mtp: bool = False) -> DeepSeekConfig:
    if small:
        return DeepSeekConfig.from_hub_dict(dict(tiny_config(num_hidden_layers=layers,
                                                             num_nextn_predict_layers=int(mtp)),
                                                 quantization_config={"quant_method": "fp8"}))
    return load_config("deepseek-v3-671b").replace(num_hidden_layers=layers, first_k_dense_replace=1,
                                                   num_nextn_predict_layers=int(mtp))


def random_model(cfg: DeepSeekConfig, key, prec: Precision | None = None):
    """Random FP8 model made leaf by leaf on the device (peak memory: one leaf's bf16 draft), with
    the MTP layer when the config has one."""
    model = abstract_model(cfg, prec or Precision(dtype=jnp.bfloat16), with_mtp=cfg.num_nextn_predict_layers > 0)
    graphdef, state = nnx.split(model)
    flat = list(nnx.to_flat_state(state))
    leaves = []
    for i, (path, v) in enumerate(flat):
        k = jax.random.fold_in(key, i)
        name = str(path[-1])

        @jax.jit
        def make(k, shape=tuple(v.shape), dtype=v.dtype, name=name):
            if dtype == jnp.float8_e4m3fn:
                return (jax.random.normal(k, shape, jnp.bfloat16) * 64).astype(dtype)
            if name == "weight_scale_inv":
                return jnp.full(shape, 1.0 / (64 * 32), jnp.float32)
            if name == "e_score_correction_bias":
                return jax.random.uniform(k, shape, jnp.float32, 0.0, 0.1)
            if len(shape) == 1 or "norm" in name:
                return jnp.ones(shape, dtype)
            return (jax.random.normal(k, shape, jnp.float32) * 0.02).astype(dtype)

        leaves.append(make(k))
    return nnx.merge(graphdef, nnx.from_flat_state([(p, v.replace(a)) for (p, v), a in zip(flat, leaves)]))


def same_weights(model, prec: Precision):
    """``model``'s weights (no copy) under another :class:`Precision`."""
    other = abstract_model(model.cfg, prec, with_mtp=model.mtp is not None)
    return nnx.merge(nnx.split(other)[0], nnx.split(model)[1])


def timed(fn, *args, reps: int = 5):
    out = fn(*args)
    jax.block_until_ready(out)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def hbm_bandwidth(nbytes: int) -> float:
    """Bytes/s of an on-device copy (read + write) of ``nbytes``, measured now."""
    x = jax.random.normal(jax.random.PRNGKey(2), (nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a * 1.0001)
    return 2 * x.nbytes / timed(f, x)


def fp8_dot_flops(small: bool) -> float:
    m, k, n = (256, 256, 256) if small else (8192, 8192, 8192)
    ka, kb = jax.random.split(jax.random.PRNGKey(1))  # random data: zeros and ones time faster
    a = jax.random.normal(ka, (m, k), jnp.bfloat16).astype(jnp.float8_e4m3fn)
    b = jax.random.normal(kb, (k, n), jnp.bfloat16).astype(jnp.float8_e4m3fn)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.bfloat16))
    return 2 * m * n * k / timed(f, a, b)


def step_bytes(cfg: DeepSeekConfig, model, batch: int, context: int, touched_experts: float) -> float:
    """Bytes a decode step must read: weights except untouched experts, latent cache, lm_head."""
    _, state = nnx.split(model)
    total = expert = 0
    for path, v in nnx.to_flat_state(state):
        nb = math.prod(v.shape) * np.dtype(v.dtype).itemsize
        p = [str(x) for x in path]
        if p[0] == "mtp":  # not part of a plain decode step
            continue
        if "experts" in p and "shared_experts" not in p:
            expert += nb  # counted below, only the experts the batch routes to
            continue
        if p[0] == "embed_tokens":
            nb = batch * cfg.hidden_size * 2  # only the looked-up rows
        total += nb
    frac = touched_experts / cfg.n_routed_experts
    cache = cfg.num_hidden_layers * batch * context * cfg.latent_dim * 2
    return total + expert * frac + cache


def prefill_gemm_params(cfg: DeepSeekConfig, model) -> float:
    """Weights each prompt token multiplies, from the model's own arrays: every layer's projections
    (MLA's q_a, q_b, kv_a, kv_b and o), router and dense or shared MLP, and K of the E routed
    experts; not the embedding (a lookup), lm_head (the prefill here computes no logits) or the
    MTP layer. (A rough ``6 x hidden^2`` per layer had counted MLA as 308M weights at V3's
    width, against its 187M: at 1 dense + 3 MoE layers 1.2x the weights, a roofline 1.2x too long
    and ratios to it too kind.)"""
    _, state = nnx.split(model)
    total = 0.0
    for path, v in nnx.to_flat_state(state):
        p = [str(x) for x in path]
        if p[0] not in ("dense_layers", "moe_layers") or p[-1] != "weight" or p[-2].endswith("layernorm"):
            continue
        n = math.prod(v.shape)
        if "experts" in p and "shared_experts" not in p:
            n *= cfg.num_experts_per_tok / cfg.n_routed_experts
        total += n
    return total


def expected_touched(cfg: DeepSeekConfig, batch: int) -> float:
    """Expected distinct experts hit by ``batch`` tokens choosing K of E (uniform routing)."""
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    return E * (1 - (1 - K / E) ** batch)


#: Decode steps per timed call: the steps run in a ``fori_loop`` inside one executable with the
#: cache in the loop carry, as the generator's on-device decode loop runs them, so the per-call
#: dispatch and the one copy of the (not donated) input cache are shared by this many steps.
DECODE_STEPS = 8


def decode_loop(graphdef, cfg: DeepSeekConfig, batch: int, context: int):
    """``steps(state, cache, ids) -> (ids, touched, cache)``: :data:`DECODE_STEPS` decode steps over
    the last positions of a ``context``-token cache in a ``fori_loop``, each step's argmax fed
    back, the mean number of distinct experts each MoE layer read per step, and the cache (jit it
    with the cache donated, as the generator runs: otherwise every call copies the whole cache
    once, 1.2 GB at batch 64)."""
    pos0 = max(0, context - 1 - DECODE_STEPS)  # the last steps of a full cache
    n_moe = cfg.num_moe_layers

    def steps(state, cache, ids):
        m = nnx.merge(graphdef, state)

        def body(i, carry):
            cache, ids, touched = carry
            pos = jnp.full((batch, 1), pos0, jnp.int32) + i
            out = m(ids, pos, cache=cache, absorbed=True)
            if out.moe_stats is not None:
                touched = touched + jnp.sum(out.moe_stats.load_E > 0, axis=-1).astype(jnp.float32)
            nxt = jnp.argmax(out.logits[:, -1], -1).astype(jnp.int32)[:, None]
            return out.cache, nxt, touched

        cache, ids, touched = jax.lax.fori_loop(0, DECODE_STEPS, body,
                                                (cache, ids, jnp.zeros((n_moe,), jnp.float32)))
        return ids, touched / DECODE_STEPS, cache

    return steps


def bench_decode(cfg, model, batch: int, context: int, key, profile: bool = False):
    """Time per decode step (median over calls of :data:`DECODE_STEPS` steps, each step's argmax
    fed back as the next token), the mean number of distinct routed experts a step read per MoE
    layer (for the roofline: random weights need not route like uniform choice), and with
    ``profile`` the per-kernel device time per step (``benchmarks/_profile.py``)."""
    graphdef, state = nnx.split(model)
    cache = LatentCache.zeros(cfg, batch, context, jnp.bfloat16)
    cache = jax.tree.map(lambda a: jax.random.normal(key, a.shape, jnp.bfloat16) * 0.1, cache)
    ids = jax.random.randint(jax.random.fold_in(key, 7), (batch, 1), 0, cfg.vocab_size, jnp.int32)
    steps = jax.jit(decode_loop(graphdef, cfg, batch, context), donate_argnums=1)
    held = [cache]

    def run(state, ids):  # the donated cache handed from call to call
        ids, touched, held[0] = steps(state, held[0], ids)
        return ids, touched

    t = timed(run, state, ids) / DECODE_STEPS
    touched = np.asarray(run(state, ids)[1])
    prof = device_op_table(run, (state, ids), steps=2, per_call=DECODE_STEPS) if profile else None
    return t, prof, float(touched.mean()) if touched.size else 0.0


def prefill_chunks(graphdef, tokens: int, chunk: int):
    """``prefill(state, cache, ids) -> last hidden``: a ``tokens``-token prompt, the first ``chunk``
    by the naive form, the rest ``chunk`` at a time over the cache (absorbed) in a ``fori_loop``."""
    n = tokens // chunk

    def prefill(state, cache, ids):
        m = nnx.merge(graphdef, state)
        out = m(ids[:, :chunk], cache=cache, logits=False)

        def body(i, carry):
            cache, _ = carry
            s = i * chunk
            pos = (s + jnp.arange(chunk, dtype=jnp.int32))[None]
            o = m(jax.lax.dynamic_slice_in_dim(ids, s, chunk, axis=1), pos, cache=cache, absorbed=True,
                  logits=False)
            return o.cache, o.hidden[:, -1]

        _, h = jax.lax.fori_loop(1, n, body, (out.cache, out.hidden[:, -1]))
        return h

    return prefill


def bench_prefill(cfg, model, tokens: int, chunk: int, profile: bool = False):
    """One prompt of ``tokens``: the first ``chunk`` by the naive form, the rest chunk by chunk over
    the latent cache (absorbed form) in a ``fori_loop``, so one compiled chunk serves any length."""
    graphdef, state = nnx.split(model)
    cache = LatentCache.zeros(cfg, 1, tokens, jnp.bfloat16)
    # random tokens: a prompt of one repeated token makes every position identical, so all tokens
    # route to the same 8 experts (the 2026-11-28 session-3 run measured that degenerate case)
    ids = jax.random.randint(jax.random.PRNGKey(11), (1, tokens), 0, cfg.vocab_size, jnp.int32)
    prefill = jax.jit(prefill_chunks(graphdef, tokens, chunk))
    t = timed(prefill, state, cache, ids, reps=2)
    prof = device_op_table(prefill, (state, cache, ids), steps=1) if profile else None
    return t, prof


def bench_generator(model, batch: int, prompt_len: int, new_tokens: int, reps: int = 3) -> dict:
    """The Generator on ``batch`` random prompts of ``prompt_len`` tokens, ``new_tokens`` each (eos
    ignored), plain and MTP speculative: best of ``reps`` calls after a compiling one. Returns
    ms per decode-loop iteration (decode time over iterations; prefill draws the first token),
    decode tokens/s, prefill ms, iterations and the speculative acceptance."""
    from deepseek_jax.generate import Generator

    gen = Generator(model, weights="as-is")
    prompts = np.random.default_rng(batch).integers(2, model.cfg.vocab_size, (batch, prompt_len)).tolist()
    out = {}
    for spec in (None, "mtp"):
        gen.generate(prompts, max_new_tokens=new_tokens, stop_at_eos=False, speculative=spec)  # compiles
        best = None
        for _ in range(reps):
            gen.generate(prompts, max_new_tokens=new_tokens, stop_at_eos=False, speculative=spec)
            st = gen.last_stats
            if best is None or st.decode_s < best.decode_s:
                best = st
        it = max(best.steps - 1, 1)
        out[spec or "plain"] = dict(iter_ms=best.decode_s / it * 1e3, iterations=it,
                                    decode_tok_s=(best.new_tokens - batch) / best.decode_s,
                                    prefill_ms=best.prefill_s * 1e3,
                                    acceptance=best.accepted / best.drafted if best.drafted else None)
    return out


def hf_decode_ms(cfg: DeepSeekConfig, batches, context: int, small: bool):
    """HF transformers deepseek_v3 in bf16, random weights: median ms per decode step."""
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    from transformers.cache_utils import DynamicCache

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    d = cfg.to_hub_dict()
    d.pop("quantization_config", None)
    hcfg = DeepseekV3Config(**d)
    kw = {} if small else {"experts_implementation": "grouped_mm"}
    with torch.device(dev):
        try:
            model = DeepseekV3ForCausalLM._from_config(hcfg, torch_dtype=torch.bfloat16, **kw).eval()
        except (TypeError, ValueError):  # an older transformers without grouped_mm experts
            model = DeepseekV3ForCausalLM._from_config(hcfg, torch_dtype=torch.bfloat16).eval()
    out = {}
    for b in batches:
        ids = torch.randint(0, cfg.vocab_size, (b, context), device=dev)
        with torch.no_grad():
            cache = DynamicCache(config=hcfg)
            for s in range(0, context, 1024):  # fill the cache in chunks (bounded attention memory)
                model(input_ids=ids[:, s:s + 1024], past_key_values=cache, use_cache=True)
            tok = ids[:, -1:]
            ts = []
            for _ in range(6):
                if dev == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                model(input_ids=tok, past_key_values=cache, use_cache=True)
                if dev == "cuda":
                    torch.cuda.synchronize()
                ts.append(time.perf_counter() - t)
        out[b] = statistics.median(ts[1:]) * 1e3
        del cache
    return out


def run_hf_peer(argv) -> dict[int, float]:
    """The HF peer in a subprocess (before this process touches the accelerator)."""
    import subprocess
    args = [sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:]), "--hf-only"]
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=float(os.environ.get("HF_PEER_TIMEOUT", 150)))
    except subprocess.TimeoutExpired:
        print("# HF peer timed out")
        return {}
    if r.returncode != 0:
        print(f"# HF peer failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
        return {}
    return {int(k): v for k, v in json.loads(r.stdout.strip().splitlines()[-1]).items()}


def prefill_variants(a) -> list[tuple[str, str, dict, dict]]:
    """The first prefill length again with one choice changed: (row kind, label, Precision
    changes, environment variables)."""
    out = []
    if a.compare_flash:  # JAX's Triton flash attention instead of materialized float32 scores
        out.append(("prefill_flash", "flash", dict(prefill_attention="flash"), {}))
    if a.compare_mosaic:  # the routed experts' W8A16 GEMMs on kernels_pallas/grouped_gemm_mgpu.py
        out.append(("prefill_mosaic_grouped", "mosaic grp", {}, {"DEEPSEEK_JAX_GROUPED_GPU": "mosaic_gpu"}))
    if a.compare_w8a8:  # activations quantized 1x128: e4m3 wgmma for the experts and dense layers
        out.append(("prefill_w8a8_mosaic", "w8a8 mosaic", dict(fp8_mode="w8a8"),
                    {"DEEPSEEK_JAX_W8A8_GPU": "mosaic_gpu"}))
    return out


@contextlib.contextmanager
def env_set(env: dict):
    """Set environment variables for a block, then restore what the caller had."""
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="tiny config on CPU (smoke test)")
    ap.add_argument("--layers", type=at_least(2), default=4, help="1 dense + (layers-1) MoE layers at real width")
    ap.add_argument("--batches", type=int_list(), default=None, help="decode batch sizes (default 1,16,64,256; small: 1,4)")
    ap.add_argument("--context", type=positive_int, default=None, help="cache length (default 4096; small: 64)")
    ap.add_argument("--prefill", type=int_list(), default=None, help="prompt lengths (default 4096,32768; small: 32,64)")
    ap.add_argument("--chunk", type=positive_int, default=None, help="prefill chunk (default 4096; small: 32)")
    ap.add_argument("--long-chunk", type=positive_int, default=None,
                    help="chunk for prompts over 8192 tokens (default 1024: bounds the absorbed scores)")
    ap.add_argument("--hf-batches", type=int_list(), default=None, help="HF peer batch sizes (default 1,16; small: 1,4)")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF transformers peer")
    ap.add_argument("--compare-in-place", action=argparse.BooleanOptionalAction, default=True,
                    help="also time batch-1 decode with per-layer weight slices (weights_in_place=False)")
    ap.add_argument("--profile", default=None,
                    help="decode batch sizes to profile per kernel (default 1,16; small: 1; 'none')")
    ap.add_argument("--unroll-batches", default=None,
                    help="decode batch sizes also timed with the layer loop unrolled "
                         "(Precision.scan_unroll; default none: no gain on the H200 in session 3)")
    ap.add_argument("--compare-flash", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the first prefill length with Precision.prefill_attention='flash'")
    ap.add_argument("--rows", default="decode,prefill,generator",
                    help="which rows: decode (with the HF peer), prefill, generator (default all three)")
    ap.add_argument("--gen-batches", type=int_list(), default=None, help="Generator batch sizes (default 1,16; small: 1,2)")
    ap.add_argument("--gen-prompt", type=positive_int, default=None,
                    help="Generator prompt tokens (default 1024; small: 16): its prefill is one naive pass "
                         "over the whole batch, whose scores grow with batch x prompt^2")
    ap.add_argument("--gen-tokens", type=positive_int, default=None, help="Generator new tokens (default 64; small: 8)")
    ap.add_argument("--compare-mosaic", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the first prefill length with the Mosaic GPU grouped kernel "
                         "(DEEPSEEK_JAX_GROUPED_GPU=mosaic_gpu: W8A16 experts dequantized in a wgmma kernel)")
    ap.add_argument("--compare-w8a8", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the first prefill length in fp8_mode='w8a8' with the Mosaic GPU "
                         "kernels (e4m3 wgmma: grouped W8A8 experts, DEEPSEEK_JAX_W8A8_GPU=mosaic_gpu)")
    ap.add_argument("--compare-mosaic-mla", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the first decode batch >= 64 with the Mosaic GPU MLA kernel "
                         "(DEEPSEEK_JAX_MLA_GPU=mosaic_gpu)")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--hf-only", action="store_true", help=argparse.SUPPRESS)  # the peer's subprocess
    a = ap.parse_args(argv)
    small = a.small
    batches = a.batches or ([1, 4] if small else [1, 16, 64, 256])
    context = a.context or (64 if small else 4096)
    prefills = a.prefill or ([32, 64] if small else [4096, 32768])
    chunk = a.chunk or (32 if small else 4096)
    long_chunk = a.long_chunk or (16 if small else 1024)
    try:   # (either may be 'none')
        profile = [] if a.profile == "none" else int_list()(a.profile or ("1" if small else "1,16"))
        unroll = int_list()(a.unroll_batches) if a.unroll_batches not in (None, "none") else []
    except argparse.ArgumentTypeError as e:
        ap.error(f"--profile / --unroll-batches: {e} (or 'none')")
    hf_batches = a.hf_batches or ([1, 4] if small else [1, 16])
    what = set(a.rows.split(","))
    if not what or what - {"decode", "prefill", "generator"}:
        ap.error(f"--rows {a.rows!r}: expected a comma list of decode, prefill, generator")
    if "decode" not in what:
        batches, unroll, a.compare_in_place, a.no_hf = [], [], False, True
    if "prefill" not in what:
        prefills = []
    gen_batches = (a.gen_batches or ([1, 2] if small else [1, 16])) if "generator" in what else []
    gen_prompt, gen_tokens = a.gen_prompt or (16 if small else 1024), a.gen_tokens or (8 if small else 64)
    cfg = bench_config(a.layers, small, mtp=bool(gen_batches))
    if a.hf_only:  # runs in its own process: torch and XLA would otherwise fight over GPU memory
        print(json.dumps(hf_decode_ms(cfg, hf_batches, context, small)))
        return 0
    hf = {} if a.no_hf else run_hf_peer(argv)
    key = jax.random.PRNGKey(0)
    print(f"# e2e {datetime.date.today()} jax {jax.__version__} {jax.devices()[0].device_kind} "
          f"layers={cfg.num_hidden_layers} (dense {cfg.num_dense_layers}) experts={cfg.n_routed_experts}")
    bw = hbm_bandwidth(2 ** 24 if small else 2 ** 32)
    flops = fp8_dot_flops(small)
    print(f"# measured: copy bandwidth {bw / 1e12:.2f} TB/s, fp8 dot {flops / 1e12:.1f} TFLOP/s")
    model = random_model(cfg, key)
    rows = []

    def save():  # after every row, so a run cut short still leaves what it measured
        if a.json:
            with open(a.json, "w") as f:
                json.dump(dict(date=str(datetime.date.today()), jax=jax.__version__,
                               device=jax.devices()[0].device_kind, bandwidth=bw, fp8_flops=flops,
                               hf_ms=hf, rows=rows), f, indent=1)
    from deepseek_jax.model import weights_in_place
    print(f"# FP8 weights read in place (Precision.weights_in_place): {weights_in_place(model.moe_layers)}")
    print(f"{'what':<26}{'time':>12}{'tok/s':>12}{'roofline':>12}{'x roofline':>12}{'HF ms':>10}{'vs HF':>8}")
    for b in batches:
        t, prof, touched = bench_decode(cfg, model, b, context, key, profile=b in profile)
        roof = step_bytes(cfg, model, b, context, touched) / bw
        h = hf.get(b)
        rows.append(dict(kind="decode", batch=b, context=context, ms=t * 1e3, tok_s=b / t, roofline_ms=roof * 1e3,
                         hf_ms=h, touched_experts=touched, uniform_touched=expected_touched(cfg, b)))
        save()
        print(f"{'decode B=%d ctx=%d' % (b, context):<26}{t * 1e3:>10.3f}ms{b / t:>12,.0f}{roof * 1e3:>10.3f}ms"
              f"{t / roof:>12.2f}{(h or float('nan')):>10.2f}{(h / 1e3 / t if h else float('nan')):>8.1f}")
        print(f"#   distinct routed experts read per MoE layer: {touched:.1f} of {cfg.n_routed_experts} "
              f"(uniform routing would give {expected_touched(cfg, b):.1f}); the roofline counts these")
        if prof:
            print_table(f"decode B={b}", *prof)
            rows[-1]["profile"] = dict(busy_us=prof[1], wall_us=prof[2],
                                       kernels=[list(r) for r in prof[0][:40]])
            save()
    if a.compare_in_place and weights_in_place(model.moe_layers):
        # the same weights with per-layer slices (the 2026-11-28 behaviour), batch 1, side by side
        sliced = same_weights(model, Precision(dtype=jnp.bfloat16, weights_in_place=False))
        t, _, touched = bench_decode(cfg, sliced, 1, context, key)
        roof = step_bytes(cfg, model, 1, context, touched) / bw
        rows.append(dict(kind="decode_sliced", batch=1, context=context, ms=t * 1e3, tok_s=1 / t,
                         roofline_ms=roof * 1e3))
        save()
        print(f"{'decode B=1, sliced layers':<26}{t * 1e3:>10.3f}ms{1 / t:>12,.0f}{roof * 1e3:>10.3f}ms"
              f"{t / roof:>12.2f}")
        del sliced
    if unroll:  # the same weights, the layer loop as straight-line code: loop / launch overhead
        prec = model.moe_layers.self_attn.kv_b_proj.prec
        unrolled = same_weights(model, dataclasses.replace(prec, scan_unroll=True))
        for b in unroll:
            t, _, touched = bench_decode(cfg, unrolled, b, context, key)
            roof = step_bytes(cfg, model, b, context, touched) / bw
            h = hf.get(b)
            rows.append(dict(kind="decode_unrolled", batch=b, context=context, ms=t * 1e3, tok_s=b / t,
                             roofline_ms=roof * 1e3, hf_ms=h))
            save()
            print(f"{'decode B=%d, unrolled' % b:<26}{t * 1e3:>10.3f}ms{b / t:>12,.0f}{roof * 1e3:>10.3f}ms"
                  f"{t / roof:>12.2f}{(h or float('nan')):>10.2f}{(h / 1e3 / t if h else float('nan')):>8.1f}")
        del unrolled
    for b in ([x for x in batches if x >= 64][:1] if a.compare_mosaic_mla else []):
        # the same weights, attention on the Mosaic GPU MLA kernel (kernels_pallas/mla_decode_mgpu.py)
        try:  # never compiled on a GPU before: a failure is a row, not the end of the run
            with env_set({"DEEPSEEK_JAX_MLA_GPU": "mosaic_gpu"}):
                t, _, touched = bench_decode(cfg, model, b, context, key)
        except Exception as e:  # noqa: BLE001 - report whatever the compiler or runtime raised
            rows.append(dict(kind="decode_mosaic_mla", batch=b, failed=f"{type(e).__name__}: {e}"[:300]))
            print(f"{'decode B=%d, mosaic mla' % b:<26} failed: {type(e).__name__}: {str(e)[:200]}")
        else:
            roof = step_bytes(cfg, model, b, context, touched) / bw
            rows.append(dict(kind="decode_mosaic_mla", batch=b, context=context, ms=t * 1e3, tok_s=b / t,
                             roofline_ms=roof * 1e3))
            print(f"{'decode B=%d, mosaic mla' % b:<26}{t * 1e3:>10.3f}ms{b / t:>12,.0f}{roof * 1e3:>10.3f}ms"
                  f"{t / roof:>12.2f}")
        save()
    active = prefill_gemm_params(cfg, model)
    for T in prefills:
        t, prof = bench_prefill(cfg, model, T, min(chunk if T <= 8192 else long_chunk, T),
                                profile=T == prefills[0] and bool(profile))
        roof = 2 * active * T / flops
        rows.append(dict(kind="prefill", tokens=T, s=t, tok_s=T / t, roofline_s=roof))
        save()
        print(f"{'prefill T=%d' % T:<26}{t:>11.3f}s{T / t:>12,.0f}{roof:>11.3f}s{t / roof:>12.2f}")
        if prof:
            print_table(f"prefill T={T}", *prof)
            rows[-1]["profile"] = dict(busy_us=prof[1], wall_us=prof[2],
                                       kernels=[list(r) for r in prof[0][:40]])
            save()
        if T == prefills[0]:  # the same weights, one choice changed per row, side by side
            prec = model.moe_layers.self_attn.kv_b_proj.prec
            for kind, label, changes, env in prefill_variants(a):
                m2 = same_weights(model, dataclasses.replace(prec, **changes)) if changes else model
                try:  # untried kernels: a failure is a row, not the end of the run
                    with env_set(env):  # read when tracing: a fresh jit picks it up
                        t, _ = bench_prefill(cfg, m2, T, min(chunk if T <= 8192 else long_chunk, T))
                except Exception as e:  # noqa: BLE001 - report whatever the compiler or runtime raised
                    rows.append(dict(kind=kind, tokens=T, failed=f"{type(e).__name__}: {e}"[:300]))
                    print(f"{'prefill T=%d, %s' % (T, label):<26} failed: {type(e).__name__}: {str(e)[:200]}")
                else:
                    rows.append(dict(kind=kind, tokens=T, s=t, tok_s=T / t, roofline_s=roof))
                    print(f"{'prefill T=%d, %s' % (T, label):<26}{t:>11.3f}s{T / t:>12,.0f}{roof:>11.3f}s"
                          f"{t / roof:>12.2f}")
                save()
                del m2
    for b in gen_batches:
        try:  # the speculative loop at real width is new on a GPU: a failure is a row
            g = bench_generator(model, b, gen_prompt, gen_tokens)
        except Exception as e:  # noqa: BLE001 - report whatever the compiler or runtime raised
            rows.append(dict(kind="generator", batch=b, failed=f"{type(e).__name__}: {e}"[:300]))
            save()
            print(f"{'generator B=%d' % b:<26} failed: {type(e).__name__}: {str(e)[:200]}")
            continue
        for mode, r in g.items():
            rows.append(dict(kind="generator", batch=b, mode=mode, prompt=gen_prompt, new_tokens=gen_tokens,
                             tok_s=r["decode_tok_s"], **r))
            print(f"{'generator B=%d, %s' % (b, mode):<26}{r['iter_ms']:>10.3f}ms{r['decode_tok_s']:>12,.0f}"
                  f"   (per decode-loop iteration; prompt {gen_prompt}, {r['iterations']} iterations, "
                  f"prefill {r['prefill_ms']:.1f} ms)")
        save()
        ratio = g["mtp"]["iter_ms"] / g["plain"]["iter_ms"]
        print(f"#   MTP iteration / plain iteration = {ratio:.2f}: speed-up at acceptance 0.85 / 0.90 = "
              f"{1.85 / ratio:.2f}x / {1.90 / ratio:.2f}x (random weights here: measured acceptance "
              f"{g['mtp']['acceptance'] or 0:.0%}, not meaningful)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
