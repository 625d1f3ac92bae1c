"""The real-width model and every Pallas kernel compiled for an H200 and for TPUs on this CPU host.

``kernels_pallas.aot`` runs XLA's whole compiler for an accelerator that is not there (the CUDA
PJRT plugin's and libtpu's "deviceless" compilation). ``benchmarks/gpu_compile.py`` compiles the
decode step that ``benchmarks/e2e_gpu.py`` times (1 dense + 3 MoE layers at real width, 8 steps
in an on-device loop) and counts its kernel launches per step, and compiles each Pallas GPU
kernel at the SPEC §11 shapes through Triton's PTX compile for sm_90. ``benchmarks/tpu_compile.py``
compiles each Pallas TPU kernel through Mosaic for TPU v5p, v6e and TPU7x, and the real-width
decode and prefill programs for one v5p chip. These tests run them in subprocesses (a plugin has
to be importable before jax starts) and check:

* the decode step's launches stay within budget and no layer runs a loop of its own: a batch-1
  step launched 349.8 kernels before ``jnp.searchsorted``'s while loop left the grouped GEMM's
  tile schedule (9 trips of 4 launches per MoE layer) and the router's group ``top_k`` + scatter
  became a rank mask; the 2026-11-28 H200 profile counted 338 for the code of then;
* every kernel compiles for each device, and a configuration too big for it fails there: the
  MLA kernel's 128-head, 32-token blocks ask an H200 for 262,144 bytes of shared memory, the
  message the lent H200 gave for them on 2026-11-28, and 256 MiB of VMEM scratch fits no TPU;
* the model's TPU programs hold the TPU kernels (no TPU is reachable here: until now the TPU path
  ran only in the Pallas interpreter);
* one training step (``benchmarks/train_compile.py``: the ``Trainer``'s ``loss_and_grads`` and
  ``apply`` programs) compiles for an H200 and for one v5p chip, full training of a BF16 model and
  LoRA over FP8 weights, with the device's Pallas kernels in the forward and the backward.

The wheels go to ``.gpu_aot/`` and ``.tpu_aot/`` (``.ci/run`` puts them there; or
``$DEEPSEEK_JAX_GPU_AOT`` / ``$DEEPSEEK_JAX_TPU_AOT``); without them those tests skip. The launch
census parser is tested on CPU HLO, always.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from kernels_pallas import aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGINS = os.environ.get("DEEPSEEK_JAX_GPU_AOT", os.path.join(ROOT, ".gpu_aot"))
TPU_PLUGIN = os.environ.get("DEEPSEEK_JAX_TPU_AOT", os.path.join(ROOT, ".tpu_aot"))
needs_plugin = pytest.mark.skipif(not os.path.isdir(os.path.join(PLUGINS, "jax_plugins")),
                                  reason=f"no CUDA plugin wheels in {PLUGINS} (see kernels_pallas/aot.py)")
needs_libtpu = pytest.mark.skipif(not os.path.isdir(os.path.join(TPU_PLUGIN, "libtpu")),
                                  reason=f"no libtpu in {TPU_PLUGIN} (see kernels_pallas/aot.py)")
TOPOLOGIES = ("v5p:2x2x1", "v6e:2x2", "tpu7x:2x2x1")
#: 4-device meshes the real-width decode step is compiled on (``--meshes``): the experts split,
#: and the batch and the heads split at once. ``data=4`` and ``model=4`` alone were dropped: the
#: four meshes took ~170 s of the TPU report's 317 s, and the mixed mesh splits both axes.
MESHES = "expert=4;data=2,model=2"

#: Launches per decode step of the 4-layer real-width model, the benchmark's loop and the
#: Generator's (measured 117.5 / 134.5 and 115.0 / 132.0 at batch 1 / 16 when this was written,
#: the Generator's with its loop state donated, as it is compiled; without, a per-call copy of the
#: cache on entry counted as a per-step launch; 152.5 / 166.5 at the start of session 10,
#: 219.8 / 226.8 at the start of session 9, 349.8 / 352.8 before session 7).
DECODE_BUDGET = {1: 126, 16: 144}
#: MB that XLA's own kernels in the attention scope move per layer per decode step (measured 0.05,
#: 0.5 and 0.0 at batch 1, 16 and 64; 4.4 and 36.5 when XLA merged the MLA kernel's split-T partial
#: sums; 25.2 at batch 64 when XLA cast its float32 o_lat to bf16 for the W_UV kernel; 172 and 126
#: when XLA computed the absorbed products itself, writing float32 / bf16 copies of ``kv_b_proj``).
ATTN_XLA_MB_PER_LAYER = {1: 1, 16: 4, 64: 1}
#: GB XLA's own ops in the attention move in a 4096-token prefill in 1024-token chunks (measured
#: 93.7; 148.4 when the chunks' [B, H, T, S] float32 scores were transposed from [B, T, H, S]).
PREFILL_ATTN_XLA_GB = 110
#: The same with ``prefill_attention="flash"`` (measured 6.8).
FLASH_PREFILL_ATTN_XLA_GB = 10
#: MB XLA's own ops write per decode step on one v5p chip (measured 143 and 476; 266 and 822 when
#: XLA's scatter wrote the cache, the program transposed the whole cache in and out, and XLA
#: expanded the FP8 GEMM's block scales to every column per call).
TPU_WRITTEN_MB = {1: 200, 64: 560}
#: Grid steps of the Pallas kernels per decode step on one v5p chip (aot.grid_steps; measured
#: 1,032 and 18,360; 14,460 and 139,200 with 512 x 512 weight tiles, one head per MLA absorb step
#: and the grouped GEMM's visits bounded by the padded rows).
TPU_GRID_STEPS = {1: 1300, 64: 21000}
#: GB XLA's own ops in the attention move in that prefill on one v5p chip with
#: ``prefill_attention="flash"`` (the TPU flash kernel; measured 1.8, against 122.6 plain).
TPU_FLASH_PREFILL_ATTN_XLA_GB = 4
#: Launches per MoE layer per step (measured 29 / 34; 39 / 44 at the start of session 10, 59 / 62
#: at the start of session 9, 102 / 104 before session 7).
MOE_LAYER_BUDGET = {1: 31, 16: 36}
#: The train steps compiled here (``benchmarks/train_compile.py``): 1 dense + 1 MoE layer at the
#: script's small width (hidden 1024, DeepSeek-V3's head sizes, 16 experts), no MTP layer, one
#: 128-token row, flash attention. The LoRA model's ``q_a_proj`` has no adapter: with 128 rows the
#: GPU's FP8 GEMM hands its split-K partials to the norm kernel unsummed, and the step
#: differentiates through them.
TRAIN_ARGS = ("--layers", "2", "--no-mtp", "--batch", "1", "--seq", "128", "--prefill-attention", "flash",
              "--lora-targets", "q_b_proj,kv_a_proj_with_mqa,o_proj,gate_proj,up_proj,down_proj")


def test_launch_census_multiplies_trip_counts():
    """A fusion inside a 3-trip scan inside a 5-trip loop launches 15 times per call; bookkeeping
    and fused computations launch nothing."""
    def f(x):
        def outer(i, x):
            return jax.lax.scan(lambda c, _: (jnp.sin(c) * 2 + jnp.cumsum(c), None), x, None, length=3)[0]
        return jax.lax.fori_loop(0, 5, outer, x)

    items = aot.launches(jax.jit(f).lower(jnp.ones(1000)).compile().as_text())
    inner = [i for i in items if i.loops == "while5/while3"]
    assert inner and all(i.count == 15 for i in inner), items
    assert all(i.count == {"": 1, "while5": 5, "while5/while3": 15}[i.loops] for i in items), items
    assert not any(i.kind in ("parameter", "constant", "tuple", "get-tuple-element", "while") for i in items)
    counts = aot.tally(items, lambda i: i.loops)
    assert counts["while5/while3"] == 15 * len(inner)


def test_launch_bytes_count_slices_and_in_place_updates():
    """The bytes a fusion moves: one row taken of a 1 MB array by a dynamic slice reads that row;
    one row written into it in place (a donated dynamic-update-slice) writes that row; a plain
    elementwise fusion reads and writes its whole operands."""
    def f(big, upd, i):
        row = jax.lax.dynamic_index_in_dim(big, i, 0, False) * 2.0
        return jax.lax.dynamic_update_index_in_dim(big, upd, i, 0), jnp.sin(row), jnp.cos(upd) + 1

    hlo = jax.jit(f, donate_argnums=0).lower(jnp.ones((1000, 256)), jnp.ones(256), 3).compile().as_text()
    fusions = {i.op_name.split("/")[-1]: i for i in aot.launches(hlo) if i.kind.startswith("fusion")}
    row = 256 * 4
    assert fusions["sin"].read <= row + 8 and fusions["sin"].written == row, fusions
    update = [i for i in fusions.values() if "dynamic_update" in i.op_name]
    assert update and update[0].written == row and update[0].read <= row + 8, fusions
    assert fusions["add"].read == row and fusions["add"].written == row, fusions


def test_scope_of_takes_the_innermost_named_scope():
    path = "jit(steps)/while/body/moe/experts/jit(searchsorted)/reduce_sum"
    assert aot.scope_of(path, ("moe", "experts")) == "experts"
    assert aot.scope_of(path, ("moe",)) == "moe"
    assert aot.scope_of("", ("moe",)) == "other"


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_compile_without_the_plugin_is_one_line(platform):
    if aot.available(platform):
        pytest.skip(f"the {platform} plugin is loaded in this process")
    with pytest.raises(RuntimeError, match=rf"^compile_for_{platform}: no {platform.upper()} compiler") as e:
        getattr(aot, f"compile_for_{platform}")(lambda x: x, jnp.ones(3))
    assert "\n" not in str(e.value)


def _run(tmp_path_factory, script, plugins, *args):
    out = tmp_path_factory.mktemp("aot") / "report.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEEPSEEK_JAX_") and k != "XLA_FLAGS"}
    r = subprocess.run([sys.executable, script, "--plugins", plugins, *args, "--json", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode in (0, 1) and out.exists(), r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(out.read_text())


def _once(tmp_path_factory, name, make):
    """``make()``'s JSON, made once per test run: the first pytest-xdist worker to ask makes it
    under a lock in the run's shared temporary directory and the others read it. Each report is
    minutes of compiling, and a module fixture was made by every worker that ran one of its
    tests (twice per run when ``-n 2`` split the module: 269 s each for the TPU report)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return make()
    root = tmp_path_factory.getbasetemp().parent        # this run's, shared by its workers
    path = root / f"{name}.json"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)                # released when the file closes
        if not path.exists():
            data = make()
            path.with_suffix(".tmp").write_text(json.dumps(data))
            path.with_suffix(".tmp").rename(path)
        return json.loads(path.read_text())


