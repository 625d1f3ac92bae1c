"""The benchmark scripts still run (tiny shapes on CPU): they are what a GPU session executes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_e2e_benchmark_small(tmp_path):
    out = tmp_path / "e2e.json"
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="1")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "e2e_gpu.py"), "--small", "--no-hf", "--layers", "2", "--batches", "2,64", "--prefill", "32",
                        "--profile", "2", "--unroll-batches", "2", "--gen-batches", "1", "--json", str(out)],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.load(open(out))["rows"]
    assert {r["kind"] for r in rows} == {"decode", "decode_unrolled", "decode_mosaic_mla", "prefill",
                                         "prefill_flash", "prefill_mosaic_grouped", "prefill_w8a8_mosaic",
                                         "generator"}
    assert all(r["tok_s"] > 0 for r in rows)
    gen = {r["mode"]: r for r in rows if r["kind"] == "generator"}   # the Generator, plain and MTP
    assert set(gen) == {"plain", "mtp"} and all(r["iter_ms"] > 0 and r["iterations"] == 7 for r in gen.values())
    prof = rows[0]["profile"]  # the per-kernel table read back from the profiler's trace
    assert prof["busy_us"] > 0 and prof["kernels"] and all(us >= 0 for _, us, _ in prof["kernels"])


def test_e2e_hf_peer_small():
    """The HF transformers peer of benchmarks/e2e_gpu.py (its subprocess mode): run as a script,
    the benchmarks folder is on ``sys.path`` first, where its kernels.py shadowed the ``kernels``
    package transformers imports, and the peer failed ("cannot import name 'CUDAProperties'")."""
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="1")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "e2e_gpu.py"), "--small", "--layers", "2",
                        "--rows", "decode", "--batches", "1", "--hf-batches", "1", "--hf-only"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    ms = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(ms) == {"1"} and ms["1"] > 0


def test_kernel_benchmark_small(tmp_path):
    """benchmarks/kernels.py at tiny shapes in the CPU interpreters: every table runs and each
    kernel row agrees with its reference (the GPU session runs the same code at full shapes)."""
    out = tmp_path / "k.json"
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="1")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "kernels.py"), "--small", "--reps", "1",
                        "--json", str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.load(open(out))
    kernel_rows = [x for x in rows if x["method"].startswith("kernel")]
    assert {x["shape"].split()[0] for x in kernel_rows} == {"prefill", "decode"}
    assert not [x for x in kernel_rows if x["failed"]]
    assert all(float(x["err"].split()[0]) < 3e-2 for x in kernel_rows)  # bf16-level agreement
    assert {x["shape"].split()[1] for x in kernel_rows if "W_U" in x["shape"]} == {"W_UK", "W_UV"}


def test_speculative_benchmark_small(tmp_path):
    """benchmarks/speculative.py on two prompts, with the per-pass costs (which build the
    generator's executables and passes from its own weights and cache layout)."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "speculative.py"), "--prompts", "2",
                        "--batch", "1", "--rounds", "1", "--passes", "--json"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    (row,) = res["rows"]
    assert row["identical"] and row["new_tokens"] > 0 and 0 < row["acceptance"] <= 1
    costs = res["pass_costs_us"]
    assert len(costs) == 12
    # Timed directly: positive. A loop iteration is a difference of two timings (16 iterations less
    # the fixed cost), which one round on a loaded 2-core machine can push below zero.
    derived = {k for k in costs if k.endswith("loop iteration")}
    assert len(derived) == 2 and all(v == v and abs(v) < 1e7 for v in (costs[k] for k in derived))
    assert all(v > 0 for k, v in costs.items() if k not in derived)


def test_chat_prefix_benchmark_small():
    """benchmarks/chat_prefix.py at one short history and one short system prompt: it runs, and
    asserts the reuse itself (and that sharing the system prompt changed no token)."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "chat_prefix.py"), "--histories", "40",
                        "--systems", "40", "--batch", "4", "--repeats", "1"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    chat, batch = r.stdout.split("sharing a system prompt")
    row = [ln for ln in chat.splitlines() if ln.startswith("| 44 |")]
    assert len(row) == 1 and row[0].endswith("x |")
    row = [ln.split("|") for ln in batch.splitlines() if ln.startswith("| 40 |")]
    assert len(row) == 1 and row[0][3].strip() == "32" and row[0][-2].strip().endswith("x")


def test_score_texts_benchmark_small():
    """benchmarks/score_texts.py on 6 short texts with its HF peer: it runs, and the engines'
    log-probs agree (the last column of each of its three tables)."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "score_texts.py"), "--texts", "6",
                        "--max-len", "24", "--repeats", "1", "--questions", "3", "--long-questions", "2"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    texts, choice, long = r.stdout.split("multiple choice:")
    rows = {ln[:34].strip(): ln.split() for ln in texts.splitlines()
            if ln.startswith(("sequence_logprobs", "one at a time", "HF transformers"))}
    assert len(rows) == 3, r.stdout
    assert all(float(cols[-1]) < 1e-4 for cols in rows.values()), r.stdout
    for table in (choice, long):
        rows = [ln.split() for ln in table.splitlines() if ln.startswith(("loglikelihood", "HF transformers"))]
        assert len(rows) == 4 and all(float(cols[-1]) < 1e-4 for cols in rows), r.stdout


def test_expert_exchange_benchmark_small(tmp_path):
    """benchmarks/expert_exchange.py at a tiny size: it runs, each routing has the capacities
    asked for, the rounds shrink the bytes sent when one round suffices, and its own check of
    the outputs against the worst-case exchange passes (exit 0)."""
    out = tmp_path / "ex.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "expert_exchange.py"), "--tokens", "1024", "--top-k", "4",
                        "--experts", "64", "--hidden", "32", "--moe-hidden", "16", "--rounds", "1",
                        "--capacities", "worst,2",
                        "--json", str(out)], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, JAX_NUM_CPU_DEVICES="8"))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["cpu"]
    assert [(x["routing"], x["capacity"]) for x in rows] == [
        (k, c) for k in ("uniform", "skewed") for c in (None, 2.0)]
    assert any(x["rounds"] == 1 and x["capacity"] == 2.0 for x in rows)
    for x in rows:
        assert x["rel_err"] < 1e-6
        if x["rounds"] == 1 and x["capacity"] is not None:
            assert x["sent_mb"] < rows[0]["sent_mb"]


