"""Hub safetensors <-> Orbax checkpoints: streaming conversion, restore, export, verify.

A converted checkpoint is a directory that Orbax restores in one standard call
(``ocp.PyTreeCheckpointer().restore`` / ``ocp.StandardCheckpointer().restore``) into exactly the
model's parameter state, ``nnx.split(abstract_model(cfg, with_mtp=...))[1]``: layers and experts
stacked as the model scans them, FP8 weights kept as ``float8_e4m3fn`` beside their float32
``weight_scale_inv`` (or dequantized to bf16 with ``dtype="bf16"``).

Design (orbax-checkpoint 0.12.4, tensorstore 0.1.86)
----------------------------------------------------
Orbax's own save needs every array of the tree materialised at once: the whole model in memory
(690 GB for DeepSeek-V3), which is what makes today's JAX converters need terabytes.  0.12.4 also
has an experimental incremental save (``orbax.checkpoint.experimental.v1.partial.save`` then
``finalize``), but it adds whole leaves: with layers and experts stacked, one leaf (the routed
experts' ``up_proj`` weight) is 218 GB, so peak memory would still be the largest stacked array,
and it writes the v1 layout (``<dir>/state/``).  An OCDBT checkpoint cannot be written array by
array, let alone slice by slice, from outside Orbax without reimplementing its manifest.  But
Orbax's non-OCDBT layout (``use_ocdbt=False``, zarr v2, what ``PyTreeCheckpointHandler`` writes
with that option) is simple and fully described by three things, which this module writes itself:

* one zarr v2 array per leaf in ``<dir>/<dotted key path>/`` (``.zarray`` + chunk files),
  written here with tensorstore directly: Orbax reads arrays back through tensorstore using
  whatever chunking the ``.zarray`` declares;
* ``_METADATA``: the tree structure (key paths, key types, ``value_type: jax.Array``), the same
  JSON Orbax writes (``tests/test_convert.py`` checks it against an Orbax save of the same state);
* ``_CHECKPOINT_METADATA`` and ``array_metadatas/process_0`` (informational).

Writing the arrays ourselves lets us choose the chunking: one chunk per Hub tensor (one layer of
one expert: 14.7 MB for a routed-expert FP8 weight), small per-layer tensors grouped across the
trailing stack axis (<= 8 MiB per chunk), tensors above 64 MiB (embeddings) split into row
blocks.  Each chunk is read from the source shard (``pread``, no memory map, so resident memory
is the chunk itself), checksummed, and written; a bounded pool keeps at most ~256 MiB in flight,
so peak memory is a few chunks plus the interpreter, whatever the model size.  On restore,
``jax.ShapeDtypeStruct`` targets with shardings make each process read only the chunks its
shards overlap.  Chunks are stored uncompressed: FP8 payloads are close to incompressible and
restore then costs no decompression.

Atomicity and resume: while converting, ``out_dir`` holds only the arrays, a state file (the
options and a fingerprint of the source) and an append-only journal of finished chunks with
their sha256.  ``_METADATA``, ``config.json``, the manifest and finally the ``CONVERT_COMPLETE``
marker are written at the end, so nothing looks complete before it is.  Every 4 GiB the chunks
written since the last sync point are ``fsync``-ed and a sync line is appended to the journal
(tensorstore's own per-write fsync is off: it costs throughput); only journal entries before the
last sync line are trusted.  ``resume=True`` removes every chunk file not trusted that way (a chunk
being written when the process died included) and writes only those chunks again; chunk bytes
are a pure function of the source, so the result is bit-identical to an uninterrupted run.  No
timestamps or output paths are recorded anywhere.

Manifest (``deepseek_jax_manifest.json``): source file names and sizes, tensor count, dtypes,
versions, chunk shapes, and per parameter a sha256 over the sha256 digests of its chunks in
C order of the chunk grid (so it is computed chunk by chunk, in bounded memory, both here and in
:func:`verify`).  The marker holds the manifest's sha256.

Test hook: with ``DEEPSEEK_JAX_CONVERT_DIE_AFTER=N`` in the environment the converter calls
``os._exit(75)`` right after journaling its N-th chunk (simulates a kill; used by the tests).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import threading
import time
from typing import Any, Iterator, Mapping

import ml_dtypes
import numpy as np

from deepseek_jax.config import DeepSeekConfig
from deepseek_jax.errors import DeepSeekError
from deepseek_jax.hub import (
    CONFIG_FILE,
    INDEX_FILE,
    SINGLE_FILE,
    HubReader,
    HubWriter,
    TensorInfo,
    dequantize_block_fp8_np,
    hub_tensor_specs,
    missing_extent,
    quantize_block_fp8_np,
    read_safetensors_header,
    spec_mismatches,
    write_config,
)
from deepseek_jax.quant import Precision

__all__ = ["MANIFEST", "MARKER", "HubView", "convert", "export", "is_complete", "is_orbax_checkpoint", "restore",
           "verify"]

MANIFEST = "deepseek_jax_manifest.json"
MARKER = "CONVERT_COMPLETE"
FORMAT = "deepseek_jax.orbax/1"
STATE_FILE = ".deepseek_jax_convert_state.json"
JOURNAL_FILE = ".deepseek_jax_convert_journal"
DIE_AFTER_ENV = "DEEPSEEK_JAX_CONVERT_DIE_AFTER"
DIE_EXIT_CODE = 75

# Orbax's files (non-OCDBT PyTree layout).
_ORBAX_METADATA = "_METADATA"
_ORBAX_CKPT_METADATA = "_CHECKPOINT_METADATA"
_ORBAX_ARRAY_METADATAS = "array_metadatas"
_ORBAX_HANDLER = "orbax.checkpoint._src.handlers.standard_checkpoint_handler.StandardCheckpointHandler"

GROUP_MAX_BYTES = 8 << 20      # small per-layer tensors share a chunk up to this size
CHUNK_MAX_BYTES = 64 << 20     # larger single tensors are split into row blocks of at most this
INFLIGHT_BYTES = 256 << 20     # bytes of chunks being read/written at once
SYNC_EVERY_BYTES = 4 << 30     # fsync written chunks (a resume sync point) every this many bytes
_SYNC_LINE = "#synced\n"
WORKERS = 0                    # threads reading/hashing/writing chunks (0: 2 per CPU, 4 to 16)
EXTRA_FILE_MAX_BYTES = 64 << 20
_DEQUANT_ROWS = 1024           # rows dequantized at a time (a multiple of the 128 FP8 block)
_FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
_BF16 = np.dtype(ml_dtypes.bfloat16)
_FLOATS = frozenset({_BF16, np.dtype(np.float32), np.dtype(np.float16)})
_DTYPE_ARGS = ("fp8", "bf16")


def _err(msg: str) -> DeepSeekError:
    return DeepSeekError(" ".join(str(msg).split()))


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("deepseek-jax")
    except Exception:  # pragma: no cover - not installed
        return "unknown"


def _pkg_version(name: str) -> str:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # pragma: no cover
        return "unknown"


def _write_atomic(path: str, data: bytes | str) -> None:
    tmp = path + ".tmp"
    mode = "w" if isinstance(data, str) else "wb"
    with open(tmp, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: str, obj: Any, **kw: Any) -> None:
    _write_atomic(path, json.dumps(obj, **kw) + ("\n" if kw.get("indent") is not None else ""))


def _read_json(path: str, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise _err(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _err(f"{path}: cannot read {what} ({e})") from None


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# The plan: model parameters, their Hub sources and their chunking
# --------------------------------------------------------------------------------------------


def _chunk_shape(stack: tuple[int, ...], per: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """One Hub tensor per chunk; small ones grouped over trailing stack axes; big ones row-split."""
    k = len(stack)
    chunk = [1] * k + list(per)
    group = math.prod(per) * itemsize
    j = k
    while j > 0 and group * stack[j - 1] <= GROUP_MAX_BYTES:
        group *= stack[j - 1]
        chunk[j - 1] = stack[j - 1]
        j -= 1
    if j == k and per and math.prod(per) * itemsize > CHUNK_MAX_BYTES:
        row_bytes = math.prod(per[1:]) * itemsize
        rows = max(128, (CHUNK_MAX_BYTES // max(row_bytes, 1)) // 128 * 128)  # FP8 block aligned
        chunk[k] = min(per[0], rows)
    return tuple(chunk)


@dataclasses.dataclass
class _Param:
    path: tuple[str, ...]        # model path, e.g. ('moe_layers', 'mlp', 'experts', 'up_proj', 'weight')
    shape: tuple[int, ...]
    dtype: np.dtype
    names: np.ndarray            # object array of Hub names, shape = stack
    chunks: tuple[int, ...]
    dequant: bool = False        # FP8 Hub weight stored as bf16 (names[...] + "_scale_inv" are the scales)
    cast: bool = False           # some of its Hub tensors are another float dtype (F32 / F16 -> BF16)

    @property
    def key(self) -> str:
        return ".".join(self.path)

    @property
    def array(self) -> str:
        """Orbax's name of the array (its directory): the dotted key path incl. ``value``."""
        return self.key + ".value"

    @property
    def keypath(self) -> tuple[str, ...]:
        return self.path + ("value",)

    @property
    def stack(self) -> tuple[int, ...]:
        return self.names.shape

    @property
    def per(self) -> tuple[int, ...]:
        return self.shape[len(self.stack):]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(-(-s // c) for s, c in zip(self.shape, self.chunks))

    def region(self, g: tuple[int, ...]) -> tuple[slice, ...]:
        return tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(g, self.chunks, self.shape))

    def iter_chunks(self) -> Iterator[tuple[int, tuple[int, ...]]]:
        for flat, g in enumerate(np.ndindex(*self.grid)):
            yield flat, g


def _model_params(cfg: DeepSeekConfig, with_mtp: bool) -> list[tuple[tuple[str, ...], tuple[int, ...], np.dtype]]:
    """(path, shape, dtype) of every leaf of the model state, in ``nnx`` order."""
    from flax import nnx

    from deepseek_jax.checkpoint import abstract_model

    _, state = nnx.split(abstract_model(cfg, Precision(), with_mtp))
    return [(tuple(str(p) for p in path), tuple(v.shape), np.dtype(v.dtype))
            for path, v in nnx.to_flat_state(state)]


def _plan(cfg: DeepSeekConfig, with_mtp: bool) -> list[_Param]:
    """Parameters of the model built from ``cfg`` (fp8 as ``cfg.fp8``), with Hub names and chunks."""
    from deepseek_jax.checkpoint import hub_slot

    out = []
    for path, shape, dtype in _model_params(cfg, with_mtp):
        slot = hub_slot(path, cfg)
        stack = slot.stack
        if tuple(shape[:len(stack)]) != tuple(stack):  # pragma: no cover - model/mapping bug
            raise _err(f"internal: parameter {'.'.join(path)} of shape {list(shape)} does not stack {list(stack)}")
        out.append(_Param(path, shape, dtype, slot.names, _chunk_shape(stack, shape[len(stack):], dtype.itemsize)))
    return out


# --------------------------------------------------------------------------------------------
# Reading the Hub source without memory maps
# --------------------------------------------------------------------------------------------


class _Source:
    """The validated Hub checkpoint: :class:`HubReader` for names/infos, ``pread`` for bytes."""

    def __init__(self, hf_dir: str):
        self.path = hf_dir
        self.reader = HubReader(hf_dir)
        self._fds: dict[str, int] = {}
        self._offsets: dict[str, int] = {}
        self._parsed: set[str] = set()
        self._lock = threading.Lock()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self.reader.close()

    def _fd_and_offset(self, name: str) -> tuple[int, int]:
        with self._lock:
            off = self._offsets.get(name)
            file = self.reader.file_of(name)
            if off is None and file not in self._parsed:
                header = read_safetensors_header(os.path.join(self.path, file))
                self._parsed.add(file)
                for n, e in header.entries.items():
                    if n in self.reader and self.reader.file_of(n) == file:
                        self._offsets[n] = header.data_start + e.begin
                off = self._offsets.get(name)
                if off is None:
                    raise _err(f"{os.path.join(self.path, file)}: tensor {name!r} is listed in the index "
                               "but absent from this shard")
            fd = self._fds.get(file)
            if fd is None:
                try:
                    fd = os.open(os.path.join(self.path, file), os.O_RDONLY)
                except OSError as e:
                    raise _err(f"{os.path.join(self.path, file)}: cannot open ({e.strerror or e})") from None
                self._fds[file] = fd
            return fd, off

    def read_into(self, name: str, out: np.ndarray, row0: int = 0) -> None:
        """Reads rows ``row0 : row0 + len(out)`` of tensor ``name`` into the C-contiguous ``out``."""
        info = self.reader.info(name)
        fd, off = self._fd_and_offset(name)
        row_bytes = (math.prod(info.shape[1:]) if info.shape else 1) * info.dtype.itemsize
        view = memoryview(out.reshape(-1).view(np.uint8))
        pos, want = off + row0 * row_bytes, out.nbytes
        done = 0
        while done < want:
            try:
                n = os.preadv(fd, [view[done:]], pos + done)
            except OSError as e:
                raise _err(f"{os.path.join(self.path, info.file)}: read error in tensor {name!r} "
                           f"({e.strerror or e})") from None
            if n <= 0:
                raise _err(f"{os.path.join(self.path, info.file)}: truncated shard, tensor {name!r} "
                           "ends past the end of the file")
            done += n

    def read(self, name: str) -> np.ndarray:
        info = self.reader.info(name)
        out = np.empty(info.shape, info.dtype)
        if out.nbytes:
            self.read_into(name, out)
        return out


#: bytes hashed at each end of every source shard: two fine-tunes of one architecture have the
#: same file names, sizes and config.json, but not the same weights
_SAMPLE_HEAD, _SAMPLE_TAIL = 1 << 20, 1 << 18


def _source_sample(hf_dir: str, files: list[tuple[str, int]]) -> str:
    """sha256 over the first MiB (the header, then the first tensors) and the last 256 KiB of
    every shard: what ``--resume`` and a finished conversion compare beside names and sizes."""
    h = hashlib.sha256()
    for name, size in files:
        try:
            with open(os.path.join(hf_dir, name), "rb") as f:
                h.update(f.read(_SAMPLE_HEAD))
                if size > _SAMPLE_HEAD:
                    f.seek(max(_SAMPLE_HEAD, size - _SAMPLE_TAIL))
                    h.update(f.read(_SAMPLE_TAIL))
        except OSError as e:
            raise _err(f"{os.path.join(hf_dir, name)}: cannot read ({e.strerror or e})") from None
    return h.hexdigest()


def _scale_name(name: str) -> str:
    return name + "_scale_inv"


def _fill_chunk(src: _Source, p: _Param, region: tuple[slice, ...]) -> np.ndarray:
    """The C-contiguous bytes of ``p[region]`` assembled from the Hub tensors."""
    k = len(p.stack)
    buf = np.empty(tuple(r.stop - r.start for r in region), p.dtype)
    stack_ranges = [range(r.start, r.stop) for r in region[:k]]
    if p.per:
        r0, r1 = region[k].start, region[k].stop
    else:
        r0, r1 = 0, 1
    for local, idx in zip(np.ndindex(*buf.shape[:k]), _product(stack_ranges)):
        name = p.names[idx]
        dst = buf[local] if k else buf
        if not p.dequant:
            have = src.reader.info(name).dtype if p.cast else p.dtype
            if have == p.dtype:
                src.read_into(name, dst, r0)
            else:   # rounded to BF16 (or widened to F32) as numpy casts: nearest, ties to even
                tmp = np.empty(dst.shape, have)
                src.read_into(name, tmp, r0)
                dst[...] = tmp.astype(p.dtype)
            continue
        cols = p.per[1]
        sc = src.read(_scale_name(name))
        if not np.all(np.isfinite(sc)):
            raise _err(f"{src.path}: tensor {_scale_name(name)} has non-finite scales")
        for a in range(r0, r1, _DEQUANT_ROWS):
            b = min(a + _DEQUANT_ROWS, r1)
            wq = np.empty((b - a, cols), _FP8)
            src.read_into(name, wq, a)
            w = dequantize_block_fp8_np(wq, sc[a // 128: -(-b // 128)])
            dst[a - r0: b - r0] = w.astype(_BF16)
    return buf


def _product(ranges: list[range]) -> Iterator[tuple[int, ...]]:
    if not ranges:
        yield ()
        return
    for idx in np.ndindex(*[len(r) for r in ranges]):
        yield tuple(r[i] for r, i in zip(ranges, idx))


# --------------------------------------------------------------------------------------------
# Validation of the source (before anything big is written)
# --------------------------------------------------------------------------------------------


def _mtp_layer(name: str, n_layers: int, n_mtp: int = 1) -> bool:
    """A tensor of the MTP layers, ``model.layers.{n_layers} .. {n_layers + n_mtp - 1}``."""
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return bool(m) and n_layers <= int(m.group(1)) < n_layers + n_mtp


def _left_out_mtp_layers(reader, cfg: DeepSeekConfig) -> int:
    """How many layers past ``num_hidden_layers`` are MTP layers a conversion without MTP leaves
    out: the config's count, or with ``num_nextn_predict_layers: 0`` one, if the files' layer n is
    an MTP layer (has ``eh_proj``, as :func:`~deepseek_jax.checkpoint.hub_layout` tells them)."""
    n = cfg.num_hidden_layers
    return cfg.num_nextn_predict_layers or int(f"model.layers.{n}.eh_proj.weight" in reader)


def _validate_source(src: _Source, dtype: str | None, mtp: bool
                     ) -> tuple[DeepSeekConfig, DeepSeekConfig, bool, list[_Param], int]:
    """Checks config, tensor names/shapes/dtypes and scales; returns (src cfg, out cfg, with_mtp, plan, n)."""
    reader = src.reader
    try:
        cfg = DeepSeekConfig.from_hub_dict(reader.config)
    except DeepSeekError as e:
        raise _err(f"{os.path.join(src.path, CONFIG_FILE)}: {e}") from None
    if dtype is None:
        dtype = "fp8" if cfg.fp8 else "bf16"
    if dtype == "fp8" and not cfg.fp8:
        raise _err(f"{src.path}: --dtype fp8 needs an FP8 checkpoint (config.json has no fp8 "
                   "quantization_config); this one is BF16")
    n = cfg.num_hidden_layers
    lacking = missing_extent(reader, cfg)
    if lacking is not None:
        raise _err(f"{src.path}: missing tensor {lacking}: config.json ({n} layers, {cfg.n_routed_experts} "
                   "routed experts) disagrees with the weights")
    with_mtp = bool(mtp and cfg.num_nextn_predict_layers)
    if with_mtp and not any(_mtp_layer(x, n) for x in reader.names()):
        if f"model.layers.{n - 1}.eh_proj.weight" in reader:
            raise _err(f"{src.path}: config.json has num_hidden_layers={n}, but model.layers.{n - 1} is "
                       f"the MTP layer (it has eh_proj): the weights have {n - 1} decoder layers")
        raise _err(f"{src.path}: config.json has num_nextn_predict_layers="
                   f"{cfg.num_nextn_predict_layers} but the checkpoint has no model.layers.{n}.* "
                   "(MTP) tensors; pass --no-mtp")
    if with_mtp and cfg.num_nextn_predict_layers > 1:
        raise _err(f"{src.path}: config.json has num_nextn_predict_layers={cfg.num_nextn_predict_layers}: "
                   "the model has one MTP layer (DeepSeek-V3's); pass --no-mtp to convert without them")
    specs = hub_tensor_specs(reader.config, include_mtp=with_mtp, fp8=cfg.fp8)
    problems = spec_mismatches(reader, specs, any_float=True)
    if not with_mtp:   # an MTP layer in the files is left out (as dj.load does, even when the config
        # says num_nextn_predict_layers=0: then only a layer n that is one, with eh_proj); any other
        # tensor is a mismatch (a decoder layer past num_hidden_layers above all)
        left_out = _left_out_mtp_layers(reader, cfg)
        problems = [p for p in problems if not (p.startswith("unexpected tensor") and
                                                _mtp_layer(p.split("'")[1], n, left_out))]
    if problems:
        hint = ""
        if "_scale_inv" in problems[0] and problems[0].startswith("missing"):
            hint = " (FP8 weights need their block scales)"
        elif problems[0].startswith("unexpected"):
            hint = " (config.json has no place for it: does num_hidden_layers match the weights?)"
        elif not problems[0].startswith("missing"):
            hint = " (the shape or dtype disagrees with config.json)"
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise _err(f"{src.path}: checkpoint does not match config.json: {problems[0]}{hint}{more}")
    out_cfg = cfg.replace(fp8=(dtype == "fp8"))
    if not with_mtp and cfg.num_nextn_predict_layers:
        out_cfg = out_cfg.replace(num_nextn_predict_layers=0)
    plan = _plan(out_cfg, with_mtp)
    used: set[str] = set()
    for p in plan:
        for idx in np.ndindex(*p.stack):
            name = p.names[idx]
            info = reader.info(name)
            if tuple(info.shape) != p.per:
                raise _err(f"{src.path}: tensor {name} has shape {list(info.shape)}, config.json "
                           f"implies {list(p.per)}")
            if info.dtype == p.dtype:
                pass
            elif info.dtype == _FP8 and p.dtype == _BF16:
                p.dequant = True
                used.add(_scale_name(name))
            elif info.dtype in _FLOATS and p.dtype in _FLOATS:
                p.cast = True
            else:
                raise _err(f"{src.path}: tensor {name} is {info.dtype}, the model needs {p.dtype}")
            used.add(name)
    unused = [x for x in specs if x not in used]
    if unused:  # pragma: no cover - mapping bug
        raise _err(f"internal: Hub tensor {unused[0]} maps to no model parameter")
    # Block scales are small (1/16384 of the weights): check them all now.
    for name in specs:
        if name.endswith("_scale_inv"):
            s = src.read(name)
            if not np.all(np.isfinite(s)):
                raise _err(f"{src.path}: tensor {name} has non-finite scales")
    return cfg, out_cfg, with_mtp, plan, len(specs)


# --------------------------------------------------------------------------------------------
# Orbax metadata
# --------------------------------------------------------------------------------------------


def _orbax_tree_metadata(plan: list[_Param]) -> dict[str, Any]:
    """``_METADATA`` as ``PyTreeCheckpointHandler(use_ocdbt=False)`` writes it for this state."""
    tree = {}
    for p in plan:
        tree[str(p.keypath)] = {
            "key_metadata": [{"key": k, "key_type": 2} for k in p.keypath],
            "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False,
                               "write_shape": list(p.shape)},
        }
    return {"tree_metadata": tree, "use_ocdbt": False, "use_zarr3": False,
            "store_array_data_equal_to_fill_value": True, "custom_metadata": None}


def _write_orbax_metadata(out_dir: str, plan: list[_Param]) -> None:
    _write_json(os.path.join(out_dir, _ORBAX_METADATA), _orbax_tree_metadata(plan))
    os.makedirs(os.path.join(out_dir, _ORBAX_ARRAY_METADATAS), exist_ok=True)
    _write_json(os.path.join(out_dir, _ORBAX_ARRAY_METADATAS, "process_0"), {"array_metadatas": [
        {"array_metadata": {"param_name": p.array, "write_shape": list(p.shape),
                            "chunk_shape": list(p.chunks), "ext_metadata": None}} for p in plan]})
    _write_json(os.path.join(out_dir, _ORBAX_CKPT_METADATA), {
        "item_handlers": _ORBAX_HANDLER, "metrics": {}, "performance_metrics": {},
        "init_timestamp_nsecs": None, "commit_timestamp_nsecs": None, "custom_metadata": {}})


def _ts_context():
    import tensorstore as ts
    return ts.Context({"file_io_concurrency": {"limit": 32}, "file_io_sync": False})


def _open_array(out_dir: str, p: _Param, ctx, *, create: bool):
    import tensorstore as ts
    spec: dict[str, Any] = {
        "driver": "zarr",
        "kvstore": {"driver": "file", "path": os.path.join(out_dir, p.array)},
        "recheck_cached_data": False,
        "recheck_cached_metadata": False,
    }
    if create:
        spec["metadata"] = {"shape": list(p.shape), "chunks": list(p.chunks), "compressor": None,
                            "dtype": _zarr_dtype(p.dtype)}
        return ts.open(spec, create=True, open=True, context=ctx).result()
    return ts.open(spec, open=True, context=ctx).result()


def _zarr_dtype(dt: np.dtype) -> str:
    return {"float32": "<f4", "bfloat16": "bfloat16", "float8_e4m3fn": "float8_e4m3fn"}[np.dtype(dt).name]


def _chunk_key(g: tuple[int, ...]) -> str:
    return ".".join(str(i) for i in g) if g else "0"


def _combine(digests: list[str]) -> str:
    h = hashlib.sha256()
    for d in digests:
        h.update(bytes.fromhex(d))
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------------------------


def _extra_files(hf_dir: str, reserved: set[str]) -> list[str]:
    """Small top-level non-weight files to carry along (tokenizer, generation config, ...)."""
    out = []
    for name in sorted(os.listdir(hf_dir)):
        path = os.path.join(hf_dir, name)
        if (name.startswith(".") or name in reserved or name.endswith((".safetensors", ".tmp"))
                or name in (CONFIG_FILE, INDEX_FILE) or not os.path.isfile(path)
                or os.path.getsize(path) > EXTRA_FILE_MAX_BYTES):
            continue
        out.append(name)
    return out


def _reserved(plan: list[_Param]) -> set[str]:
    return {MANIFEST, MARKER, STATE_FILE, JOURNAL_FILE, _ORBAX_METADATA, _ORBAX_CKPT_METADATA,
            _ORBAX_ARRAY_METADATAS, "_sharding", "commit_success.txt", "manifest.ocdbt", CONFIG_FILE,
            SINGLE_FILE, INDEX_FILE} | {p.array for p in plan}


def is_complete(ckpt_dir: str | os.PathLike[str]) -> bool:
    """True if ``ckpt_dir`` holds a finished conversion (the marker exists)."""
    return os.path.isfile(os.path.join(os.fspath(ckpt_dir), MARKER))


def is_orbax_checkpoint(path: str | os.PathLike[str]) -> bool:
    """True for an Orbax checkpoint directory or a (possibly unfinished) conversion into one."""
    path = os.fspath(path)
    return any(os.path.exists(os.path.join(path, f)) for f in (_ORBAX_METADATA, MANIFEST, STATE_FILE, MARKER))


def _check_dtype_arg(dtype: str | None) -> None:
    if dtype is not None and dtype not in _DTYPE_ARGS:
        raise _err(f"unknown dtype {dtype!r} (choose fp8 or bf16)")


def _empty_dir(path: str) -> None:
    """Deletes what ``path`` holds; the folder itself stays (it may be a symbolic link's target)."""
    for entry in os.scandir(path):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.remove(entry.path)


def _lock_dir(path: str, command: str) -> int | None:
    """An exclusive advisory lock (``flock``) on the directory ``path`` while ``command`` writes
    there; returns the descriptor that holds it (closing it releases it; so does the process's
    end, a kill included), None where the file system has no locks. Two runs into one directory
    (say, the same command started on every host of a slice) raced: one failed on another's
    half-written array, or emptied it with --force."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:   # (an unreadable folder: what comes next says what is wrong with it)
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise _err(f"{path}: another {command} is writing there now (run {command} once, on one host)") from None
    except OSError:   # (no locks on this file system)
        os.close(fd)
        return None
    return fd


def _prepare_out_dir(out_dir: str, hf_dir: str, *, resume: bool, force: bool) -> None:
    real_out, real_hf = os.path.realpath(out_dir), os.path.realpath(hf_dir)
    if real_out == real_hf or real_hf.startswith(real_out + os.sep):
        raise _err(f"{out_dir}: the output directory must not be (or contain) the source {hf_dir}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise _err(f"{out_dir}: exists and is not a directory")
    nonempty = os.path.isdir(out_dir) and bool(os.listdir(out_dir))
    if nonempty and force:
        _empty_dir(out_dir)
    elif nonempty and not resume:
        raise _err(f"{out_dir}: output directory is not empty (pass --resume to continue a conversion "
                   "or --force to overwrite)")
    elif nonempty and not (os.path.exists(os.path.join(out_dir, STATE_FILE)) or is_complete(out_dir)):
        raise _err(f"{out_dir}: --resume: no conversion in progress here (pass --force to overwrite)")
    os.makedirs(out_dir, exist_ok=True)


def convert(hf_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, dtype: str | None = None,
            mtp: bool = True, resume: bool = False, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Streams the Hub checkpoint ``hf_dir`` into an Orbax checkpoint at ``out_dir``; returns a summary.

    ``dtype``: ``"fp8"`` keeps FP8 weights and scales, ``"bf16"`` dequantizes them
    (``float32(Wq) * scale`` cast to bf16, as DeepSeek's ``fp8_cast_bf16.py``); ``None`` keeps the
    source's. F32 / F16 tensors where the Hub layout has BF16 are rounded to BF16 (nearest, ties to
    even; F32 tensors given in BF16 / F16 are widened exactly; the summary's ``cast_from`` names
    the conversions). ``mtp=False`` leaves out the MTP layer. ``resume`` continues a killed conversion;
    ``force`` deletes a non-empty ``out_dir`` first. See the module docstring for the layout.
    """
    t0 = time.time()
    hf_dir, out_dir = os.fspath(hf_dir), os.fspath(out_dir)
    _check_dtype_arg(dtype)
    src = _Source(hf_dir)
    lock = None
    try:
        src_cfg, out_cfg, with_mtp, plan, n_tensors = _validate_source(src, dtype, mtp)
        dtype = "fp8" if out_cfg.fp8 else "bf16"
        cast = sorted({f"{src.reader.info(p.names[i]).dtype} -> {p.dtype}" for p in plan if p.cast
                       for i in np.ndindex(*p.stack) if src.reader.info(p.names[i]).dtype != p.dtype})
        source_files = src.reader.source_files()
        fingerprint = {
            "format": FORMAT, "dtype": dtype, "mtp": with_mtp,
            "source_files": [[f, s] for f, s in source_files],
            "source_config_sha256": _sha256_file(os.path.join(hf_dir, CONFIG_FILE)),
            "source_sample_sha256": _source_sample(hf_dir, source_files),
            "chunks": {p.key: list(p.chunks) for p in plan},
        }
        for name in _extra_files(hf_dir, _reserved(plan)):   # copied last: unreadable, found first
            try:
                with open(os.path.join(hf_dir, name), "rb"):
                    pass
            except OSError as e:
                raise _err(f"{os.path.join(hf_dir, name)}: cannot be read ({e.strerror}): the conversion copies "
                           "the files beside the weights too") from None
        if resume and force:   # (force emptied OUT first: a partial conversion was lost without a word)
            raise _err("--resume continues the conversion in OUT and --force deletes it: pass one of them")
        if not os.path.lexists(out_dir):
            os.makedirs(out_dir, exist_ok=True)
        if os.path.isdir(out_dir):   # locked before anything in it is looked at or emptied (--force)
            lock = _lock_dir(out_dir, "convert")
        _prepare_out_dir(out_dir, hf_dir, resume=resume, force=force)
        state_path = os.path.join(out_dir, STATE_FILE)
        if is_complete(out_dir):
            manifest = _read_json(os.path.join(out_dir, MANIFEST), "manifest")
            was = manifest.get("source", {})
            same = (manifest.get("dtype") == dtype and manifest.get("mtp") == with_mtp
                    and was.get("files") == fingerprint["source_files"]
                    and was.get("sample_sha256", fingerprint["source_sample_sha256"])   # (older manifests: none)
                    == fingerprint["source_sample_sha256"]
                    and was.get("config_sha256", fingerprint["source_config_sha256"])
                    == fingerprint["source_config_sha256"])
            if not same:
                raise _err(f"{out_dir}: holds a finished conversion with other options or another "
                           "source (pass --force to overwrite)")
            for name in (JOURNAL_FILE, STATE_FILE):  # killed after the marker, before the cleanup
                if os.path.exists(os.path.join(out_dir, name)):
                    os.remove(os.path.join(out_dir, name))
            return {"out_dir": out_dir, "dtype": dtype, "already_complete": True, "params": len(plan),
                    "tensors": n_tensors, "bytes": sum(p.nbytes for p in plan), "bytes_written": 0,
                    "seconds": time.time() - t0, "resumed_chunks": 0}
        if os.path.exists(state_path):
            old = _read_json(state_path, "conversion state")
            if isinstance(old, dict) and "source_sample_sha256" not in old:   # a state file of an older version
                old = dict(old, source_sample_sha256=fingerprint["source_sample_sha256"])
            if old != fingerprint:
                raise _err(f"{out_dir}: the conversion in progress was started with other options or "
                           "another source (pass --force to start over)")
        else:
            _write_json(state_path, fingerprint, indent=1)
        summary = _write_arrays(src, plan, out_dir, progress=progress)
        _finalize(out_dir, hf_dir, plan, out_cfg, src_cfg, dtype, with_mtp, source_files, n_tensors,
                  summary["digests"], fingerprint["source_sample_sha256"])
    finally:
        src.close()
        if lock is not None:
            os.close(lock)
    seconds = time.time() - t0
    total = sum(p.nbytes for p in plan)
    return {"out_dir": out_dir, "dtype": dtype, "mtp": with_mtp, "params": len(plan), "tensors": n_tensors,
            "bytes": total, "bytes_written": summary["bytes_written"], "resumed_chunks": summary["resumed"],
            "seconds": seconds, "gb_per_s": summary["bytes_written"] / max(seconds, 1e-9) / 1e9,
            "already_complete": False, "cast_from": cast}


def _load_journal(path: str) -> dict[tuple[str, int], str]:
    """The journaled chunks up to the last sync point (later ones may not have reached the disk)."""
    done: dict[tuple[str, int], str] = {}
    if not os.path.exists(path):
        return done
    pending: dict[tuple[str, int], str] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.endswith("\n"):
                continue  # cut short by a kill
            if line == _SYNC_LINE:
                done.update(pending)
                pending = {}
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) == 3 and re.fullmatch(r"[0-9a-f]{64}", parts[2]) and parts[1].isdigit():
                pending[(parts[0], int(parts[1]))] = parts[2]
    return done


def _trusted_chunks(out_dir: str, plan: list[_Param], done: dict[tuple[str, int], str]
                    ) -> dict[tuple[str, int], str]:
    """The journaled chunks whose files are there with their full size (uncompressed zarr: every
    chunk file is the chunk's whole shape); the others are written again."""
    kept = {}
    for p in plan:
        want = math.prod(p.chunks) * p.dtype.itemsize
        for flat, g in p.iter_chunks():
            if (p.key, flat) in done:
                try:
                    ok = os.stat(os.path.join(out_dir, p.array, _chunk_key(g))).st_size == want
                except OSError:
                    ok = False
                if ok:
                    kept[(p.key, flat)] = done[(p.key, flat)]
    return kept


def _clean_partial(out_dir: str, plan: list[_Param], done: dict[tuple[str, int], str]) -> None:
    """Deletes every file in the array directories that is not a journaled chunk (or .zarray)."""
    for p in plan:
        d = os.path.join(out_dir, p.array)
        if not os.path.isdir(d):
            continue
        keep = {".zarray"} | {_chunk_key(g) for flat, g in p.iter_chunks() if (p.key, flat) in done}
        for name in os.listdir(d):
            if name not in keep:
                full = os.path.join(d, name)
                shutil.rmtree(full) if os.path.isdir(full) else os.remove(full)
    for name in (MANIFEST, MARKER, _ORBAX_METADATA, _ORBAX_CKPT_METADATA):
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))


