"""Where a jitted step's device time goes: a ``jax.profiler`` trace summed per kernel.

    rows, busy_us, wall_us = device_op_table(step, args, steps=3, per_call=1)

Runs ``step(*args)`` ``steps`` times inside a trace (after one untraced warm-up), reads the
``*.trace.json.gz`` the profiler writes, and sums the duration of every device event by name
(XLA fusions, Pallas kernels by their ``name=``, copies).  Returns rows ``(name, us_per_step,
calls_per_step)`` sorted by time, the device busy time per step and the wall time per step, so
``wall - busy`` is what the device sat idle (launch and host overhead).  On a host without an
accelerator the XLA CPU thunks stand in for device kernels (a smoke test of this code, not a
profile worth reading).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import tempfile
import time

import jax

_HOST_NOISE = ("ThreadpoolListener", "end: ", "ThunkExecutor", "$")


def _events(log_dir: str):
    paths = sorted(glob.glob(os.path.join(log_dir, "plugins", "profile", "*", "*.trace.json.gz")),
                   key=os.path.getmtime)
    if not paths:
        raise RuntimeError(f"the profiler wrote no trace under {log_dir}")
    with gzip.open(paths[-1]) as f:
        return json.load(f)["traceEvents"]


def device_op_table(step, args, *, steps: int = 3, per_call: int = 1, log_dir: str | None = None):
    """See the module doc; ``per_call``: model steps per ``step`` call (times and counts are
    divided by it, so the table is per model step)."""
    jax.block_until_ready(step(*args))  # compiled and warm before the trace starts
    log_dir = log_dir or tempfile.mkdtemp(prefix="trace_")
    with jax.profiler.trace(log_dir):
        t0 = time.perf_counter()
        for _ in range(steps):
            out = step(*args)
        jax.block_until_ready(out)
        wall_us = (time.perf_counter() - t0) * 1e6 / steps / per_call
    events = _events(log_dir)
    procs = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    device = {p for p, n in procs.items() if "/device:" in n}

    def keep(e):
        if e.get("ph") != "X":
            return False
        if device:  # kernels on the accelerator's streams
            return e["pid"] in device and "stream" in threads.get((e["pid"], e["tid"]), "Stream").lower()
        return (threads.get((e["pid"], e["tid"]), "").startswith("tf_XLA")
                and not e["name"].startswith(_HOST_NOISE))

    total = collections.defaultdict(float)
    count = collections.Counter()
    for e in events:
        if keep(e):
            total[e["name"]] += float(e.get("dur", 0.0))
            count[e["name"]] += 1
    div = steps * per_call
    rows = sorted(((n, t / div, count[n] / div) for n, t in total.items()), key=lambda r: -r[1])
    return rows, sum(total.values()) / div, wall_us


def print_table(title: str, rows, busy_us: float, wall_us: float, top: int = 20) -> None:
    print(f"# profile {title}: wall {wall_us:,.0f} µs/step, device busy {busy_us:,.0f} µs/step "
          f"({100 * busy_us / max(wall_us, 1e-9):.0f}%), {sum(r[2] for r in rows):,.0f} kernels/step")
    print(f"#   {'µs/step':>9} {'share':>6} {'calls':>6}  kernel")
    for name, us, calls in rows[:top]:
        print(f"#   {us:>9,.1f} {100 * us / max(busy_us, 1e-9):>5.1f}% {calls:>6.1f}  {name[:90]}")
