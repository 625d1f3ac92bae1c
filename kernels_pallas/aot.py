"""Compile for an H200 or a TPU on a host without one, and count the kernels a program launches.

XLA compiles for an accelerator it does not have ("deviceless" compilation) when that platform's
PJRT plugin is importable. :func:`compile_for_gpu` builds a one-GPU topology from
:data:`H200_TARGET`; :func:`compile_for_tpu` takes one chip of a TPU topology (``"v5p:2x2x1"``,
``"v6e:2x2"``, ``"tpu7x:2x2x1"``). Either lowers ``fn`` for that device (the Pallas kernels for
its generation) and runs XLA's whole compiler for it: fusion, scheduling, the Triton kernels'
compile to PTX with their shared-memory checks on a GPU, the Mosaic kernels' compile with their
VMEM and tiling checks on a TPU, buffer assignment. The result is the program the device would
run, minus the autotuning that needs it.

:func:`launches` reads a compiled GPU program's HLO and counts the kernel launches one call makes,
loop trip counts included (the decode step's layer ``scan`` and the generator's decode loop are
``while`` loops with known trip counts). On the 2026-11-28 H200 run the profiler counted 338
kernels per batch-1 decode step of the 4-layer real-width model; this count gave 339.5 for the same
code, without a GPU. :func:`kernel_checks` lists each Pallas kernel at the SPEC §11 shapes, with a
configuration that must fail (too big for the device) as a control.

The plugins are wheels of the installed jax's version, put somewhere importable and imported
before jax starts (each platform in its own process)::

    pip install --no-deps --target .gpu_aot jax-cuda13-pjrt==0.11.2 jax-cuda13-plugin==0.11.2
    PYTHONPATH=.gpu_aot JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 python ...    # no cuDNN to check here
    pip install --no-deps --target .tpu_aot "libtpu==0.0.48.*"           # jax 0.11.2's libtpu
    PYTHONPATH=.tpu_aot python ...

``.ci/run`` does this; ``tests/test_aot_compile.py``, ``benchmarks/gpu_compile.py`` and
``benchmarks/tpu_compile.py`` use it. Without a plugin, compiling for its platform is a one-line
error and the tests skip.
"""

from __future__ import annotations

import collections
import functools
import re
from typing import NamedTuple

import jax
import jax.extend

