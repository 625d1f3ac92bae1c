"""Peak memory and throughput of ``deepseek-jax convert`` on synthetic Hub checkpoints.

    python benchmarks/convert_memory.py                 # ~3.3 GB then ~6.6 GB FP8 checkpoints
    python benchmarks/convert_memory.py --layers 8      # quick smoke run (~0.8 GB)
    python benchmarks/convert_memory.py --bf16          # also a --dtype bf16 run at the first size

For each size: writes a random DeepSeek-V3-shaped FP8 Hub checkpoint (``random_hub_checkpoint``,
streamed) into a temporary directory, evicts it from the page cache (``fsync`` +
``posix_fadvise(DONTNEED)``), converts it in a child process (``python -m deepseek_jax.cli convert``)
and reads the child's peak RSS from ``wait4``'s ``ru_maxrss`` (exact, kernel-tracked; a sampling
thread also records the RSS over time for the "at 50%" column) and its CPU time.  For scale, the
time of a plain ``cp -r`` of the evicted source (plus ``sync``) is measured too: on a shared or
small machine the converter's GB/s is mostly what the disk and the free CPUs allow.  The bound the issue sets is
``2 x largest single output array + 1 GB``.  Throughput is output bytes / wall time of the child
(and again including ``sync`` of the written data).  The size is doubled by doubling the number of
layers, which also doubles the largest (layer-stacked) array: the peak should not move.
Temporary directories are removed at the end (``--keep`` keeps them).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GB = 1e9

# This parent process stays small (stdlib only): a child's ru_maxrss includes the memory of the
# process it was forked from, so generation and everything that imports jax run in children.


def bench_config(layers: int) -> dict:
    """~110 MB of FP8 per MoE layer: 64 experts of 3 x [512, 1024]."""
    from deepseek_jax.synthetic import tiny_config

    return tiny_config(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
        num_hidden_layers=layers, first_k_dense_replace=1, num_attention_heads=8, num_key_value_heads=8,
        n_routed_experts=64, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
        q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        max_position_embeddings=4096,
        rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 1024,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    )


def child_main(argv: list[str]) -> None:
    """``--child gen DIR LAYERS`` writes the checkpoint; ``--child plan LAYERS DTYPE`` prints the
    largest output array as JSON (its own peak RSS is the converter's baseline)."""
    sys.path.insert(0, REPO)
    if argv[0] == "gen":
        from deepseek_jax.synthetic import random_hub_checkpoint

        random_hub_checkpoint(argv[1], bench_config(int(argv[2])), seed=0, fp8=True, max_shard_bytes=1 << 30)
    elif argv[0] == "plan":
        from deepseek_jax import orbax_ckpt
        from deepseek_jax.config import DeepSeekConfig
        from deepseek_jax.synthetic import FP8_QUANTIZATION_CONFIG

        c = dict(bench_config(int(argv[1])), quantization_config=FP8_QUANTIZATION_CONFIG)
        mcfg = DeepSeekConfig.from_hub_dict(c).replace(fp8=(argv[2] == "fp8"))
        p = max(orbax_ckpt._plan(mcfg, True), key=lambda p: p.nbytes)
        print(json.dumps({"name": p.key, "bytes": p.nbytes}))


def run_child(*args: str) -> tuple[str, int]:
    """Runs ``child_main(args)`` in a fresh interpreter; returns (stdout, peak RSS in bytes)."""
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", *args],
                            env=dict(os.environ, JAX_PLATFORMS="cpu"), stdout=subprocess.PIPE)
    out = proc.stdout.read().decode()
    _, status, ru = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"child {args} failed")
    return out, ru.ru_maxrss * 1024


def evict(path: str) -> None:
    for d, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(d, f), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def run_convert(src: str, out: str, dtype: str) -> dict:
    cmd = [sys.executable, "-m", "deepseek_jax.cli", "convert", src, out, "--quiet", "--dtype", dtype]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            samples.append((time.time() - t0, int(line.split()[1]) * 1024))
            except OSError:
                pass
            stop.wait(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.time() - t0
    stop.set()
    th.join()
    out_text, err_text = proc.stdout.read().decode(), proc.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"convert failed ({status}): {err_text[-2000:]}")
    t1 = time.time()
    os.sync()
    sync_s = time.time() - t1
    mid = [r for t, r in samples if t >= wall / 2]
    return {"wall_s": wall, "sync_s": sync_s, "peak_rss": ru.ru_maxrss * 1024,
            "cpu_s": ru.ru_utime + ru.ru_stime,
            "rss_at_half": mid[0] if mid else 0, "stdout": out_text.strip()}