@pytest.fixture(scope="session")
def report(tmp_path_factory):
    return _once(tmp_path_factory, "gpu_report", lambda: _run(
        tmp_path_factory, "benchmarks/gpu_compile.py", PLUGINS, "--batches", "1,16,64", "--generator",
        "--prefill", "4096", "--prefill-attention", "plain,flash", "--meshes", MESHES))


@pytest.fixture(scope="session")
def tpu_report(tmp_path_factory):
    return _once(tmp_path_factory, "tpu_report", lambda: _run(
        tmp_path_factory, "benchmarks/tpu_compile.py", TPU_PLUGIN, "--topologies", ",".join(TOPOLOGIES),
        "--model", "--attention-backward", "2048", "--meshes", MESHES))


@needs_plugin
@pytest.mark.parametrize("batch", [1, 16])
def test_decode_step_launches_within_budget(report, batch):
    row = {r["program"]: r for r in report["rows"]}[f"decode B={batch} ctx=4096"]
    assert row["launches"] <= DECODE_BUDGET[batch], row["scopes"]
    assert row["per_moe_layer"] <= MOE_LAYER_BUDGET[batch], row["scopes"]
    # the decode loop and the MoE layers' scan, nothing inside a layer (searchsorted's loop was)
    assert set(row["loops"]) <= {"", "while8", "while8/while3"}, row["loops"]
    kinds = row["kinds"]
    # per step: 3 grouped GEMMs per MoE layer, the MLA kernel in each of the 4 layers, and the
    # FP8 projections on the W8A16 kernel (q_a, q_b, kv_a, o in every layer; shared experts / MLP)
    assert kinds["pallas:grouped_gemm_gpu"] == 9 and kinds["pallas:mla_decode_gpu_split"] == 4, kinds
    assert kinds["pallas:w8a16_gemm_gpu"] == 28, kinds
    # MLA's two absorbed products through kv_b_proj's FP8 weight, in every layer (the second
    # merging the decode kernel's split-T partials); the router's selection in every MoE layer;
    # each layer's input norm and q_a_layernorm, and its post-attention residual add + norm
    assert kinds["pallas:mla_absorb_k_gpu"] == 4 and kinds["pallas:mla_absorb_v_gpu"] == 4, kinds
    assert kinds["pallas:moe_route_gpu"] == 3, kinds
    assert kinds["pallas:rms_norm_gpu"] == 8 and kinds["pallas:add_rms_norm_gpu"] == 4, kinds
    # each layer's new cache entry: kv_a_layernorm, k_pe's rope and the write in one kernel, and
    # no copy of the cache for it (the kernel's output aliases the cache in the loop carry)
    assert kinds["pallas:write_latent_gpu"] == 4 and kinds.get("copy", 0) <= 2.5, kinds