#: The H200 as XLA's GPU compiler sees it (``stream_executor.GpuTargetConfigProto`` text): 132
#: SMs of compute capability 9.0, 227 KiB of opt-in shared memory per block, 141 GB of HBM
#: (143,771 MiB reported by the lent H200's driver 580.159.04, CUDA 13, cuDNN 9).
H200_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 4800000000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 150755098624
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 10 }
runtime_version { major: 13 minor: 0 }
device_description_str: "NVIDIA H200"
"""

DEVICE_KIND = "NVIDIA H200"
NUM_CORES = 132


def _no_compiler(platform: str, e: Exception, hint: str) -> RuntimeError:
    return RuntimeError(f"compile_for_{platform}: no {platform.upper()} compiler in this process "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); {hint} "
                        "(see kernels_pallas/aot.py)")


@functools.cache
def _gpu_meshes(n: int = 1):
    from jax.experimental import topologies
    from jax.sharding import AbstractDevice
    try:
        topo = topologies.get_topology_desc(platform="cuda", target_config=H200_TARGET, topology=f"1x1x{n}")
    except Exception as e:  # NotImplementedError without the plugin; RuntimeError from its init
        raise _no_compiler("gpu", e, f"make jax-cuda13-pjrt and jax-cuda13-plugin=={jax.__version__} importable "
                           "before jax starts, with JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1") from None
    return topo.devices[:n], AbstractDevice(DEVICE_KIND, NUM_CORES, "gpu")


@functools.cache
def _tpu_meshes(topology: str, n: int = 1):
    from jax.experimental import topologies
    from jax.sharding import AbstractDevice
    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    except Exception as e:
        raise _no_compiler("tpu", e, f"make jax {jax.__version__}'s libtpu importable before jax starts, "
                           f"and name a topology it knows ({topology!r})") from None
    if len(topo.devices) < n:
        raise ValueError(f"compile_for_tpu: topology {topology!r} has {len(topo.devices)} chips, not {n}")
    return topo.devices[:n], AbstractDevice(topo.devices[0].device_kind, 1, "tpu")


def require(platform: str = "gpu", topology: str = "v5p:2x2x1") -> None:
    """Raises the one-line ``RuntimeError`` naming what is missing unless ``platform``'s compiler
    (and the TPU ``topology``) is available in this process."""
    _gpu_meshes() if platform == "gpu" else _tpu_meshes(topology)


def available(platform: str = "gpu", topology: str = "v5p:2x2x1") -> bool:
    """Whether :func:`compile_for_gpu` (``platform="gpu"``) or :func:`compile_for_tpu` can run here."""
    try:
        require(platform, topology)
    except RuntimeError:
        return False
    return True


def _compile(devices, abstract_device, fn, args, donate=()):
    import numpy as np
    from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec, use_abstract_mesh

    rep = NamedSharding(Mesh(np.array(devices), ("d",)), PartitionSpec())
    args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), args)
    # The Pallas lowerings ask the context for the device kind (compute capability, TPU version).
    abstract = AbstractMesh((1,), ("d",), axis_types=(AxisType.Auto,), abstract_device=abstract_device)
    with use_abstract_mesh(abstract):
        lowered = jax.jit(fn, donate_argnums=donate).lower(*args)
    return lowered.compile()


def _pallas_grid_steps(jaxpr, mult: int, out: dict) -> None:
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            grid = eqn.params["grid_mapping"].grid
            steps = 1
            for g in grid:
                steps *= g if isinstance(g, int) else 0   # a dynamic grid dimension: not counted
            calls, total = out.get(str(eqn.params["name"]), (0, 0))
            out[str(eqn.params["name"])] = (calls + mult, total + mult * steps)
            continue
        inner = mult * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
        for v in eqn.params.values():
            for sub in (v if isinstance(v, (list, tuple)) else (v,)):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    _pallas_grid_steps(sub.jaxpr, inner, out)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    _pallas_grid_steps(sub, inner, out)


def grid_steps(fn, *args, topology: str = "v5p:2x2x1") -> dict[str, tuple[int, int]]:
    """``{kernel name: (calls, grid steps)}`` of the Pallas kernels ``fn(*args)`` runs when traced
    for one chip of the TPU ``topology`` (the kernels the model picks there), with scan trip counts
    multiplied in (a ``while_loop`` body counts once). A Mosaic kernel runs its grid steps one after
    another on a TensorCore (two share the parallel axes on v4 / v5p), each with a fixed cost
    besides its DMA and compute, so this count is the TPU's analogue of GPU kernel launches."""
    from jax.sharding import AbstractMesh, AxisType, use_abstract_mesh

    _, abstract_device = _tpu_meshes(topology)
    abstract = AbstractMesh((1,), ("d",), axis_types=(AxisType.Auto,), abstract_device=abstract_device)
    with use_abstract_mesh(abstract):
        closed = jax.make_jaxpr(fn)(*args)
    out: dict[str, tuple[int, int]] = {}
    _pallas_grid_steps(closed.jaxpr, 1, out)
    return out


def compile_for_gpu(fn, *args, donate: tuple[int, ...] = ()):
    """``jax.jit(fn, donate_argnums=donate).lower(*args).compile()`` for one H200, on any host.
    ``args`` are arrays or ``jax.ShapeDtypeStruct``s (pytrees of them; ``None`` leaves pass
    through); returns the ``jax.stages.Compiled``, whose ``as_text()`` is the optimized GPU HLO
    and ``memory_analysis()`` its buffer sizes."""
    return _compile(*_gpu_meshes(), fn, args, donate)


def compile_for_tpu(fn, *args, topology: str = "v5p:2x2x1", donate: tuple[int, ...] = ()):
    """As :func:`compile_for_gpu`, for one chip of the TPU ``topology``."""
    return _compile(*_tpu_meshes(topology), fn, args, donate)


def devices(platform: str, n: int, topology: str = "v5p:2x2x1"):
    """``n`` devices to compile for (H200s, or chips of the TPU ``topology``) and the
    ``AbstractDevice`` naming them, for :func:`compile_sharded`."""
    return _gpu_meshes(n) if platform == "gpu" else _tpu_meshes(topology, n)


def compile_sharded(fn, args, mesh, abstract_device, donate=()):
    """``jax.jit(fn).lower(*args).compile()`` with ``args`` (``ShapeDtypeStruct``s carrying
    ``NamedSharding``s) placed on ``mesh``, a ``jax.sharding.Mesh`` of :func:`devices`: the
    program XLA would run on that many devices (collectives included); ``donate``: the donated
    arguments' positions."""
    return lower_sharded(fn, args, mesh, abstract_device, donate).compile()