def _write_arrays(src: _Source, plan: list[_Param], out_dir: str, *, progress: bool) -> dict[str, Any]:
    from tqdm.auto import tqdm

    journal_path = os.path.join(out_dir, JOURNAL_FILE)
    done = _trusted_chunks(out_dir, plan, _load_journal(journal_path))
    _clean_partial(out_dir, plan, done)
    if os.path.exists(journal_path):   # cut back to what is trusted: later lines must not be trusted
        _write_atomic(journal_path, "".join(f"{k}\t{flat}\t{d}\n" for (k, flat), d in done.items())
                      + (_SYNC_LINE if done else ""))
    ctx = _ts_context()
    stores = {}
    for p in plan:
        try:
            stores[p.key] = _open_array(out_dir, p, ctx, create=True)
        except Exception as e:  # tensorstore raises ValueError with a long message
            raise _err(f"{out_dir}: cannot create array {p.array} ({e})") from None

    die_after = int(os.environ.get(DIE_AFTER_ENV, "0") or 0)
    digests: dict[tuple[str, int], str] = dict(done)
    todo = []
    resumed_bytes = 0
    for p in plan:
        for flat, g in p.iter_chunks():
            region = p.region(g)
            nbytes = math.prod(r.stop - r.start for r in region) * p.dtype.itemsize
            if (p.key, flat) in done:
                resumed_bytes += nbytes
            else:
                todo.append((p, flat, g, region, nbytes))
    total = sum(p.nbytes for p in plan)
    bar = tqdm(total=total, initial=resumed_bytes, unit="B", unit_scale=True, unit_divisor=1024,
               desc="convert", disable=not progress, mininterval=0.5, smoothing=0.05)

    lock = threading.Condition()
    inflight = [0]
    completed = [0]
    written = [0]
    unsynced: list[str] = []     # chunk files written since the last sync point
    unsynced_bytes = [0]
    jfd = os.open(journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def sync_point() -> None:
        """Makes every journaled chunk durable, then records that in the journal (under ``lock``)."""
        dirs = set()
        for path in unsynced:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            dirs.add(os.path.dirname(path))
        for d in sorted(dirs):
            fd = os.open(d, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.fsync(jfd)
        os.write(jfd, _SYNC_LINE.encode())
        unsynced.clear()
        unsynced_bytes[0] = 0

    def work(p: _Param, flat: int, g: tuple[int, ...], region: tuple[slice, ...], cost: int) -> None:
        try:
            buf = _fill_chunk(src, p, region)
            nbytes = buf.nbytes
            digest = hashlib.sha256(memoryview(buf.reshape(-1).view(np.uint8))).hexdigest()
            try:
                stores[p.key][region].write(buf).result()
            except Exception as e:
                raise _err(f"{out_dir}: cannot write array {p.array} ({e})") from None
            del buf
            with lock:
                digests[(p.key, flat)] = digest
                os.write(jfd, f"{p.key}\t{flat}\t{digest}\n".encode())
                unsynced.append(os.path.join(out_dir, p.array, _chunk_key(g)))
                unsynced_bytes[0] += nbytes
                if unsynced_bytes[0] >= SYNC_EVERY_BYTES:
                    sync_point()
                completed[0] += 1
                written[0] += nbytes
                bar.update(nbytes)
                if die_after and completed[0] >= die_after:
                    os._exit(DIE_EXIT_CODE)
        finally:
            with lock:
                inflight[0] -= cost
                lock.notify_all()

    workers = WORKERS or max(4, min(16, 2 * (os.cpu_count() or 2)))
    futures: list[cf.Future] = []
    error: list[BaseException] = []
    try:
        with cf.ThreadPoolExecutor(workers, thread_name_prefix="convert") as pool:
            for p, flat, g, region, nbytes in todo:
                cost = min(INFLIGHT_BYTES, 2 * nbytes)
                with lock:
                    while inflight[0] and inflight[0] + cost > INFLIGHT_BYTES:
                        lock.wait()
                    inflight[0] += cost
                if error:
                    with lock:
                        inflight[0] -= cost
                    break
                fut = pool.submit(work, p, flat, g, region, cost)
                fut.add_done_callback(lambda f: f.exception() and error.append(f.exception()))
                futures.append(fut)
            for f in futures:
                try:
                    f.result()
                except BaseException as e:  # noqa: BLE001 - re-raised below
                    error.append(e)
        if not error:
            with lock:
                sync_point()  # everything durable before the files that make it look complete
    finally:
        os.close(jfd)
        bar.close()
    if error:
        e = error[0]
        if isinstance(e, DeepSeekError):
            raise e
        if isinstance(e, OSError):
            raise _err(f"{out_dir}: I/O error ({e})") from e
        raise e
    return {"digests": digests, "bytes_written": written[0], "resumed": len(done)}


def _finalize(out_dir: str, hf_dir: str, plan: list[_Param], out_cfg: DeepSeekConfig, src_cfg: DeepSeekConfig,
              dtype: str, with_mtp: bool, source_files: list[tuple[str, int]], n_tensors: int,
              digests: dict[tuple[str, int], str], sample_sha256: str) -> None:
    params = {}
    for p in plan:
        chunk_digests = [digests[(p.key, flat)] for flat, _ in p.iter_chunks()]
        params[p.key] = {"array": p.array, "shape": list(p.shape), "dtype": p.dtype.name,
                         "chunks": list(p.chunks), "sha256": _combine(chunk_digests)}
    _write_orbax_metadata(out_dir, plan)
    write_config(out_dir, out_cfg.to_hub_dict())
    extra = _extra_files(hf_dir, _reserved(plan))
    for name in extra:
        shutil.copyfile(os.path.join(hf_dir, name), os.path.join(out_dir, name + ".tmp"))
        os.replace(os.path.join(out_dir, name + ".tmp"), os.path.join(out_dir, name))
    manifest = {
        "format": FORMAT,
        "deepseek_jax_version": _version(),
        "orbax_checkpoint_version": _pkg_version("orbax-checkpoint"),
        "tensorstore_version": _pkg_version("tensorstore"),
        "dtype": dtype,
        "mtp": with_mtp,
        "source": {"path": os.path.abspath(hf_dir), "files": [[f, s] for f, s in source_files],
                   "tensor_count": n_tensors, "dtype": "fp8" if src_cfg.fp8 else "bf16",
                   "config_sha256": _sha256_file(os.path.join(hf_dir, CONFIG_FILE)),
                   "sample_sha256": sample_sha256},
        "extra_files": extra,
        # the files beside the arrays, as written here: verify finds an edited config.json
        "files_sha256": {name: _sha256_file(os.path.join(out_dir, name)) for name in [CONFIG_FILE, *extra]},
        "checksum": "sha256 over the sha256 digests of the parameter's zarr chunks, in C order of the chunk grid",
        "total_bytes": sum(p.nbytes for p in plan),
        "params": params,
    }
    _write_json(os.path.join(out_dir, MANIFEST), manifest, indent=1)
    _write_atomic(os.path.join(out_dir, MARKER), _sha256_file(os.path.join(out_dir, MANIFEST)) + "\n")
    for name in (JOURNAL_FILE, STATE_FILE):
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))