@needs_plugin
@pytest.mark.parametrize("batch", [1, 16, 64])
def test_decode_attention_moves_no_weight_copies(report, batch):
    """Bytes that XLA's own kernels in the attention scope move per decode step, from the compiled
    HLO's shapes (``aot.launches``): without the absorbed-product kernel XLA dequantized and
    transposed ``kv_b_proj``'s whole weight for them (float32 at batch 1: 33.5 MB written and read
    back per product per layer, against 16.8 MB of FP8 weight)."""
    row = {r["program"]: r for r in report["rows"]}[f"decode B={batch} ctx=4096"]
    per_layer = row["xla_mb"].get("attn", 0.0) / 4
    assert per_layer <= ATTN_XLA_MB_PER_LAYER[batch], row["xla_top"]


@needs_plugin
def test_chunked_prefill_attention_transposes_no_scores(report):
    """A 4K prompt in 1K chunks: the later chunks' absorbed attention has float32 scores
    ``[1, 128, 1024, 4096]`` (2.1 GB) per layer. Computed in the order the product gives them
    (``[B, T, H, S]``), they are written once and read once by the softmax; as ``[B, H, T, S]``,
    XLA also transposed them (2.1 GB read and written again per chunk and layer)."""
    row = {r["program"]: r for r in report["rows"]}["prefill T=4096"]
    assert row["xla_mb"]["attn"] / 1e3 <= PREFILL_ATTN_XLA_GB, row["xla_top"]