def lower_sharded(fn, args, mesh, abstract_device, donate=()):
    """:func:`compile_sharded` before the compile: the lowered program."""
    from jax.sharding import AbstractMesh, use_abstract_mesh

    abstract = AbstractMesh(tuple(mesh.shape.values()), tuple(mesh.axis_names), axis_types=mesh.axis_types,
                            abstract_device=abstract_device)
    with jax.set_mesh(mesh), use_abstract_mesh(abstract):
        return jax.jit(fn, donate_argnums=tuple(donate)).lower(*args)


class Launch(NamedTuple):
    """One instruction of the compiled program that launches a kernel."""

    count: float    # launches per call of the program (trip counts of the loops around it)
    loops: str      # the loops it sits in, outermost first: "while8/while3" = 8 x 3 trips
    kind: str       # "pallas:<kernel>", "mosaic_gpu", "fusion:<kind>", "copy", "custom-call:<target>", ...
    name: str       # the HLO instruction
    op_name: str    # the JAX source path (with named scopes), "" if XLA made it up
    read: int = 0       # bytes it reads from memory per launch (see :func:`launches`)
    written: int = 0    # bytes it writes per launch


#: Instructions that launch nothing: bookkeeping, control flow (counted through its bodies), and
#: the ``-done`` half of async pairs (the ``-start`` half is the launch).
_NO_LAUNCH = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional", "call",
              "after-all", "opt-barrier", "partition-id", "replica-id", "add-dependency", "domain",
              "fusion-done", "copy-done", "async-done", "all-reduce-done", "all-gather-done",
              "collective-permute-done", "send-done", "recv-done"}

_COMPUTATION = re.compile(r"^(ENTRY )?%([\w.\-]+) (.*)\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*)$")
# the opcode follows the result shape: "f32[8]{0} fusion(", "(s32[], ...) while(", "s32[] constant("
_OPCODE = re.compile(r"(?:^|[\]}) ])([a-z][a-z0-9\-]*)\(")
_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\]")
_PARAM = re.compile(r"([\w.\-]+): ((?:\([^()]*\))|(?:[a-z]+[0-9a-z]*\[[0-9,]*\]))")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5}