def copy_baseline(src: str, dst: str) -> float:
    """Seconds for ``cp -r`` of the (evicted) source plus ``sync``: what the disk allows."""
    evict(src)
    os.sync()
    t0 = time.time()
    subprocess.run(["cp", "-r", src, dst], check=True)
    os.sync()
    seconds = time.time() - t0
    shutil.rmtree(dst)
    return seconds


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        return child_main(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=30, help="layers of the first checkpoint (doubled next)")
    ap.add_argument("--bf16", action="store_true", help="also convert the first size with --dtype bf16")
    ap.add_argument("--dir", default=None, help="parent of the temporary directories")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", help="write the rows as JSON here")
    args = ap.parse_args()

    from importlib.metadata import version

    _, base = run_child("plan", "4", "fp8")
    print(f"# {datetime.date.today()} python {platform.python_version()} jax {version('jax')} "
          f"orbax-checkpoint {version('orbax-checkpoint')} tensorstore {version('tensorstore')} "
          f"cpus {os.cpu_count()}", flush=True)
    print(f"# baseline peak RSS of a child that only imports the converter and builds the plan: {base / GB:.2f} GB", flush=True)
    rows = []
    runs = [(args.layers, "fp8"), (2 * args.layers, "fp8")]
    if args.bf16:
        runs.insert(1, (args.layers, "bf16"))
    root = tempfile.mkdtemp(prefix="convert_bench_", dir=args.dir)
    try:
        src_layers = None
        for layers, dtype in runs:
            src = os.path.join(root, f"hub_{layers}")
            out = os.path.join(root, f"orbax_{layers}_{dtype}")
            if src_layers != layers:
                if src_layers is not None and not args.keep:
                    shutil.rmtree(os.path.join(root, f"hub_{src_layers}"), ignore_errors=True)
                t0 = time.time()
                run_child("gen", src, str(layers))
                gen_s = time.time() - t0
                src_layers = layers
                print(f"# generated {layers}-layer checkpoint: {du(src) / GB:.2f} GB in {gen_s:.0f}s", flush=True)
            cp_s = copy_baseline(src, src + "_copy")
            evict(src)
            largest_json, _ = run_child("plan", str(layers), dtype)
            largest_name, largest = json.loads(largest_json)["name"], json.loads(largest_json)["bytes"]
            r = run_convert(src, out, dtype)
            out_bytes = du(out)
            bound = 2 * largest + 1e9
            row = {"layers": layers, "dtype": dtype, "source_gb": du(src) / GB, "output_gb": out_bytes / GB,
                   "largest_array": largest_name, "largest_gb": largest / GB, "peak_rss_gb": r["peak_rss"] / GB,
                   "rss_at_half_gb": r["rss_at_half"] / GB, "bound_gb": bound / GB,
                   "peak_over_bound": r["peak_rss"] / bound, "wall_s": r["wall_s"],
                   "gb_per_s": out_bytes / r["wall_s"] / GB,
                   "gb_per_s_with_sync": out_bytes / (r["wall_s"] + r["sync_s"]) / GB,
                   "cpu_s_per_gb": r["cpu_s"] / (out_bytes / GB), "cp_gb_per_s": du(src) / cp_s / GB}
            rows.append(row)
            print(f"# {r['stdout']}", flush=True)
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    hdr = ("| layers | dtype | source GB | output GB | largest output array (GB) | peak RSS GB | RSS at 50% GB "
           "| bound GB (2x largest + 1) | peak / bound | time s | GB/s | GB/s incl. sync | CPU s per GB "
           "| `cp -r` GB/s |")
    print()
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for r in rows:
        print(f"| {r['layers']} | {r['dtype']} | {r['source_gb']:.2f} | {r['output_gb']:.2f} | "
              f"{r['largest_array']} ({r['largest_gb']:.2f}) | {r['peak_rss_gb']:.2f} | {r['rss_at_half_gb']:.2f} | "
              f"{r['bound_gb']:.2f} | {r['peak_over_bound']:.2f} | {r['wall_s']:.1f} | {r['gb_per_s']:.2f} | "
              f"{r['gb_per_s_with_sync']:.2f} | {r['cpu_s_per_gb']:.1f} | {r['cp_gb_per_s']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"baseline_rss_gb": base / GB, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