@needs_plugin
def test_flash_prefill_chunks_write_no_scores(report):
    """``prefill_attention="flash"``: the later chunks expand the cache by ``kv_b_proj`` and run
    ``kernels_pallas.cached_attention``; the attention's XLA ops then move the expansion, not
    scores (measured 6.8 GB against 93.7 plain), and the program holds the kernel."""
    row = {r["program"]: r for r in report["rows"]}["prefill T=4096 flash"]
    assert row["xla_mb"]["attn"] / 1e3 <= FLASH_PREFILL_ATTN_XLA_GB, row["xla_top"]
    assert row["kinds"].get("pallas:cached_attention_gpu", 0) >= 4, row["kinds"]


@needs_plugin
@pytest.mark.parametrize("batch", [1, 16])
def test_generator_decode_loop_launches_within_budget(report, batch):
    """The Generator's own greedy decode loop (a while loop until done, so one iteration is
    counted): the same per-step budget as the benchmark's loop, which also computes the routing
    statistics (the generator's are dead code and compiled away)."""
    row = {r["program"]: r for r in report["rows"]}[f"generator B={batch} ctx=4096"]
    assert row["launches"] <= DECODE_BUDGET[batch], row["scopes"]
    assert row["scopes"].get("moe_stats", 0) == 0, row["scopes"]
    assert set(row["loops"]) <= {"", "while?", "while?/while3"}, row["loops"]