def _nbytes(shape: str) -> int:
    """Bytes of an HLO shape string (a tuple's elements summed; layouts ignored)."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(shape):
        size = _BYTES.get(dtype, 1 if dtype.startswith("f8") else 0)
        for d in filter(None, dims.split(",")):
            size *= int(d)
        total += size
    return int(total)


class _Instr(NamedTuple):
    op: str
    line: str
    shape: str            # the result shape's text
    operands: tuple       # operand names


def _operands(rest: str, m: re.Match) -> tuple:
    depth, i = 0, m.end() - 1
    for j in range(i, len(rest)):
        depth += {"(": 1, ")": -1}.get(rest[j], 0)
        if depth == 0:
            return tuple(re.findall(r"%([\w.\-]+)", rest[i:j]))
    return ()


def _computations(hlo: str) -> tuple[dict[str, dict[str, _Instr]], str]:
    comps: dict[str, dict[str, _Instr]] = {}
    cur = entry = None
    for line in hlo.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            cur = m.group(2)
            # a fused computation's header names its parameters' shapes
            comps[cur] = {name: _Instr("parameter", "", shape, ()) for name, shape in _PARAM.findall(m.group(3))}
            if m.group(1):
                entry = cur
            continue
        if line.startswith("}"):
            cur = None
            continue
        if cur is None:
            continue
        m = _INSTRUCTION.match(line)
        if m:
            rest = m.group(2)
            op = _OPCODE.search(rest)
            comps[cur][m.group(1)] = _Instr(op.group(1) if op else "?", line, rest[:op.start(1)] if op else "",
                                            _operands(rest, op) if op else ())
    if entry is None:
        raise ValueError("launches: no ENTRY computation in this HLO text")
    return comps, entry


#: Ops through which a fused parameter is read only in part: the bytes read are their results'.
_PARTIAL_READS = {"dynamic-slice", "slice", "gather"}
#: Ops that write only their update into an operand they alias (in place): (operand, update) index.
_IN_PLACE = {"dynamic-update-slice": (0, 1), "scatter": (0, 2)}


def _fusion_traffic(comp: dict[str, _Instr]) -> tuple[int, int]:
    """``(read, written)`` bytes of one launch of a fused computation: a parameter read through
    slices or a gather counts the sliced bytes; an in-place update (the root, or a tuple root's
    element, a dynamic-update-slice or scatter into a parameter) writes its update and does not
    read the buffer it updates."""
    users: dict[str, list[str]] = {n: [] for n in comp}
    root = None
    for n, ins in comp.items():
        for o in ins.operands:
            users.setdefault(o, []).append(n)
        if ins.line.lstrip().startswith("ROOT "):
            root = n
    params = [n for n, i in comp.items() if i.op == "parameter" and i.line]
    outs = list(comp[root].operands) if root and comp[root].op == "tuple" else [root]
    written = 0
    for o in outs:
        ins = comp.get(o)
        if ins is None:
            continue
        if ins.op in _IN_PLACE:
            written += _nbytes(comp[ins.operands[_IN_PLACE[ins.op][1]]].shape)
        else:
            written += _nbytes(ins.shape)

    def read_through(n: str) -> int:
        total = 0
        for u in users.get(n, []):
            ins = comp[u]
            if ins.op == "bitcast":
                total += read_through(u)
            elif ins.op in _PARTIAL_READS and ins.operands[0] == n:
                total += _nbytes(ins.shape)
            elif ins.op in _IN_PLACE and ins.operands[_IN_PLACE[ins.op][0]] == n:
                continue
            else:
                return _nbytes(comp[n].shape)
        return min(total, _nbytes(comp[n].shape))

    return sum(read_through(n) for n in params), written


def _kind(op: str, line: str, op_name: str) -> str:
    if op == "custom-call":
        target = re.search(r'custom_call_target="([^"]*)"', line)
        target = target.group(1) if target else "?"
        if "triton" in target or target == "tpu_custom_call":   # a Pallas kernel (Triton / Mosaic TPU)
            m = re.search(r"/(\w+)/pallas_call", op_name)
            return f"pallas:{m.group(1) if m else '?'}"
        if target.startswith("mosaic_gpu"):
            return "mosaic_gpu"
        return f"custom-call:{target}"
    if op in ("fusion", "fusion-start"):
        if "__triton" in line:            # an XLA-generated Triton fusion (a dot XLA tiled itself)
            return "fusion:triton"
        if "__cublas" in line or "__cudnn" in line:
            return "fusion:library"
        m = re.search(r"kind=(\w+)", line)
        return f"fusion:{m.group(1)[1:].lower() if m else '?'}"
    return op


def _counted_loop(cond: dict[str, _Instr]):
    """A match whose group 1 is the trip count of a loop whose condition is ``counter < constant``
    (a scan's or ``fori_loop``'s from 0: the TPU compiler does not annotate known trip counts)."""
    root = next((i for i in cond.values() if i.line.lstrip().startswith("ROOT ")), None)
    if root is None or root.op != "compare" or "direction=LT" not in root.line or len(root.operands) != 2:
        return None
    a, b = (cond.get(o) for o in root.operands)
    if a is None or b is None or a.op != "get-tuple-element" or b.op != "constant":
        return None
    return re.search(r"constant\((\d+)\)", b.line)


def launches(hlo: str) -> list[Launch]:
    """The kernel launches of one call of the compiled program whose optimized HLO is ``hlo``
    (``compiled.as_text()``), with the trip counts of known-trip-count loops multiplied in (a loop
    without one counts once, its condition included). The GPU compiler annotates trip counts; for
    the TPU's loops a condition ``counter < constant`` is taken as that many trips (scans and
    ``fori_loop``s count from 0). On a TPU a "launch" is an HLO op of the program (no kernel
    launches there): count them for bytes, not for launch overhead.

    Each launch carries the bytes it moves, from the shapes alone (no caches, no device):
    an XLA fusion reads each operand whole, or only the slices or gathered rows it takes of it, and
    writes its results, or only the update of a result it updates in place (an unfused in-place
    update reads and writes its update); any other launch (a copy, a library or Pallas call) reads
    all its operands and writes all its results. For a Pallas kernel that is an upper bound: the
    grouped GEMM gets every layer's experts and reads those that got rows."""
    comps, entry = _computations(hlo)
    out: list[Launch] = []

    def traffic(comp: dict[str, _Instr], ins: _Instr) -> tuple[int, int]:
        if ins.op in ("fusion", "fusion-start"):
            called = re.search(r"calls=%([\w.\-]+)", ins.line)
            if called and called.group(1) in comps:
                return _fusion_traffic(comps[called.group(1)])
        if ins.op in _IN_PLACE:   # an unfused in-place update: reads and writes its update
            upd = _nbytes(comp[ins.operands[_IN_PLACE[ins.op][1]]].shape)
            return upd, upd
        return sum(_nbytes(comp[o].shape) for o in ins.operands if o in comp), _nbytes(ins.shape)

    def walk(comp: str, mult: float, loops: str):
        for name, ins in comps[comp].items():
            op, line = ins.op, ins.line
            if not line:          # a parameter named in the computation's header
                continue
            if op == "while":
                body = re.search(r"body=%([\w.\-]+)", line).group(1)
                cond = re.search(r"condition=%([\w.\-]+)", line).group(1)
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line) or _counted_loop(comps[cond])
                if trips:
                    n = int(trips.group(1))
                    walk(body, mult * n, f"{loops}/while{n}")
                else:
                    walk(body, mult, f"{loops}/while?")
                    walk(cond, mult, f"{loops}/while?")
            elif op == "conditional":
                branches = re.search(r"branch_computations=\{([^}]*)\}", line)
                names = re.findall(r"%([\w.\-]+)", branches.group(1)) if branches else \
                    re.findall(r"(?:true|false)_computation=%([\w.\-]+)", line)
                for b in names:   # every branch counted: an upper bound
                    walk(b, mult, f"{loops}/cond")
            elif op == "call":
                walk(re.search(r"to_apply=%([\w.\-]+)", line).group(1), mult, loops)
            elif op not in _NO_LAUNCH:
                src = re.search(r'op_name="([^"]*)"', line)
                src = src.group(1) if src else ""
                out.append(Launch(mult, loops.lstrip("/"), _kind(op, line, src), name, src,
                                  *traffic(comps[comp], ins)))

    walk(entry, 1.0, "")
    return out


