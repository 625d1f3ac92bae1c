"""Process and mesh set-up shared by the commands: ``--mesh``, ``--rules``, multi-host.

Multi-host: the same command runs on every host. ``jax.distributed.initialize`` is called when
``--coordinator`` is given or the environment names a coordinator (``DEEPSEEK_JAX_COORDINATOR``,
``DEEPSEEK_JAX_NUM_PROCESSES``, ``DEEPSEEK_JAX_PROCESS_ID``), or, with ``--distributed auto``, when
JAX's own cluster detection (TPU pods, SLURM, Open MPI) finds one. Only process 0 prints or
writes files; a host that loses its peers exits with an error after ``--heartbeat-timeout``
seconds instead of hanging.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import os
import re
import sys

from deepseek_jax.errors import DeepSeekError

#: arguments naming what every process reads: their contents must agree, not only their names
_INPUT_ARGS = ("ckpt", "ids", "text_file", "pairs", "input_file", "config", "init", "data", "tokenizer")
#: arguments that differ from process to process by design
_PER_PROCESS_ARGS = frozenset({"process_id", "coordinator", "func"})
_PER_PROCESS_ENV = frozenset({"DEEPSEEK_JAX_PROCESS_ID", "DEEPSEEK_JAX_COORDINATOR", "DEEPSEEK_JAX_TEST_DIE_AFTER_INIT"})
#: (this process's index, the number of processes) once :func:`init` started a multi-process run
_PROCESS: tuple[int, int] | None = None


def add_args(p: argparse.ArgumentParser, mesh_default: str = "all devices on expert") -> None:
    g = p.add_argument_group("devices and hosts")
    g.add_argument("--mesh", help=f"mesh sizes, e.g. data=2,expert=4,model=1 (default: {mesh_default})")
    g.add_argument("--rules", default="ep_tp", choices=("ep_tp", "ep_dp"),
                   help="sharding preset: ep_tp (experts over expert, heads over model) or ep_dp "
                        "(also batch over expert: data-parallel MLA)")
    g.add_argument("--coordinator", help="host:port of process 0, for multi-host runs")
    g.add_argument("--num-processes", type=int, help="number of processes (hosts)")
    g.add_argument("--process-id", type=int, help="this process's index")
    g.add_argument("--distributed", choices=("off", "auto"), default="off",
                   help="auto: let JAX detect the cluster (TPU pod slice, SLURM, Open MPI)")
    g.add_argument("--heartbeat-timeout", type=int, default=30,
                   help="seconds without a peer's heartbeat before this process exits with an error")
    g.add_argument("--ep-capacity", type=ep_capacity, default=2.0, metavar="X|worst",
                   help="expert-parallel all-to-all buffer per pair of devices, in multiples of the balanced "
                        "share (rows past it go in further rounds; none is dropped); 'worst': one round sized "
                        "for the worst case (default 2)")


def ep_capacity(text: str) -> float | None:
    """``--ep-capacity``: a number > 0, or ``worst`` (``None``: one worst-case exchange)."""
    if text.strip().lower() == "worst":
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 0 or 'worst', got {text!r}")
    return value


def check_args(args: argparse.Namespace) -> None:
    """Rejects multi-host settings that make no sense (the flags of :func:`add_args`, or the
    environment variables), before anything is loaded. :func:`init` calls it too."""
    hb = args.heartbeat_timeout
    if hb is not None and hb <= 0:
        raise DeepSeekError(f"--heartbeat-timeout must be > 0 seconds, got {hb}")
    nproc, pid = _num_processes(args), _process_id(args)
    if nproc is not None and nproc < 1:
        raise DeepSeekError(f"--num-processes must be >= 1, got {nproc}")
    if pid is not None and pid < 0:
        raise DeepSeekError(f"--process-id must be >= 0, got {pid}")
    if nproc is not None and pid is not None and pid >= nproc:
        raise DeepSeekError(f"--process-id {pid} is out of range for --num-processes {nproc} (0..{nproc - 1})")
    coord = args.coordinator or os.environ.get("DEEPSEEK_JAX_COORDINATOR")
    # host:port, [IPv6%zone]:port or dns:///host:port
    m = re.fullmatch(r"(dns:///)?(\[[^\]\s]+\]|[^\s:\[\]/]+):([0-9]{1,5})", coord) if coord else None
    if coord and not (m and 1 <= int(m.group(3)) <= 65535):
        raise DeepSeekError(f"--coordinator: expected HOST:PORT (a port in 1..65535), got {coord!r}")
    if (nproc is not None or pid is not None) and not coord and args.distributed != "auto":
        given = ("--num-processes" if args.num_processes is not None else "--process-id" if args.process_id is not None
                 else "DEEPSEEK_JAX_NUM_PROCESSES" if nproc is not None else "DEEPSEEK_JAX_PROCESS_ID")
        raise DeepSeekError(f"{given} needs --coordinator HOST:PORT (or DEEPSEEK_JAX_COORDINATOR, or --distributed "
                            "auto); without it this would run as one process")


def init(args: argparse.Namespace, default_mesh=None):
    """Initialises multi-host JAX if asked, then returns the mesh (or ``None`` for one device).
    Without ``--mesh``, ``default_mesh(n_devices)`` gives the sizes (default: all devices on
    ``expert``)."""
    import jax

    from deepseek_jax import sharding

    check_args(args)
    coord = args.coordinator or os.environ.get("DEEPSEEK_JAX_COORDINATOR")
    if coord or args.distributed == "auto":
        nproc, pid = _num_processes(args), _process_id(args)
        if coord and (nproc is None or pid is None):
            raise DeepSeekError("--coordinator needs --num-processes and --process-id (or the env vars)")
        try:
            jax.distributed.initialize(coordinator_address=coord, num_processes=nproc, process_id=pid,
                                       heartbeat_timeout_seconds=args.heartbeat_timeout,
                                       initialization_timeout=max(60, args.heartbeat_timeout))
        except Exception as e:  # noqa: BLE001 - turn a connection failure into one line
            raise DeepSeekError(f"distributed initialisation failed: {str(e).splitlines()[0]}") from None
        if os.environ.get("DEEPSEEK_JAX_TEST_DIE_AFTER_INIT") == str(jax.process_index()):
            os._exit(17)  # test hook: simulates a host dying mid-run (tests/test_multihost.py)
    if jax.process_count() > 1:
        global _PROCESS
        _PROCESS = (jax.process_index(), jax.process_count())
        # (the agreement check's all-gather failed on it deep inside JAX: "cannot reshape"); decided
        # from the global device list, so that every process takes the same branch
        per = collections.Counter(d.process_index for d in jax.devices())
        if len(set(per.values())) > 1:
            raise DeepSeekError(f"this process has {jax.local_device_count()} of the {jax.device_count()} devices of "
                                f"{jax.process_count()} processes: every process must have as many devices")
        _check_processes_agree(args)
    n = jax.device_count()
    sizes = sharding.parse_mesh(args.mesh, n) if args.mesh or default_mesh is None else default_mesh(n)
    total = sizes["data"] * sizes["expert"] * sizes["model"]
    if total == 1 and jax.process_count() == 1:
        return None
    if jax.process_count() > 1 and total != n:
        raise DeepSeekError(f"--mesh {args.mesh} uses {total} of the {n} devices of {jax.process_count()} "
                            "processes: on several hosts the mesh must span all of them")
    return sharding.make_mesh(sizes, jax.devices()[:total])


def _path_digest(path: str) -> bytes:
    """What a process reads at ``path``, cheaply: a file's bytes (past 64 MiB: its size, first
    and last MiB); a folder's top-level names, and its files' sizes and bytes (past 1 MiB: the
    first and last 256 KiB): a Hub checkpoint's config.json, index and shard headers, an Orbax
    one's manifest (every parameter's checksum), without walking its ~10^5 chunk files. Hidden
    entries are left out: a download tool's ``.cache`` (timestamps), ``.git``, lock files."""
    h = hashlib.sha256()

    def file(p: str, cap: int, edge: int) -> None:
        size = os.path.getsize(p)
        with open(p, "rb") as f:
            if size <= cap:
                h.update(f.read())
                return
            h.update(str(size).encode() + f.read(edge))
            f.seek(size - edge)
            h.update(f.read())

    try:
        if os.path.isfile(path):
            file(path, 64 << 20, 1 << 20)
            return h.digest()
        for name in sorted(n for n in os.listdir(path) if not n.startswith(".")):
            p = os.path.join(path, name)
            if os.path.isfile(p):
                h.update(f"{name}\0{os.path.getsize(p)}\0".encode())
                file(p, 1 << 20, 1 << 18)
            else:
                h.update(f"{name}/\0".encode())
    except OSError as e:
        h.update(f"unreadable: {e.strerror}".encode())
    return h.digest()