@needs_plugin
def test_every_pallas_gpu_kernel_compiles_for_sm90(report):
    kernels = report["kernels"]
    assert len(kernels) >= 10
    bad = [k for k in kernels if not k["must_fail"] and not k["compiled"]]
    assert not bad, bad
    control = [k for k in kernels if k["must_fail"]]
    assert control and all(not k["compiled"] and "requested 262144, available: 232448" in k["error"]
                           for k in control), control


@needs_libtpu
@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_every_pallas_tpu_kernel_compiles(tpu_report, topology):
    kernels = tpu_report["kernels"][topology]
    assert len(kernels) >= 10
    bad = [k for k in kernels if not k["must_fail"] and not k["compiled"]]
    assert not bad, bad
    control = [k for k in kernels if k["must_fail"]]
    assert control and all(not k["compiled"] and "vmem" in k["error"] for k in control), control


@needs_libtpu
def test_real_width_model_compiles_for_a_tpu_chip_with_the_tpu_kernels(tpu_report):
    """Decode at batch 1 and 64 and a 4096-token prefill, 1 dense + 3 MoE layers at real width,
    for one v5p chip: the MoE layers' experts on the grouped TPU kernel (3 GEMMs, in the layer
    scan), attention on the MLA TPU kernel (dense layer + scan body), FP8 projections on the TPU
    FP8 GEMM kernel."""
    rows = {r["program"].split(" (")[0]: r for r in tpu_report["model"]}
    for name in ("decode B=1 ctx=4096", "decode B=64 ctx=4096"):
        k = rows[name]["kernels"]
        assert k.get("grouped_gemm_tpu") == 3 and k.get("mla_decode_tpu") == 2, k
        assert k.get("w8a16_gemm_tpu", 0) >= 14, k
        assert k.get("mla_absorb_k_tpu") == 2 and k.get("mla_absorb_v_tpu") == 2, k
        assert k.get("store_latent_tpu") == 2, k
    assert rows["prefill T=4096"]["kernels"].get("grouped_gemm_tpu", 0) >= 3


@needs_libtpu
@pytest.mark.parametrize("batch", [1, 64])
def test_tpu_decode_step_copies_no_weights_or_cache(tpu_report, batch):
    """Megabytes XLA's own ops write per decode step on one v5p chip (from the HLO's shapes): the
    TPU kernels read a layer of the stacked weights and of the latent cache in place. When they
    took a slice, XLA copied every layer's weights (o_proj: 117 MB) and at batch 64 its cache
    (302 MB) at every step: 1,564 MB written per step at batch 1 and 3,636 at 64; then 266 and
    822 (822 with the loop's transposes of its whole cache in and out, 151 MB a step); now 143
    and 476."""
    row = {r["program"].split(" (")[0]: r for r in tpu_report["model"]}[f"decode B={batch} ctx=4096"]
    assert row["xla_written_mb"] <= TPU_WRITTEN_MB[batch], row["xla_top"]
    # no XLA op writes a layer's cache (302 MB at batch 64): a TPU keeps the [.., S, 576] cache with
    # S minor, and the MLA kernel and the cache write (store_latent_tpu) use it as it is. With a
    # row-major kernel operand and XLA's scatter the program transposed the whole stacked cache
    # on entry and exit (906 + 302 MB each way); reading it transposed but writing it by scatter
    # transposed it around every layer.
    cache_layer_mb = batch * 4096 * 576 * 2 / 1e6
    # (copy-start: XLA prefetching a weight into VMEM, a read the step makes anyway)
    big = [t for t in row["xla_top"] if t["written_mb"] >= cache_layer_mb and t["kind"] != "copy-start"]
    assert not big, big