# --------------------------------------------------------------------------------------------
# Opening a checkpoint (ours, or any non-sharded Orbax PyTree checkpoint of the model + config.json)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Ckpt:
    path: str
    cfg: DeepSeekConfig
    manifest: dict[str, Any] | None
    keys: set[str]             # dotted model paths stored (without '.value')
    use_ocdbt: bool
    use_zarr3: bool

    @property
    def has_mtp(self) -> bool:
        return any(k.startswith("mtp.") for k in self.keys)

    def open(self, array: str, ctx=None):
        import tensorstore as ts
        if self.use_ocdbt:
            kv: Any = {"driver": "ocdbt", "base": "file://" + os.path.abspath(self.path), "path": array}
        else:
            kv = {"driver": "file", "path": os.path.join(self.path, array)}
        spec = {"driver": "zarr3" if self.use_zarr3 else "zarr", "kvstore": kv}
        try:
            return ts.open(spec, open=True, read=True, context=ctx).result()
        except Exception as e:
            # tensorstore appends its whole JSON spec to the message: keep the reason only
            reason = str(e).split(" [tensorstore_spec=")[0].splitlines()[0] if str(e) else type(e).__name__
            raise _err(f"{self.path}: cannot open array {array} ({reason})") from None


def _open_ckpt(path: str | os.PathLike[str]) -> _Ckpt:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise _err(f"{path}: checkpoint directory not found")
    if os.path.exists(os.path.join(path, STATE_FILE)) or (
            os.path.exists(os.path.join(path, MANIFEST)) and not is_complete(path)):
        raise _err(f"{path}: incomplete conversion (rerun deepseek-jax convert with --resume)")
    manifest = None
    if is_complete(path):
        mpath = os.path.join(path, MANIFEST)
        manifest = _read_json(mpath, "manifest")
        with open(os.path.join(path, MARKER), encoding="utf-8") as f:
            if f.read().strip() != _sha256_file(mpath):
                raise _err(f"{mpath}: manifest does not match the {MARKER} marker (modified after conversion?)")
    meta_path = os.path.join(path, _ORBAX_METADATA)
    if not os.path.exists(meta_path):
        raise _err(f"{path}: not an Orbax checkpoint (no {_ORBAX_METADATA})")
    meta = _read_json(meta_path, "Orbax metadata")
    keys = set()
    try:
        for entry in meta["tree_metadata"].values():
            kp = [k["key"] for k in entry["key_metadata"]]
            if kp and kp[-1] == "value":
                kp = kp[:-1]
            keys.add(".".join(kp))
    except (KeyError, TypeError, AttributeError):
        raise _err(f"{meta_path}: unexpected Orbax metadata format") from None
    cfg_path = os.path.join(path, CONFIG_FILE)
    if not os.path.exists(cfg_path):
        raise _err(f"{cfg_path}: config file not found (an Orbax checkpoint of this model needs its config.json)")
    cfg = DeepSeekConfig.from_json_file(cfg_path)
    return _Ckpt(path, cfg, manifest, keys, bool(meta.get("use_ocdbt")), bool(meta.get("use_zarr3")))