def _check_processes_agree(args: argparse.Namespace) -> None:
    """Every process must run the same command on the same inputs: processes given other files
    or flags computed their own rows of one result (process 0 wrote rows of two checkpoints), or
    waited on each other until the distributed service aborted. One all-gather of a few digests
    finds it first, on every process alike, so all of them stop with the same line."""
    import numpy as np
    from jax.experimental import multihost_utils

    plain = (str, int, float, bool, type(None), list, tuple)   # the flags (not the CLI's own objects)
    settings = {k: v for k, v in sorted(vars(args).items()) if k not in _PER_PROCESS_ARGS and isinstance(v, plain)}
    env = {k: v for k, v in sorted(os.environ.items()) if k.startswith("DEEPSEEK_JAX_") and k not in _PER_PROCESS_ENV}
    parts = [("the command's arguments", repr(settings).encode()), ("the DEEPSEEK_JAX_* environment", repr(env).encode())]
    for name in _INPUT_ARGS:
        v = getattr(args, name, None)
        what = f"the contents of --{name.replace('_', '-')} {v}" if name != "ckpt" else f"the contents of {v}"
        parts.append((what, _path_digest(v) if isinstance(v, str) and os.path.exists(v) else b"absent"))
    mine = np.stack([np.frombuffer(hashlib.sha256(x).digest(), np.uint8) for _, x in parts])
    every = np.asarray(multihost_utils.process_allgather(mine))
    for pid in range(1, every.shape[0]):
        for k, (what, _) in enumerate(parts):
            if not np.array_equal(every[pid, k], every[0, k]):
                raise DeepSeekError(f"process {pid} differs from process 0 in {what}: every process must run "
                                    "the same command on the same files")