@needs_libtpu
@pytest.mark.parametrize("batch", [1, 64])
def test_tpu_decode_step_grid_steps_within_budget(tpu_report, batch):
    """A Mosaic kernel runs its grid one step after another, each step with a fixed cost besides
    its DMA: the FP8 GEMMs stream the weights in tiles of up to 2048 x 2048 at decode (4 MiB per
    step, 1024 x 1024 at prefill). With 512 x 512 tiles (256 KB per step) a batch-64 step ran
    139,200 grid steps, 131,040 of them in the grouped GEMMs."""
    row = {r["program"].split(" (")[0]: r for r in tpu_report["model"]}[f"decode B={batch} ctx=4096"]
    assert sum(row["grid_steps"].values()) <= TPU_GRID_STEPS[batch], row["grid_steps"]


@needs_libtpu
def test_tpu_flash_prefill_writes_no_scores(tpu_report):
    """A 4096-token prefill in 1024-token chunks on one v5p chip with ``prefill_attention="flash"``:
    the first chunk and the later ones (over the cache) run ``cached_attention_tpu`` reading
    ``kv_b_proj``'s output in its token-major layout. The plain form moved 122.6 GB in the
    attention's XLA ops (float32 scores, softmax, transposes) with 4.58 GiB of temporaries."""
    rows = {r["program"].split(" (")[0]: r for r in tpu_report["model"]}
    flash, plain = rows["prefill T=4096 flash"], rows["prefill T=4096"]
    assert flash["kernels"].get("cached_attention_tpu", 0) >= 2, flash["kernels"]
    assert "cached_attention_tpu" not in plain["kernels"], plain["kernels"]
    assert flash["xla_mb"]["attn"] / 1e3 <= TPU_FLASH_PREFILL_ATTN_XLA_GB, flash["xla_top"]
    assert flash["temp_gib"] < plain["temp_gib"] / 2, (flash["temp_gib"], plain["temp_gib"])


@needs_libtpu
def test_tpu_attention_backward_kernels_write_no_scores(tpu_report):
    """One layer's flash attention forward and backward (2048 tokens, 128 heads) on one v5p chip:
    with the backward kernels (``kernels_pallas.attention_bwd``) XLA's own ops only lay out the
    inputs and gradients; with the blocked jnp backward its loop writes and reads each key block's
    float32 scores (at 4096 tokens, 144.7 GB in 410 ops against 3.3 GB in 38)."""
    rows = {r["backward"]: r for r in tpu_report["attention_backward"]}
    old, new = rows["blocked jnp"], rows["kernels"]
    assert old["xla_gb"] > 10 * new["xla_gb"] and old["xla_ops"] > 3 * new["xla_ops"], (old, new)
    # what is left: about a dozen layout passes over the inputs and gradients (2 x 2048 x 128 x 512 x 2 bytes each)
    assert new["xla_gb"] < 16 * 2 * 2048 * 128 * 512 * 2 / 1e9, new


@needs_libtpu
def test_decode_step_compiles_on_every_tpu_mesh(tpu_report):
    """4 chips of a v5p, expert parallel, and data + tensor parallel at once: Mosaic refuses a
    Pallas call GSPMD would have to split, so every kernel call runs in a ``shard_map``
    (``deepseek_jax.kernel_mesh``). Before it, each of these failed to compile ("Mosaic kernels
    cannot be automatically partitioned"). No all-gather where no axis splits the experts."""
    rows = {r["mesh"]: r for r in tpu_report["meshes"]}
    assert set(rows) == set(MESHES.split(";"))
    assert all(r["compiled"] for r in rows.values()), [r["error"] for r in rows.values()]
    assert rows["data=2,model=2"]["all_gathers"] == 0, rows
    assert all(r["temp_gib"] < 1.0 for r in rows.values()), rows   # the experts read in place