def test_attention_memory_benchmark_small(tmp_path):
    """benchmarks/attention_memory.py at tiny sizes: it runs, its own check of the blocked form
    against the plain one passes (exit 0), and with 4 blocks per sequence the blocked gradient's
    temporaries are the smaller."""
    out = tmp_path / "attn.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "attention_memory.py"), "--seqs", "512",
                        "--heads", "2", "--block", "128", "--rounds", "1", "--json", str(out)],
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, JAX_NUM_CPU_DEVICES="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["T"] == 512 and row["rel_err"] < 1e-4
    assert row["blocked_grad_temp_mib"] < row["plain_grad_temp_mib"] / 2, row


def test_benchmark_bad_arguments():
    """A bad argument to a benchmark script is one line on stderr naming the flag, exit 2, before
    any JAX work (no traceback, no model built)."""
    cases = [("kernels.py", "--impl", "bogus"), ("kernels.py", "--reps", "0"),
             ("generate_cpu.py", "--batches", "x"), ("score_texts.py", "--max-len", "8"),
             ("speculative.py", "--batch", "0"), ("speculative.py", "--ckpt", "/nonexistent"),
             ("chat_prefix.py", "--rest", "2"), ("gpu_compile.py", "--batches", "x"),
             ("tpu_compile.py", "--attention-backward", "x"), ("e2e_gpu.py", "--batches", "x"),
             ("e2e_gpu.py", "--layers", "0"), ("expert_exchange.py", "--tokens", "0"),
             ("expert_exchange.py", "--top-k", "9", "--experts", "8")]
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="1")
    procs = [(case, subprocess.Popen([sys.executable, os.path.join(ROOT, "benchmarks", case[0]), *case[1:]],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
             for case in cases]
    for (script, flag, value, *_), p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 2, (script, flag, value, err)
        assert err.count("\n") == 1 and flag in err and "Traceback" not in err, (script, flag, value, err)


def test_prefill_roofline_counts_the_weights_each_token_multiplies():
    """benchmarks/e2e_gpu.py's FP8 GEMM roofline at V3's width (1 dense + 3 MoE layers): MLA's five
    projections are 187.1M weights per layer, which a rough 6 x hidden^2 (308.3M) overstated."""
    import importlib

    from flax import nnx

    from deepseek_jax.model import DeepSeekV3
    from deepseek_jax.quant import Precision

    e2e = importlib.import_module("benchmarks.e2e_gpu")
    cfg = e2e.bench_config(4, small=False)
    model = nnx.eval_shape(lambda: DeepSeekV3(cfg, prec=Precision(), rngs=nnx.Rngs(0)))
    D, H, q, kv, nope, rope, v = (cfg.hidden_size, cfg.num_attention_heads, cfg.q_lora_rank, cfg.kv_lora_rank,
                                  cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim)
    mla = D * q + q * H * (nope + rope) + D * (kv + rope) + kv * H * (nope + v) + H * v * D
    assert mla == 187_105_280
    mlp = 3 * D * cfg.intermediate_size
    moe = D * cfg.n_routed_experts + 3 * D * cfg.moe_intermediate_size * (cfg.num_experts_per_tok + cfg.n_shared_experts)
    assert e2e.prefill_gemm_params(cfg, model) == 4 * mla + mlp + 3 * moe


def test_kernel_benchmark_fails_when_a_kernel_raises(capsys):
    """benchmarks/kernels.py exits 1 when every configuration of a kernel raised (it exited 0,
    its table showing only "failed: ..."); a baseline that raises is a result (exit 0)."""
    import importlib

    kb = importlib.import_module("benchmarks.kernels")

    def boom(x):
        raise ValueError("no tile fits")

    x = __import__("numpy").ones(4, "float32")
    rows: list = []
    kb.measure(rows, "decode 1x4", "XLA ragged_dot bf16", boom, (x,), flops=1, nbytes=1, reps=1, quick=True)
    assert rows[0].failed and kb.verdict(rows) == 0
    kb.measure(rows, "decode 1x4", "kernel w8a16", boom, (x,), flops=1, nbytes=1, reps=1, quick=True)
    assert kb.verdict(rows) == 1
    assert "1 kernel row(s) raised" in capsys.readouterr().err