def scope_of(op_name: str, scopes) -> str:
    """The innermost of ``scopes`` (named scopes, e.g. the model's) on ``op_name``'s path, else
    ``"other"``."""
    parts = op_name.split("/")
    for p in reversed(parts):
        if p in scopes:
            return p
    return "other"


def tally(items: list[Launch], key) -> dict[str, float]:
    """Launches per call summed by ``key(launch)``, largest first."""
    acc: dict[str, float] = collections.defaultdict(float)
    for it in items:
        acc[key(it)] += it.count
    return dict(sorted(acc.items(), key=lambda kv: -kv[1]))


def kernel_checks(platform: str) -> list[tuple[str, object, tuple, bool]]:
    """``(name, fn, args, must_fail)`` for :func:`compile_for_gpu` / :func:`compile_for_tpu`: each
    Pallas kernel of ``platform`` ("gpu" or "tpu") at the SPEC §11 shapes (those of
    ``benchmarks/kernels.py``), called as the model calls it (``impl="pallas_<platform>"``, its
    default configuration), the grouped GEMM's backward, and last a configuration too big for the
    device, which must fail: the MLA kernel's 128-head, 32-token blocks on the GPU (262,144 bytes
    of shared memory: the configuration and the message with which the lent H200 refused it on
    2026-11-28), 256 MiB of VMEM scratch on a TPU."""
    import jax.numpy as jnp

    import kernels_pallas as kp
    from kernels_pallas.mla_decode import mla_decode_gpu

    sds, bf16, f8, f32, i32 = jax.ShapeDtypeStruct, jnp.bfloat16, jnp.float8_e4m3fn, jnp.float32, jnp.int32
    impl = f"pallas_{platform}"

    def blocks(n, k):
        return -(-n // 128), -(-k // 128)

    def dense(name, m, k, n, fn):
        return (f"{name} {m}x{k}->{n}", lambda x, w, s: fn(x, w, s, impl=impl),
                (sds((m, k), bf16), sds((n, k), f8), sds(blocks(n, k), f32)), False)

    def grouped(m, e, k, n, fp8):
        ws = sds((e, *blocks(n, k)), f32) if fp8 else None
        return (f"grouped {'fp8' if fp8 else 'bf16'} {m} rows/{e} experts {k}->{n}",
                lambda x, w, ws, g: kp.grouped_matmul(x, w, g, w_scale=ws, impl=impl),
                (sds((m, k), bf16), sds((e, n, k), f8 if fp8 else bf16), ws, sds((e,), i32)), False)

    def grouped_grad(m, e, k, n):
        def loss(x, w, g):
            return jnp.sum(kp.grouped_matmul(x, w, g, impl=impl).astype(f32))
        return (f"grouped bf16 backward {m} rows/{e} experts {k}->{n}", jax.grad(loss, argnums=(0, 1)),
                (sds((m, k), bf16), sds((e, n, k), bf16), sds((e,), i32)), False)

    def mla(b, t):
        return (f"mla decode B={b} T={t}",
                lambda q, p, c, n: kp.mla_decode(q, p, c, n, scale=0.07, kv_lora_rank=512, impl=impl),
                (sds((b, 128, 512), bf16), sds((b, 128, 64), bf16), sds((b, t, 576), bf16), sds((b,), i32)), False)

    checks = [dense("w8a16", 1, 16384, 7168, kp.w8a16_matmul), dense("w8a16", 64, 7168, 2048, kp.w8a16_matmul),
              dense("w8a16", 4096, 7168, 2048, kp.w8a16_matmul), dense("w8a8", 64, 7168, 2048, kp.w8a8_matmul),
              dense("w8a8", 4096, 7168, 2048, kp.w8a8_matmul),
              grouped(8, 256, 7168, 2048, True), grouped(512, 256, 7168, 4096, True),
              grouped(32768, 256, 7168, 4096, True), grouped(32768, 256, 7168, 4096, False),
              grouped_grad(4096, 16, 2048, 1024), mla(1, 4096), mla(64, 4096)]
    mla_args = checks[-1][2]
    # the decode step's calls: one layer of a 3-layer stack read in place
    checks.append(("w8a16 1x16384->7168, layer of a stack", lambda x, w, s, lay: kp.w8a16_matmul(
        x, w, s, impl=impl, layer=lay), (sds((1, 16384), bf16), sds((3, 7168, 16384), f8),
                                         sds((3, *blocks(7168, 16384)), f32), sds((), i32)), False))
    checks.append(("mla decode B=1 T=4096, layer of a stack", lambda q, p, c, n, lay: kp.mla_decode(
        q, p, c, n, scale=0.07, kv_lora_rank=512, impl=impl, layer=lay),
        (sds((1, 128, 512), bf16), sds((1, 128, 64), bf16), sds((3, 1, 4096, 576), bf16), sds((1,), i32),
         sds((), i32)), False))
    for b, part in ((1, "k"), (1, "v"), (64, "k"), (64, "v")):   # MLA's absorbed products, kv_b_proj in place
        checks.append((f"mla absorb {part} B={b}, 128 heads, kv_b of a stack",
                       lambda x, w, s, lay, part=part: kp.mla_absorb(x, w, s, part=part, nope=128, layer=lay,
                                                                     impl=impl),
                       (sds((b, 1, 128, 128 if part == "k" else 512), bf16), sds((3, 128 * 256, 512), f8),
                        sds((3, 256, 4), f32), sds((), i32)), False))
    checks.append(("cached attention: 1024 new tokens over 4096, 128 heads, 128+64/128",
                   lambda qn, qp, kv, kpe, pos: kp.cached_attention(qn, qp, kv, kpe, pos, scale=0.07, impl=impl),
                   (sds((1, 1024, 128, 128), bf16), sds((1, 1024, 128, 64), bf16), sds((1, 4096, 128, 256), bf16),
                    sds((1, 4096, 64), bf16), sds((1, 1024), i32)), False))
    if platform == "gpu":
        checks.append(("moe router T=64, 256 experts (8 groups, 4 kept, top-8)",
                       lambda x, b: kp.moe_route(x, b, n_group=8, topk_group=4, top_k=8, norm_topk_prob=True,
                                                 scaling=2.5, impl=impl),
                       (sds((64, 256), f32), sds((256,), f32)), False))
        checks.append(("residual add + rms norm 4096x7168, a layer's weight of a stack",
                       lambda x, r, w, lay: kp.rms_norm(x, w, eps=1e-6, residual=r, layer=lay, impl=impl),
                       (sds((4096, 7168), bf16), sds((4096, 7168), bf16), sds((3, 7168), bf16), sds((), i32)), False))
        inv_freq = (1.0 / 10000 ** (jnp.arange(32, dtype=f32) / 32)).astype(f32)
        for b, splits in ((1, 14), (64, None)):   # MLA's new cache entries, a layer of a stack in place
            kv = sds((14, b, 1, 576), f32) if splits else sds((b, 1, 576), bf16)
            checks.append((f"latent cache write B={b}{', split-K partials' if splits else ''}, a layer of a stack",
                           lambda c, kv, w, pos, lay, splits=splits: kp.write_latent(
                               c, kp.SplitK(kv) if splits else kv, w, pos, inv_freq, mult=1.0, eps=1e-6,
                               dtype=bf16, layer=lay, impl=impl),
                           (sds((3, b, 4096, 576), bf16), kv, sds((3, 512), bf16), sds((b, 1), i32), sds((), i32)),
                           False))
        checks.append(("flash prefill 4096 tokens, 128 heads, 192/128",
                       lambda q, k, v: kp.causal_attention(q, k, v, scale=0.07, impl=impl),
                       (sds((1, 4096, 128, 192), bf16), sds((1, 4096, 128, 192), bf16),
                        sds((1, 4096, 128, 128), bf16)), False))
        checks.append(("mla decode B=64 T=4096, 128 heads x 32 tokens (too big)",
                       lambda q, p, c, n: mla_decode_gpu(q, p, c, n, scale=0.07, kv_lora_rank=512, block_h=128,
                                                         block_t=32),
                       mla_args, True))
    else:
        checks.append(("latent cache store B=64, a layer of a stack (transposed in place)",
                       lambda c, new, pos, lay: kp.store_latent(c, new, pos, layer=lay, impl=impl),
                       (sds((3, 64, 4096, 576), bf16), sds((64, 1, 576), bf16), sds((64, 1), i32), sds((), i32)),
                       False))
        checks.append(("cached attention backward: 4096 tokens by index, 128 heads, 128+64/128",
                       lambda qn, qp, kv, kpe, pos: jax.grad(
                           lambda *a: jnp.sum(kp.cached_attention(*a, pos, scale=0.07, impl=impl).astype(f32)),
                           argnums=(0, 1, 2, 3))(qn, qp, kv, kpe),
                       (sds((1, 4096, 128, 128), bf16), sds((1, 4096, 128, 64), bf16), sds((1, 4096, 128, 256), bf16),
                        sds((1, 4096, 64), bf16), sds((1, 4096), i32)), False))
        checks.append(("a kernel holding 256 MiB of VMEM scratch (too big)", _vmem_hog,
                       (sds((8, 128), f32),), True))
    return checks


def _vmem_hog(x):
    """A Pallas TPU kernel whose scratch (256 MiB) no TPU's VMEM holds (64-128 MiB): the TPU
    control. (An FP8 GEMM with 4096x4096x7168 tiles fails too, but only after ~4 minutes of
    compiling its unrolled body.)"""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu

    def kernel(x_ref, o_ref, scratch_ref):
        o_ref[...] = x_ref[...] + scratch_ref[:8, :128]

    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                          scratch_shapes=[pltpu.VMEM((32768, 2048), x.dtype)])(x)