def check_shared_dir(path: str, flag: str) -> None:
    """On several processes, that every one sees the directory process 0 sees at ``path``: they
    write one checkpoint there together. A relative path from other working directories, or a
    disk that is not shared, made each process write its own copy, and the first save hung (no
    error, no heartbeat timeout). Process 0 leaves a file of a random name there; each process
    looks for it."""
    import jax

    if jax.process_count() == 1:
        return
    import secrets

    import numpy as np
    from jax.experimental import multihost_utils

    token = np.asarray(multihost_utils.broadcast_one_to_all(np.frombuffer(secrets.token_bytes(8), np.uint8)))
    probe = os.path.join(path, f".deepseek_jax_host_check_{bytes(token.astype(np.uint8)).hex()}")
    written = True
    if is_main():
        try:
            open(probe, "w").close()
        except OSError:   # (told to every process below: none waits for a file that never comes)
            written = False
    ok = np.asarray(multihost_utils.broadcast_one_to_all(np.array([written], np.uint8)))
    if not ok.all():
        raise DeepSeekError(f"{flag} {path}: process 0 cannot write there")
    # (the broadcast is also the barrier: process 0's file exists before anyone looks)
    seen = np.asarray(multihost_utils.process_allgather(np.array([os.path.exists(probe)])))
    if is_main():
        os.remove(probe)
    blind = [i for i, ok in enumerate(seen.reshape(-1)) if not ok]
    if blind:
        raise DeepSeekError(f"{flag} {path}: process {blind[0]} does not see process 0's directory there: on several "
                            "hosts it must be one directory every host sees at the same absolute path")


def is_main() -> bool:
    import jax

    return jax.process_index() == 0


def may_be_main(args: argparse.Namespace) -> bool:
    """Before :func:`init`: whether this process is (or may be) process 0, by ``--process-id`` or
    ``DEEPSEEK_JAX_PROCESS_ID`` (unknown, with ``--distributed auto``: true). What only process 0
    writes or prints is checked or said by it alone: another host need not have an output's folder."""
    try:
        return _process_id(args) in (None, 0)
    except DeepSeekError:   # (check_args says so)
        return True


def in_several_processes() -> bool:
    """Whether :func:`init` started a run of several processes."""
    return _PROCESS is not None


def quiet_unless_main(args: argparse.Namespace) -> None:
    """Every process runs the same command and process 0 prints: the others' stdout and stderr go
    to /dev/null while the command runs (``args.exit_stack``, set by ``cli.main``, which restores
    them before it prints an error: a process that fails still says why, naming itself)."""
    import contextlib

    if is_main():
        return
    stack = getattr(args, "exit_stack", None)
    sink = open(os.devnull, "w")
    if stack is None:
        sys.stdout = sink
        return
    stack.enter_context(sink)
    stack.enter_context(contextlib.redirect_stdout(sink))
    stack.enter_context(contextlib.redirect_stderr(sink))


def process_label() -> str:
    """``"process N: "`` once :func:`init` has started a multi-process run, else ``""``."""
    return "" if _PROCESS is None else f"process {_PROCESS[0]} of {_PROCESS[1]}: "


def _process_id(args: argparse.Namespace) -> int | None:
    """``--process-id``, else ``DEEPSEEK_JAX_PROCESS_ID``, else ``None``."""
    pid = getattr(args, "process_id", None)
    return pid if pid is not None else _env_int("DEEPSEEK_JAX_PROCESS_ID")


def _num_processes(args: argparse.Namespace) -> int | None:
    """``--num-processes``, else ``DEEPSEEK_JAX_NUM_PROCESSES``, else ``None``."""
    n = getattr(args, "num_processes", None)
    return n if n is not None else _env_int("DEEPSEEK_JAX_NUM_PROCESSES")


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    if v is None:
        return None
    if not v.isdigit():
        raise DeepSeekError(f"{name}={v!r} is not a non-negative integer")
    return int(v)