@needs_plugin
def test_decode_step_on_gpu_meshes_gathers_no_weights(report):
    """4 H200s (``expert=4``; ``data=2,model=2``): the kernels per shard instead of GSPMD gathering
    their operands. Before, with ``model=4`` the step all-gathered the tensor-parallel weights (14
    all-gathers, 2.95 GiB of temporaries) and with ``expert=4`` copied each layer's experts
    (2.85 GiB)."""
    rows = {r["mesh"]: r for r in report["meshes"]}
    assert all(r["compiled"] for r in rows.values()), [r["error"] for r in rows.values()]
    assert rows["data=2,model=2"]["all_gathers"] == 0, rows
    assert all(r["temp_gib"] < 0.5 for r in rows.values()), rows


def _train_report(tmp_path_factory, platform, plugins):
    return _run(tmp_path_factory, "benchmarks/train_compile.py", plugins, "--platform", platform, *TRAIN_ARGS)


def _train_step(report, case):
    """``(loss_and_grads row, its forward kernels, its backward kernels)`` of ``case``, after
    checking that both programs compiled and that the optimizer's holds no kernel and writes the
    whole donated train state in place (with BF16 parameters AdamW's first moment came out
    float32, in new buffers, and the state's types changed after the first step)."""
    rows = {r["program"]: r for r in report["rows"] if r["case"] == case}
    assert set(rows) == {"loss_and_grads", "apply"} and all(r["compiled"] for r in rows.values()), \
        [(case, r["program"], r["error"]) for r in rows.values()]
    step, apply = rows["loss_and_grads"], rows["apply"]
    assert not apply["kernels_fwd"] and not apply["kernels_bwd"], apply
    assert apply["alias_gib"] > 0 and apply["output_gib"] - apply["alias_gib"] < 1e-3, apply
    assert 0 < step["peak_gib"] < 1 and 0 < apply["peak_gib"] < 1, (step, apply)
    return step, step["kernels_fwd"], step["kernels_bwd"]


@needs_plugin
def test_train_steps_compile_for_an_h200_with_the_gpu_kernels(tmp_path_factory):
    """One optimizer step (the ``Trainer``'s two programs) compiled for an H200. Full training of
    a BF16 model: the routed experts on the grouped GEMM (gate, up, down) and, in the backward,
    its ``dx`` (the same kernel reading the weights transposed) and ``dw`` kernels; the router's
    selection and the norms on their kernels (their backwards are the references'); attention on
    the Triton flash kernel forward and backward (the backward's unset block sizes made the step
    fail to trace). LoRA over frozen FP8 weights: the projections on the W8A16 kernel (their
    backward for ``x`` XLA's ``dy @ dequant(W)``, through ``q_a_proj``'s split-K partials too,
    which raised NotImplementedError), the FP8 experts' ``dx`` on the grouped kernel and no
    ``dw``; only the adapters train. The HLO holds a scanned layer's body once: counts are per
    program, not per layer. With ``--kernels ref`` every kernel assertion here fails."""
    report = _train_report(tmp_path_factory, "gpu", PLUGINS)
    step, fwd, bwd = _train_step(report, "full")
    assert fwd.get("grouped_gemm_gpu") == 3 and fwd.get("moe_route_gpu", 0) >= 1, fwd
    assert fwd.get("rms_norm_gpu", 0) >= 2 and fwd.get("add_rms_norm_gpu", 0) >= 1, fwd
    assert bwd.get("grouped_gemm_gpu") == 3 and bwd.get("grouped_gemm_dw_gpu") == 3, bwd
    assert fwd.get("mha_forward") == 2 and bwd.get("mha_backward") == 2, (fwd, bwd)
    assert "w8a16_gemm_gpu" not in fwd, fwd   # BF16 weights: XLA's dots
    assert step["trained_params"] > 3e7
    step, fwd, bwd = _train_step(report, "lora")
    assert fwd.get("w8a16_gemm_gpu", 0) >= 10 and fwd.get("grouped_gemm_gpu") == 3, fwd
    assert bwd.get("grouped_gemm_gpu") == 3 and "grouped_gemm_dw_gpu" not in bwd, bwd
    assert bwd.get("mha_backward") == 2, bwd
    assert 0 < step["trained_params"] < 1e6