def _ckpt_plan(ck: _Ckpt, with_mtp: bool) -> list[_Param]:
    plan = _plan(ck.cfg, with_mtp)
    missing = [p.key for p in plan if p.key not in ck.keys]
    if missing:
        raise _err(f"{ck.path}: checkpoint lacks parameter {missing[0]} (made for another config?)")
    if ck.manifest is not None:
        for p in plan:
            m = ck.manifest["params"].get(p.key)
            if m is None or tuple(m["shape"]) != p.shape or m["dtype"] != p.dtype.name:
                raise _err(f"{ck.path}: parameter {p.key} is {m and m['dtype']} {m and m['shape']}, "
                           f"config.json implies {p.dtype.name} {list(p.shape)}")
    return plan


# --------------------------------------------------------------------------------------------
# restore
# --------------------------------------------------------------------------------------------


def _check_array_files(ck: _Ckpt, plan: list[_Param]) -> None:
    """Each array's zarr metadata and chunk files, from the file system alone (no data read), so
    that a damaged checkpoint fails with a line naming the file, before Orbax's reads (whose
    errors are TensorStore specs, and whose cancelled siblings log a traceback each). A full
    check of the contents is ``verify``'s checksums. Orbax layouts other than zarr v2 files
    (OCDBT, zarr3) are left to Orbax."""
    if ck.use_ocdbt or ck.use_zarr3:
        return
    for p in plan:
        folder = os.path.join(ck.path, p.array)
        meta = _read_json(os.path.join(folder, ".zarray"), f"the zarr metadata of {p.array}")
        try:
            shape, chunks, dtype = tuple(meta["shape"]), tuple(meta["chunks"]), meta["dtype"]
            sep, compressed = meta.get("dimension_separator", "."), meta.get("compressor") is not None
            want = math.prod(chunks) * p.dtype.itemsize
            grid = [-(-n // c) for n, c in zip(shape, chunks, strict=True)]
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            raise _err(f"{folder}/.zarray: not zarr array metadata") from None
        if shape != p.shape or dtype != _zarr_dtype(p.dtype):
            raise _err(f"{ck.path}: array {p.array} is {dtype} {list(shape)}, config.json implies "
                       f"{_zarr_dtype(p.dtype)} {list(p.shape)}")
        for g in np.ndindex(*grid):
            chunk = os.path.join(folder, sep.join(map(str, g)) or "0")
            try:
                size = os.stat(chunk).st_size
            except OSError:
                raise _err(f"{ck.path}: chunk file {os.path.relpath(chunk, ck.path)} is missing "
                           "(deepseek-jax verify checks the whole checkpoint)") from None
            if not compressed and size != want:
                raise _err(f"{ck.path}: chunk file {os.path.relpath(chunk, ck.path)} is {size} bytes, expected "
                           f"{want} (truncated? deepseek-jax verify checks the whole checkpoint)")


def _orbax_message(e: Exception) -> str:
    """The first line of an Orbax / TensorStore error, without the TensorStore spec dumps."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    for cut in (" See full TensorStore details", " [tensorstore_spec"):
        text = text.split(cut)[0]
    return text.strip()


def _sharding_for(shardings: Any, path: tuple[str, ...], default):
    import jax
    from flax import nnx

    if shardings is None:
        return default
    if isinstance(shardings, jax.sharding.Sharding):
        return shardings
    if callable(shardings) and not isinstance(shardings, Mapping):
        s = shardings(path)
        return default if s is None else s
    if isinstance(shardings, nnx.State):
        shardings = shardings.to_pure_dict()
    if isinstance(shardings, Mapping):
        for key in (path, ".".join(path)):
            if key in shardings:
                return shardings[key]
        node: Any = shardings
        for k in path:
            if not isinstance(node, Mapping) or k not in node:
                raise _err(f"shardings: no sharding for parameter {'.'.join(path)}")
            node = node[k]
        if isinstance(node, Mapping) and "value" in node:
            node = node["value"]
        if isinstance(node, nnx.Variable):
            node = node.get_value() if hasattr(node, "get_value") else node.value
        return node
    raise _err(f"shardings: expected a Sharding, a mapping/tree of them or a callable, got {type(shardings).__name__}")


def restore(ckpt_dir: str | os.PathLike[str], *, prec: Precision = Precision(), shardings: Any = None,
            with_mtp: bool | None = None):
    """Restores a converted checkpoint into a :class:`~deepseek_jax.model.DeepSeekV3` in one Orbax call.

    ``shardings``: ``None`` (first device), one ``jax.sharding.Sharding`` for every array, a
    tree/dict of them matching the state (an ``nnx.State``, a nested dict by parameter path, or a
    flat dict keyed by dotted path or path tuple), or a callable ``path tuple -> Sharding``
    (``None`` for the default). Each process reads only the chunks its shards overlap.
    ``with_mtp``: ``None`` restores the MTP module when stored; ``False`` skips it (partial restore).
    """
    import jax
    import orbax.checkpoint as ocp
    from flax import nnx

    from deepseek_jax.checkpoint import abstract_model

    ck = _open_ckpt(ckpt_dir)
    stored_mtp = ck.has_mtp
    if with_mtp is None:
        with_mtp = stored_mtp
    if with_mtp and not stored_mtp:
        raise _err(f"{ck.path}: checkpoint has no MTP layer")
    with_mtp = bool(with_mtp and ck.cfg.num_nextn_predict_layers)
    _check_array_files(ck, _ckpt_plan(ck, with_mtp))
    graphdef, state = nnx.split(abstract_model(ck.cfg, prec, with_mtp))
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    flat = []
    for path, var in nnx.to_flat_state(state):
        p = tuple(str(x) for x in path)
        sh = _sharding_for(shardings, p, default)
        flat.append((path, var.replace(jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=sh))))
    targets = nnx.from_flat_state(flat)
    restore_args = ocp.checkpoint_utils.construct_restore_args(targets)
    partial = len(flat) < len(ck.keys)
    asyncio_log = logging.getLogger("asyncio")   # (a failed read logs every cancelled sibling's traceback)
    level = asyncio_log.level
    try:
        asyncio_log.setLevel(logging.CRITICAL)
        with ocp.PyTreeCheckpointer() as ckptr:
            restored = ckptr.restore(os.path.abspath(ck.path), args=ocp.args.PyTreeRestore(
                item=targets, restore_args=restore_args, partial_restore=partial))
    except DeepSeekError:
        raise
    except Exception as e:  # Orbax/tensorstore errors: unreadable chunks, shape mismatch, ...
        raise _err(f"{ck.path}: Orbax restore failed ({_orbax_message(e)})") from e
    finally:
        asyncio_log.setLevel(level)
    return nnx.merge(graphdef, restored)


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------


def _hub_index(plan: list[_Param]) -> dict[str, tuple[_Param, tuple[int, ...]]]:
    """Hub name -> (parameter, stack index) for every tensor of the plan (scales included)."""
    out = {}
    for p in plan:
        for idx in np.ndindex(*p.stack):
            out[p.names[idx]] = (p, idx)
    return out


class HubView:
    """A converted checkpoint read tensor by tensor under its Hub names: the reading side of
    :class:`~deepseek_jax.hub.HubReader` (``path``, ``config``, ``names``, ``in``, ``info``,
    ``get``, ``close``), so that what reads a Hub directory reads a converted one too, one
    layer's (one expert's) matrix at a time: ``get`` reads just that matrix's chunks. FP8 weights
    come as ``float8_e4m3fn`` beside their ``weight_scale_inv``, as in the Hub files."""

    def __init__(self, ckpt_dir: str | os.PathLike[str], *, _opened: tuple[_Ckpt, list[_Param]] | None = None):
        if _opened is None:
            ck = _open_ckpt(ckpt_dir)
            plan = _ckpt_plan(ck, ck.has_mtp and bool(ck.cfg.num_nextn_predict_layers))
            _check_array_files(ck, plan)
        else:
            ck, plan = _opened
        self.path = ck.path
        self.config: dict[str, Any] = _read_json(os.path.join(ck.path, CONFIG_FILE), "config")
        self._index = _hub_index(plan)
        ctx = _ts_context()
        self._stores = {p.key: ck.open(p.array, ctx) for p in plan}

    def names(self) -> list[str]:
        return list(self._index)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def info(self, name: str) -> TensorInfo:
        p, _ = self._index[name]
        per = p.shape[len(p.stack):]
        return TensorInfo(name, per, p.dtype, p.array, math.prod(per) * p.dtype.itemsize)

    def get(self, name: str) -> np.ndarray:
        if name not in self._index:
            raise _err(f"{self.path}: no tensor {name}")
        p, idx = self._index[name]
        try:
            return np.asarray(self._stores[p.key][idx].read().result())
        except Exception as e:   # TensorStore: a chunk that cannot be read
            raise _err(f"{self.path}: cannot read {name} from {p.array} ({_orbax_message(e)}; "
                       "deepseek-jax verify checks the whole checkpoint)") from None

    def close(self) -> None:
        self._stores = {}

    def __enter__(self) -> HubView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def export(ckpt_dir: str | os.PathLike[str], hf_dir: str | os.PathLike[str], *, dtype: str | None = None,
           force: bool = False, progress: bool = True, max_shard_bytes: int = 5 * 2**30) -> dict[str, Any]:
    """Writes the checkpoint back in the Hub layout (config.json, safetensors shards, index).

    ``dtype=None`` keeps the stored dtype; ``"bf16"`` from an FP8 checkpoint dequantizes
    (``fp8_cast_bf16.py`` semantics); ``"fp8"`` from a bf16 checkpoint block-quantizes (amax/448
    per 128x128 block). Tensors are unstacked with the inverse of ``checkpoint.hub_slot``.
    """
    from tqdm.auto import tqdm

    t0 = time.time()
    _check_dtype_arg(dtype)
    hf_dir = os.fspath(hf_dir)
    ck = _open_ckpt(ckpt_dir)
    stored = "fp8" if ck.cfg.fp8 else "bf16"
    dtype = dtype or stored
    with_mtp = ck.has_mtp and bool(ck.cfg.num_nextn_predict_layers)
    plan = _ckpt_plan(ck, with_mtp)
    _check_array_files(ck, plan)
    if os.path.exists(hf_dir) and not os.path.isdir(hf_dir):
        raise _err(f"{hf_dir}: exists and is not a directory")
    made_dir = not os.path.lexists(hf_dir)   # a directory the user made is emptied on failure, not removed
    os.makedirs(hf_dir, exist_ok=True)
    lock = _lock_dir(hf_dir, "export")   # before anything in it is looked at or emptied (--force)
    try:   # (the lock is let go on every way out)
        if os.path.isdir(hf_dir) and os.listdir(hf_dir):
            if not force:
                raise _err(f"{hf_dir}: output directory is not empty (pass --force to overwrite)")
            real_out, real_ck = os.path.realpath(hf_dir), os.path.realpath(ck.path)
            if real_out == real_ck or real_ck.startswith(real_out + os.sep):
                raise _err(f"{hf_dir}: the output directory must not be (or contain) the checkpoint")
            _empty_dir(hf_dir)
        out_cfg = ck.cfg.replace(fp8=(dtype == "fp8"))
        if not with_mtp:
            out_cfg = out_cfg.replace(num_nextn_predict_layers=0)
        out_cfg_dict = out_cfg.to_hub_dict()
        specs = hub_tensor_specs(out_cfg_dict, include_mtp=with_mtp)
        read = HubView(ck.path, _opened=(ck, plan)).get

        def produce(name: str) -> list[tuple[str, np.ndarray]]:
            spec = specs[name]
            if name.endswith("_scale_inv"):
                return [(name, read(name))] if stored == "fp8" else []
            if spec.dtype_name == "F8_E4M3" and stored == "bf16":
                try:
                    wq, sc = quantize_block_fp8_np(read(name).astype(np.float32))
                except DeepSeekError as e:
                    raise _err(f"{ck.path}: {name}: {e} (--dtype bf16 writes it as it is)") from None
                return [(name, wq), (_scale_name(name), sc)]
            arr = read(name)
            if arr.dtype == _FP8 and spec.dtype_name == "BF16":
                w = np.empty(arr.shape, _BF16)
                sc = read(_scale_name(name))
                for a in range(0, arr.shape[0], _DEQUANT_ROWS):
                    b = min(a + _DEQUANT_ROWS, arr.shape[0])
                    w[a:b] = dequantize_block_fp8_np(arr[a:b], sc[a // 128: -(-b // 128)]).astype(_BF16)
                return [(name, w)]
            return [(name, arr)]

        names = [n for n in specs if not (n.endswith("_scale_inv") and stored == "bf16")]
    except BaseException:
        if made_dir:
            with contextlib.suppress(OSError):
                os.rmdir(hf_dir)
        if lock is not None:
            os.close(lock)
        raise
    total = sum(specs[n].nbytes for n in specs)
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="export",
               disable=not progress, mininterval=0.5)
    written = 0
    done = False
    try:
        with HubWriter(hf_dir, max_shard_bytes=max_shard_bytes, metadata={"format": "pt"}) as writer, \
                cf.ThreadPoolExecutor(4) as pool:
            window: list[cf.Future] = []
            it = iter(names)
            for name in it:
                window.append(pool.submit(produce, name))
                if len(window) < 8:
                    continue
                for n, a in window.pop(0).result():
                    writer.add(n, a)
                    written += a.nbytes
                    bar.update(a.nbytes)
            for f in window:
                for n, a in f.result():
                    writer.add(n, a)
                    written += a.nbytes
                    bar.update(a.nbytes)
        # config.json (and the tokenizer) last: a directory a failed or killed export left is no
        # loadable checkpoint, and one that failed here is removed
        manifest = ck.manifest or {}   # (the files the conversion copied; a checkpoint without a
        extra = (manifest["extra_files"] if "extra_files" in manifest   # manifest: what lies beside it)
                 else _extra_files(ck.path, _reserved(plan)))
        for name in extra:
            if os.path.isfile(os.path.join(ck.path, name)):
                shutil.copyfile(os.path.join(ck.path, name), os.path.join(hf_dir, name))
        write_config(hf_dir, out_cfg_dict)
        done = True
    except OSError as e:   # a full disk, a file size limit: the path, not only the errno
        raise _err(f"{hf_dir}: cannot write the Hub checkpoint ({e.strerror or e}); nothing was kept") from None
    finally:
        bar.close()
        if not done:
            with contextlib.suppress(OSError):
                _empty_dir(hf_dir)
                if made_dir and not os.path.islink(hf_dir):
                    os.rmdir(hf_dir)
        if lock is not None:
            os.close(lock)
    seconds = time.time() - t0
    return {"hf_dir": hf_dir, "dtype": dtype, "tensors": len(specs), "bytes": written, "seconds": seconds,
            "gb_per_s": written / max(seconds, 1e-9) / 1e9}


# --------------------------------------------------------------------------------------------
# verify
# --------------------------------------------------------------------------------------------


def verify(ckpt_dir: str | os.PathLike[str], against: str | os.PathLike[str] | None = None, *,
           progress: bool = True) -> dict[str, Any]:
    """Checks a converted checkpoint: manifest, every parameter present with its shape, dtype and
    checksum; with ``against=HF_DIR`` also that every Hub tensor equals the checkpoint's (bit-exact
    for FP8; for a bf16 conversion the stored weight equals the dequantized FP8 one). Raises
    :class:`DeepSeekError` naming the first problem; returns a summary."""
    from tqdm.auto import tqdm

    t0 = time.time()
    path = os.fspath(ckpt_dir)
    if not os.path.isdir(path):
        raise _err(f"{path}: checkpoint directory not found")
    if not is_complete(path):
        if is_orbax_checkpoint(path):
            raise _err(f"{path}: incomplete conversion (no {MARKER}; rerun deepseek-jax convert with --resume)")
        raise _err(f"{path}: not a converted checkpoint (no {MANIFEST} / {MARKER})")
    ck = _open_ckpt(path)
    manifest = ck.manifest
    assert manifest is not None
    if manifest.get("format") != FORMAT:
        raise _err(f"{path}: manifest format {manifest.get('format')!r} unknown (want {FORMAT!r})")
    with_mtp = bool(manifest.get("mtp"))
    plan = _ckpt_plan(ck, with_mtp)
    _check_array_files(ck, plan)   # a missing chunk file by name (TensorStore would read it as fill)
    names = {p.key for p in plan}
    extra = set(manifest["params"]) - names
    if extra or set(ck.keys) != names:
        odd = sorted(extra | (set(ck.keys) ^ names))[0]
        raise _err(f"{path}: parameter {odd} does not belong to the model of config.json")
    for name, digest in manifest.get("files_sha256", {}).items():   # (older manifests: none)
        if not os.path.isfile(os.path.join(path, name)):
            raise _err(f"{path}: {name} is missing (the conversion wrote it)")
        if _sha256_file(os.path.join(path, name)) != digest:
            raise _err(f"{path}: {name} was changed after the conversion (its sha256 is not the manifest's)")
    want_meta = _orbax_tree_metadata(plan)
    if _read_json(os.path.join(path, _ORBAX_METADATA), "Orbax metadata") != want_meta:
        raise _err(f"{path}: {_ORBAX_METADATA} does not describe the model's parameter tree")
    ctx = _ts_context()
    total = sum(p.nbytes for p in plan)
    bar = tqdm(total=total * (2 if against else 1), unit="B", unit_scale=True, unit_divisor=1024,
               desc="verify", disable=not progress, mininterval=0.5)
    try:
        stores = {}
        for p in plan:
            m = manifest["params"][p.key]
            t = ck.open(p.array, ctx)
            if tuple(t.shape) != p.shape or np.dtype(t.dtype.numpy_dtype) != p.dtype:
                raise _err(f"{path}: array {p.array} is {t.dtype} {list(t.shape)}, expected {p.dtype} {list(p.shape)}")
            stores[p.key] = t
            p.chunks = tuple(m["chunks"])
            digests = []
            for _, g in p.iter_chunks():
                try:
                    a = np.ascontiguousarray(t[p.region(g)].read().result())
                except Exception as e:
                    raise _err(f"{path}: cannot read parameter {p.key} chunk {_chunk_key(g)} ({e})") from None
                digests.append(hashlib.sha256(memoryview(a.reshape(-1).view(np.uint8))).hexdigest())
                bar.update(a.nbytes)
            if _combine(digests) != m["sha256"]:
                raise _err(f"{path}: checksum mismatch in parameter {p.key} (the checkpoint was modified or corrupted)")
        compared = 0
        if against is not None:
            compared = _compare_against(ck, plan, stores, os.fspath(against), manifest, bar)
    finally:
        bar.close()
    return {"ckpt_dir": path, "params": len(plan), "bytes": total, "compared_tensors": compared,
            "seconds": time.time() - t0}


def _compare_against(ck: _Ckpt, plan: list[_Param], stores, hf_dir: str, manifest: dict[str, Any], bar) -> int:
    src = _Source(hf_dir)
    try:
        # (a copy sharded differently is compared all the same: the tensors are what must be equal)
        src_cfg = DeepSeekConfig.from_hub_dict(src.reader.config)
        # the same model: every field but the storage dtype and a left-out MTP layer
        want_cfg = src_cfg.replace(fp8=ck.cfg.fp8, num_nextn_predict_layers=(
            src_cfg.num_nextn_predict_layers if manifest.get("mtp") else ck.cfg.num_nextn_predict_layers))
        for f in dataclasses.fields(DeepSeekConfig):
            if f.compare and getattr(ck.cfg, f.name) != getattr(want_cfg, f.name):
                raise _err(f"{ck.path}: config.json has {f.name} = {getattr(ck.cfg, f.name)!r}, "
                           f"{hf_dir}'s has {getattr(want_cfg, f.name)!r}")
        specs = hub_tensor_specs(src.reader.config, include_mtp=bool(manifest.get("mtp")), fp8=src_cfg.fp8)
        n_mtp = 0 if manifest.get("mtp") else _left_out_mtp_layers(src.reader, src_cfg)   # left out on purpose
        odd = [x for x in src.reader.names() if x not in specs and not _mtp_layer(x, src_cfg.num_hidden_layers, n_mtp)]
        if odd:   # (convert refuses such a source: it is not the one this checkpoint came from)
            raise _err(f"{hf_dir}: holds tensor {odd[0]}, which the checkpoint has no counterpart for")
        index = _hub_index(plan)
        n = 0
        for name in specs:
            if name not in src.reader:
                raise _err(f"{hf_dir}: missing tensor {name}")
            if name not in index:  # the scales of a bf16 conversion: checked through their weights
                if not (name.endswith("_scale_inv") and not ck.cfg.fp8):
                    raise _err(f"{hf_dir}: tensor {name} has no counterpart in the checkpoint")
                continue
            p, idx = index[name]
            got = np.asarray(stores[p.key][idx].read().result())
            want = src.read(name)
            if want.dtype == _FP8 and got.dtype == _BF16:
                sc = src.read(_scale_name(name))
                deq = np.empty(want.shape, _BF16)
                for a in range(0, want.shape[0], _DEQUANT_ROWS):
                    b = min(a + _DEQUANT_ROWS, want.shape[0])
                    deq[a:b] = dequantize_block_fp8_np(want[a:b], sc[a // 128: -(-b // 128)]).astype(_BF16)
                want = deq
            elif want.dtype != got.dtype and want.dtype in _FLOATS and got.dtype in _FLOATS:
                want = want.astype(got.dtype)   # an F32 / F16 source: what convert stored
            if got.shape != want.shape:
                raise _err(f"{hf_dir}: tensor {name} is {list(want.shape)}, the checkpoint's {list(got.shape)} "
                           "(another model?)")
            if got.dtype != want.dtype or \
                    not np.array_equal(got.view(np.uint8), want.view(np.uint8)):
                where = f"{p.key}{list(idx)}" if idx else p.key   # a layer of a stack, or the whole array
                raise _err(f"{ck.path}: parameter {where} differs from {hf_dir} tensor {name}")
            n += 1
            bar.update(got.nbytes)
        return n
    finally:
        src.close()