def compile_kernels(platform: str, topology: str = "v5p:2x2x1") -> list[dict]:
    """:func:`kernel_checks` compiled: ``kernel``, ``compiled``, ``must_fail``, ``error`` (one line),
    ``compile_s`` per check."""
    import time

    rows = []
    for name, fn, args, must_fail in kernel_checks(platform):
        t = time.perf_counter()
        try:
            if platform == "gpu":
                compile_for_gpu(fn, *args)
            else:
                compile_for_tpu(fn, *args, topology=topology)
            error = ""
        except Exception as e:  # noqa: BLE001 - the table reports it
            error = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
        rows.append(dict(kernel=name, compiled=not error, must_fail=must_fail, error=error,
                         compile_s=time.perf_counter() - t))
    return rows


def print_kernels(rows: list[dict], target: str) -> None:
    print(f"\n{'kernel (compiled for ' + target + ')':64s} {'result':>8s} {'s':>5s}")
    for k in rows:
        result = "compiled" if k["compiled"] else "failed"
        note = " (expected)" if k["must_fail"] and not k["compiled"] else \
            " (UNEXPECTED)" if k["must_fail"] == k["compiled"] else ""
        print(f"{k['kernel']:64s} {result:>8s} {k['compile_s']:5.1f}{note}" + (f"  {k['error']}" if k["error"] else ""))