@needs_plugin
def test_train_step_compiles_sharded_over_four_h200s(tmp_path_factory):
    """Full training's step on a mesh of 4 H200s (``expert=2, model=2``: the ``Trainer``'s
    sharding, parameters and AdamW moments by the ``ep_tp`` rules): the grouped GEMM's forward,
    ``dx`` and ``dw`` kernels run per shard, the optimizer writes the donated state in place, and
    each device holds under 0.6 of the state one device would (parameters, two moments and the
    gradients, 8 bytes per BF16 parameter; 0.44 measured)."""
    report = _run(tmp_path_factory, "benchmarks/train_compile.py", PLUGINS, "--platform", "gpu", "--cases", "full",
                  "--layers", "2", "--no-mtp", "--batch", "2", "--seq", "128", "--mesh", "expert=2,model=2",
                  "--mesh-devices", "4")
    assert report["target"].startswith("4 x "), report["target"]
    rows = {r["program"]: r for r in report["rows"]}
    assert all(r["compiled"] for r in rows.values()), [(r["program"], r["error"]) for r in rows.values()]
    step, apply = rows["loss_and_grads"], rows["apply"]
    assert step["kernels_fwd"].get("grouped_gemm_gpu") == 3, step["kernels_fwd"]
    assert step["kernels_bwd"].get("grouped_gemm_gpu") == 3 and step["kernels_bwd"].get("grouped_gemm_dw_gpu") == 3
    assert apply["alias_gib"] > 0 and apply["output_gib"] - apply["alias_gib"] < 1e-3, apply
    assert apply["argument_gib"] * 2**30 < 0.6 * 8 * apply["trained_params"], apply


@needs_libtpu
def test_train_steps_compile_for_a_tpu_chip_with_the_tpu_kernels(tmp_path_factory):
    """The same two steps for one v5p chip: the grouped TPU kernel forward, ``dx`` and ``dw``
    (megablox ``gmm`` / ``tgmm``; no ``dw`` for the FP8 experts), the FP8 projections on the TPU
    FP8 GEMM, the flash attention on the TPU's ``cached_attention`` kernel and its backward on
    the ``dq`` and ``dkv`` kernels, so XLA's own ops in the attention move less than in the
    q/kv projections' scope (here 23.2 against 47.5 MB; with the blocked jnp backward 45.6
    against 45.8; at real width, one 4096-token sequence and 2 layers, 278.0 GB and 4.8 GB)."""
    report = _train_report(tmp_path_factory, "tpu", TPU_PLUGIN)
    step, fwd, bwd = _train_step(report, "full")
    assert fwd.get("grouped_gemm_tpu") == 3 and fwd.get("cached_attention_tpu") == 2, fwd
    assert bwd.get("grouped_gemm_tpu") == 3 and bwd.get("grouped_gemm_dw_tpu") == 3, bwd
    assert bwd.get("cached_attention_dq_tpu") == 2 and bwd.get("cached_attention_dkv_tpu") == 2, bwd
    assert step["xla_mb"]["attn"] < 0.7 * step["xla_mb"]["qkv"], step["xla_mb"]
    assert step["trained_params"] > 3e7
    step, fwd, bwd = _train_step(report, "lora")
    assert fwd.get("w8a16_gemm_tpu", 0) >= 10 and fwd.get("grouped_gemm_tpu") == 3, fwd
    assert fwd.get("cached_attention_tpu") == 2, fwd
    assert bwd.get("grouped_gemm_tpu") == 3 and "grouped_gemm_dw_tpu" not in bwd, bwd
    assert 0 < step["trained_params"] < 1e6
