"""Reading and writing the Hugging Face Hub checkpoint layout of DeepSeek-V3 (numpy only).

A Hub checkpoint is a directory with ``config.json`` and either one ``model.safetensors`` or
several shards listed by ``model.safetensors.index.json``
(``{"metadata": {...}, "weight_map": {tensor name: shard file}}``).

The safetensors format is parsed here directly: an 8-byte little-endian header length ``N``, ``N``
bytes of JSON (``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``,
offsets relative to the end of the header), then the raw little-endian tensor bytes.  Parsing it
ourselves lets us read ``F8_E4M3`` and ``BF16`` tensors (through ``ml_dtypes``) as zero-copy views
of a memory map, which the ``safetensors`` numpy backend cannot do.

Contents:

* :class:`HubReader` -- lazy, memory-mapped reader of a checkpoint directory.
* :func:`write_safetensors`, :class:`HubWriter`, :func:`write_config` -- writers (atomic renames).
* :func:`hub_tensor_specs` -- every tensor name, shape and dtype a checkpoint of a config must hold
  (the project specification's sections 2, 3, 5, 6, 7; ``docs/architecture.md``), and :func:`spec_mismatches` to compare a checkpoint to it.
* :func:`quantize_block_fp8_np`, :func:`dequantize_block_fp8_np` -- the 128x128 block FP8 scheme.

Every problem a user can cause (a missing or corrupt file, a bad config) raises
:class:`~deepseek_jax.errors.DeepSeekError` with a one-line message naming the file and/or tensor.
This module must not import jax (nor torch): tools use it on machines without either.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, NamedTuple

import ml_dtypes
import numpy as np

from deepseek_jax.errors import DeepSeekError

__all__ = [
    "DTYPES",
    "FP8_MAX",
    "HubReader",
    "HubWriter",
    "INDEX_FILE",
    "SINGLE_FILE",
    "TensorInfo",
    "TensorSpec",
    "dequantize_block_fp8_np",
    "dtype_name_of",
    "hub_tensor_specs",
    "quantize_block_fp8_np",
    "read_safetensors_header",
    "spec_mismatches",
    "write_config",
    "write_safetensors",
]

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

#: Largest finite ``float8_e4m3fn`` value.
FP8_MAX = 448.0

#: Default FP8 block (rows of the output dim, columns of the input dim), as in DeepSeek-V3.
DEFAULT_BLOCK = (128, 128)

#: safetensors dtype name -> numpy dtype (always little-endian, as the format requires).
DTYPES: dict[str, np.dtype] = {
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "I8": np.dtype("i1"),
    "I16": np.dtype("<i2"),
    "I32": np.dtype("<i4"),
    "I64": np.dtype("<i8"),
    "U8": np.dtype("u1"),
    "U16": np.dtype("<u2"),
    "U32": np.dtype("<u4"),
    "U64": np.dtype("<u8"),
    "BOOL": np.dtype("bool"),
}

# The safetensors library refuses headers above 100 MB; the 671B index has ~92k entries in
# ~160 shards, so a real shard header is far below that.
_MAX_HEADER_BYTES = 100_000_000


def _one_line(message: str) -> str:
    """Collapse a message to one line (the CLI prints errors on one line)."""
    return " ".join(str(message).split())


def _error(message: str) -> DeepSeekError:
    return DeepSeekError(_one_line(message))


def dtype_name_of(dtype: Any) -> str:
    """The safetensors dtype name of a numpy dtype (byte order ignored); DeepSeekError if none."""
    dt = np.dtype(dtype)
    if dt.byteorder not in ("=", "|"):
        dt = dt.newbyteorder("=")
    for name, candidate in DTYPES.items():
        if candidate == dt:
            return name
    raise _error(f"dtype {dt} has no safetensors equivalent")


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


class TensorInfo(NamedTuple):
    """Where a tensor lives and what it is, from the safetensors header (no data read)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    file: str  # file name relative to the checkpoint directory
    nbytes: int


@dataclass
class _Entry:
    """One raw, structurally checked header entry (dtype/size validated lazily per tensor)."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass
class _Header:
    """A parsed safetensors header."""

    entries: dict[str, _Entry]
    metadata: dict[str, str]
    data_start: int  # absolute file offset of the data section
    file_size: int


def read_safetensors_header(path: str) -> _Header:
    """Parse and structurally check the header of the safetensors file at ``path``.

    Checks the length prefix, that the header is a JSON object of well-formed entries, and that
    no tensor's byte range lies beyond the end of the file (a truncated file).  Per-tensor
    dtype/shape consistency is checked by :meth:`HubReader.info`, so one odd tensor does not make
    the rest of a shard unreadable.
    """
    try:
        file_size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _error(f"{path}: truncated safetensors file ({file_size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > _MAX_HEADER_BYTES or header_len > file_size - 8:
                raise _error(
                    f"{path}: corrupt or truncated safetensors header (header length {header_len}, "
                    f"file size {file_size})"
                )
            raw = f.read(header_len)
    except FileNotFoundError:
        raise _error(f"{path}: file not found") from None
    except OSError as e:
        raise _error(f"{path}: cannot read safetensors file ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _error(f"{path}: corrupt safetensors header, not JSON ({e})") from None
    if not isinstance(header, dict):
        raise _error(f"{path}: corrupt safetensors header, not a JSON object")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _error(f"{path}: corrupt safetensors header, __metadata__ is not an object")
    data_start = 8 + header_len
    data_size = file_size - data_start
    entries: dict[str, _Entry] = {}
    for name, entry in header.items():
        where = f"{path}: tensor {name!r}"
        try:
            dtype = entry["dtype"]
            shape = tuple(entry["shape"])
            begin, end = entry["data_offsets"]
            ok = (
                isinstance(dtype, str)
                and all(type(d) is int and d >= 0 for d in shape)
                and type(begin) is int
                and type(end) is int
                and 0 <= begin <= end
            )
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise _error(f"{where}: corrupt safetensors header entry {json.dumps(entry)[:200]}")
        if end > data_size:
            raise _error(
                f"{where}: truncated safetensors file, data ends at byte {data_start + end} "
                f"but the file has {file_size} bytes"
            )
        entries[name] = _Entry(dtype, shape, begin, end)
    return _Header(entries, {str(k): str(v) for k, v in metadata.items()}, data_start, file_size)


class HubReader:
    """Lazy, memory-mapped reader of a Hub checkpoint directory.

    ``get`` returns read-only numpy views of memory-mapped shards, so a tensor costs no memory
    until its pages are touched.  Shards are opened on first use and their headers cached.
    Use as a context manager or call :meth:`close` (arrays already returned stay valid).
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise _error(f"{self.path}: checkpoint directory not found")
        self._config = self._read_config()
        self._headers: dict[str, _Header] = {}
        self._maps: dict[str, mmap.mmap] = {}
        self._infos: dict[str, TensorInfo] = {}
        index_path = os.path.join(self.path, INDEX_FILE)
        single_path = os.path.join(self.path, SINGLE_FILE)
        if os.path.exists(index_path):
            self.metadata, self._weight_map = self._read_index(index_path)
        elif os.path.exists(single_path):
            header = self._header(SINGLE_FILE)
            self.metadata = dict(header.metadata)
            self._weight_map = {name: SINGLE_FILE for name in header.entries}
        else:
            raise _error(f"{self.path}: neither {INDEX_FILE} nor {SINGLE_FILE} found")

    # -- construction helpers -------------------------------------------------------------

    def _read_config(self) -> dict[str, Any]:
        path = os.path.join(self.path, CONFIG_FILE)
        try:
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
        except FileNotFoundError:
            run = os.path.dirname(os.path.dirname(os.path.abspath(self.path)))
            hint = ""
            if os.path.isfile(os.path.join(run, "run.json")):   # OUT/ckpt/STEP of `deepseek-jax train`
                hint = f" (a training state; the trained model to load is {os.path.join(run, 'hub')})"
            elif os.path.isfile(os.path.join(self.path, "run.json")):   # OUT itself
                hint = f" (a training run's output; the trained model to load is {os.path.join(self.path, 'hub')})"
            raise _error(f"{path}: config file not found{hint}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _error(f"{path}: cannot read config, not valid JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise _error(f"{path}: config is not a JSON object")
        return cfg

    def _read_index(self, path: str) -> tuple[dict[str, Any], dict[str, str]]:
        try:
            with open(path, encoding="utf-8") as f:
                index = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _error(f"{path}: cannot read index, not valid JSON ({e})") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise _error(f"{path}: invalid index, no 'weight_map' object")
        for name, file in weight_map.items():
            if not isinstance(file, str) or not file or os.path.isabs(file) or ".." in file.split("/"):
                raise _error(f"{path}: invalid index, tensor {name!r} maps to {file!r}")
        metadata = index.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise _error(f"{path}: invalid index, 'metadata' is not an object")
        return metadata, dict(weight_map)

    def _header(self, file: str) -> _Header:
        header = self._headers.get(file)
        if header is None:
            header = read_safetensors_header(os.path.join(self.path, file))
            self._headers[file] = header
        return header

    def _map(self, file: str) -> mmap.mmap:
        mm = self._maps.get(file)
        if mm is None:
            path = os.path.join(self.path, file)
            try:
                with open(path, "rb") as f:
                    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except OSError as e:
                raise _error(f"{path}: cannot memory-map ({e.strerror or e})") from None
            self._maps[file] = mm
        return mm

    # -- public API -------------------------------------------------------------------------

    @property
    def config(self) -> dict[str, Any]:
        """The parsed ``config.json``."""
        return self._config

    def names(self) -> list[str]:
        """All tensor names of the checkpoint, sorted."""
        return sorted(self._weight_map)

    def __contains__(self, name: object) -> bool:
        return name in self._weight_map

    def __len__(self) -> int:
        return len(self._weight_map)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def file_of(self, name: str) -> str:
        """The shard file (relative name) that holds ``name``."""
        try:
            return self._weight_map[name]
        except KeyError:
            raise _error(f"{self.path}: no tensor {name!r} in the checkpoint") from None

    def info(self, name: str) -> TensorInfo:
        """Name, shape, dtype, shard file and byte size of a tensor (reads only the header)."""
        cached = self._infos.get(name)
        if cached is not None:
            return cached
        file = self.file_of(name)
        path = os.path.join(self.path, file)
        header = self._header(file)
        entry = header.entries.get(name)
        if entry is None:
            raise _error(f"{path}: tensor {name!r} is listed in the index but absent from this shard")
        dtype = DTYPES.get(entry.dtype)
        if dtype is None:
            raise _error(f"{path}: tensor {name!r} has unknown dtype {entry.dtype!r}")
        nbytes = math.prod(entry.shape) * dtype.itemsize
        if entry.end - entry.begin != nbytes:
            raise _error(
                f"{path}: tensor {name!r} is corrupt, data_offsets span {entry.end - entry.begin} "
                f"bytes but shape {list(entry.shape)} of {entry.dtype} needs {nbytes}"
            )
        info = TensorInfo(name, entry.shape, dtype, file, nbytes)
        self._infos[name] = info
        return info

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only, zero-copy numpy view of the memory-mapped shard."""
        info = self.info(name)
        entry = self._headers[info.file].entries[name]
        if info.nbytes == 0:
            out = np.empty(info.shape, info.dtype)
        else:
            mm = self._map(info.file)
            offset = self._headers[info.file].data_start + entry.begin
            count = info.nbytes // info.dtype.itemsize
            out = np.frombuffer(mm, dtype=info.dtype, count=count, offset=offset).reshape(info.shape)
        out.flags.writeable = False
        return out

    def source_files(self) -> list[tuple[str, int]]:
        """The shard files the checkpoint references, as sorted (file name, size in bytes)."""
        result = []
        for file in sorted(set(self._weight_map.values())):
            path = os.path.join(self.path, file)
            try:
                result.append((file, os.path.getsize(path)))
            except OSError:
                raise _error(f"{path}: shard file not found") from None
        return result

    def close(self) -> None:
        """Drop the memory maps (they are unmapped once no returned array uses them)."""
        for mm in self._maps.values():
            try:
                mm.close()
            except BufferError:  # arrays still view it; it is unmapped when they are collected
                pass
        self._maps.clear()

    def __enter__(self) -> HubReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"HubReader({self.path!r}, {len(self)} tensors)"


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _little_endian_contiguous(name: str, array: Any) -> tuple[np.ndarray, str]:
    """``array`` as a C-contiguous little-endian numpy array, with its safetensors dtype name."""
    arr = np.asarray(array)
    try:
        dtype_name = dtype_name_of(arr.dtype)
    except DeepSeekError:
        raise _error(f"tensor {name!r}: dtype {arr.dtype} cannot be stored in safetensors") from None
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    if not arr.flags.c_contiguous:
        arr = arr.copy(order="C")  # (np.ascontiguousarray would turn 0-d arrays into 1-d)
    return arr, dtype_name


def _header_bytes(entries: Mapping[str, Any], metadata: Mapping[str, str] | None) -> bytes:
    header: dict[str, Any] = {}
    if metadata:
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(f"safetensors metadata must map str to str, got {k!r}: {v!r}")
        header["__metadata__"] = dict(metadata)
    header.update(entries)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # pad so the data section starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, Any],
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Write ``tensors`` (in their order) to a safetensors file; return the data size in bytes.

    Written to ``path + ".tmp"`` and renamed, so ``path`` never holds a partial file.
    """
    path = os.fspath(path)
    arrays: list[np.ndarray] = []
    entries: dict[str, Any] = {}
    offset = 0
    for name, value in tensors.items():
        if name == "__metadata__":
            raise ValueError("'__metadata__' is reserved and cannot be a tensor name")
        arr, dtype_name = _little_endian_contiguous(name, value)
        entries[name] = {
            "dtype": dtype_name,
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
        arrays.append(arr)
    header = _header_bytes(entries, metadata)
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            for arr in arrays:
                if arr.nbytes:
                    f.write(memoryview(arr.reshape(-1).view(np.uint8)))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return offset


def write_config(out_dir: str | os.PathLike[str], cfg: Mapping[str, Any]) -> str:
    """Write ``cfg`` as ``out_dir/config.json`` (atomically, creating ``out_dir``); return its path."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, CONFIG_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return path


class HubWriter:
    """Streams tensors into sharded safetensors files plus ``model.safetensors.index.json``.

    Tensors are buffered until the next one would push the shard past ``max_shard_bytes`` (a
    tensor larger than that gets a shard of its own); then the shard is written under a
    temporary name.  :meth:`close` renames the shards to ``model-0000i-of-0000N.safetensors``
    (N is only known then) and writes the index last, so a directory with an index is complete.
    Leaving the ``with`` block by an exception removes the temporary shards instead.
    ``metadata`` (str -> str) goes into every shard header and the index metadata.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        *,
        max_shard_bytes: int = 5 * 2**30,
        metadata: Mapping[str, str] | None = None,
    ):
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.out_dir = os.fspath(out_dir)
        os.makedirs(self.out_dir, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = dict(metadata or {})
        self.total_size = 0
        self._buffer: dict[str, np.ndarray] = {}
        self._buffer_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
        self._seen: set[str] = set()
        self._closed = False

    def add(self, name: str, array: Any) -> None:
        """Queue one tensor; flushes the current shard first if this one would not fit."""
        if self._closed:
            raise ValueError("HubWriter is closed")
        if name in self._seen:
            raise ValueError(f"tensor {name!r} added twice")
        arr, _ = _little_endian_contiguous(name, array)
        if self._buffer and self._buffer_bytes + arr.nbytes > self.max_shard_bytes:
            self._flush()
        self._seen.add(name)
        self._buffer[name] = arr
        self._buffer_bytes += arr.nbytes
        self.total_size += arr.nbytes

    def _flush(self) -> None:
        if not self._buffer:
            return
        tmp_name = f".partial-{len(self._shards) + 1:05d}.safetensors"
        write_safetensors(os.path.join(self.out_dir, tmp_name), self._buffer, self.metadata)
        self._shards.append((tmp_name, list(self._buffer)))
        self._buffer = {}
        self._buffer_bytes = 0

    def close(self) -> str:
        """Write the last shard, rename all shards and write the index; return the index path."""
        if self._closed:
            return os.path.join(self.out_dir, INDEX_FILE)
        self._flush()
        self._closed = True
        n = len(self._shards)
        weight_map: dict[str, str] = {}
        for i, (tmp_name, names) in enumerate(self._shards, start=1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(self.out_dir, tmp_name), os.path.join(self.out_dir, final))
            weight_map.update((name, final) for name in names)
        index = {
            "metadata": {**self.metadata, "total_size": self.total_size},
            "weight_map": weight_map,
        }
        path = os.path.join(self.out_dir, INDEX_FILE)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
        return path

    def abort(self) -> None:
        """Discard everything written so far (temporary shards are deleted, no index written)."""
        self._closed = True
        self._buffer = {}
        for tmp_name, _ in self._shards:
            path = os.path.join(self.out_dir, tmp_name)
            if os.path.exists(path):
                os.remove(path)
        self._shards = []

    def __enter__(self) -> HubWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# --------------------------------------------------------------------------------------------
# Block FP8 (SPEC section 7)
# --------------------------------------------------------------------------------------------


def _scale_shape(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    return (-(-shape[0] // block[0]), -(-shape[1] // block[1]))


def quantize_block_fp8_np(
    w: np.ndarray, block: tuple[int, int] = DEFAULT_BLOCK
) -> tuple[np.ndarray, np.ndarray]:
    """Quantize a 2-D weight ``[out, in]`` to block-scaled ``float8_e4m3fn``.

    Per ``block`` tile (edge tiles partial): ``scale = amax(|tile|) / 448`` (1.0 for an all-zero
    tile, never below float32's smallest normal), ``wq = e4m3(w / scale)``.  Returns ``(wq, scale)`` with ``scale`` float32 of shape
    ``[ceil(out/b0), ceil(in/b1)]``: the checkpoint's ``weight_scale_inv``, a multiplier
    (``w ~= float(wq) * scale``). Non-finite values raise :class:`DeepSeekError` (naming the block).
    """
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {w.shape}")
    rows, cols = w.shape
    sr, sc = _scale_shape((rows, cols), block)
    padded = np.zeros((sr * block[0], sc * block[1]), np.float32)
    padded[:rows, :cols] = w
    tiles = padded.reshape(sr, block[0], sc, block[1])
    amax = np.abs(tiles).max(axis=(1, 3))
    if not np.isfinite(amax).all():   # an inf scale, NaN codes, a block rounded to 0: refused
        raise _error(f"non-finite values (inf or NaN) in block {np.argwhere(~np.isfinite(amax))[0].tolist()} "
                     "cannot be stored as FP8")
    # no subnormal scale: 1e-44 / 448 rounds to 0 (w / 0: NaN codes), and XLA flushes subnormals
    # to 0 on the device (``quant.quantize`` floors its scales the same way)
    tiny = np.finfo(np.float32).tiny
    scale = np.where(amax > 0, np.maximum(amax / np.float32(FP8_MAX), tiny), np.float32(1.0)).astype(np.float32)
    q = tiles / scale[:, None, :, None]
    q = np.clip(q, -FP8_MAX, FP8_MAX).reshape(padded.shape)[:rows, :cols]
    return q.astype(ml_dtypes.float8_e4m3fn), scale


def dequantize_block_fp8_np(
    wq: np.ndarray, scale: np.ndarray, block: tuple[int, int] = DEFAULT_BLOCK
) -> np.ndarray:
    """``W[i, j] = float(wq[i, j]) * scale[i // b0, j // b1]`` as float32 (SPEC section 7)."""
    wq = np.asarray(wq)
    scale = np.asarray(scale, dtype=np.float32)
    if wq.ndim != 2 or scale.shape != _scale_shape(wq.shape, block):
        raise _error(
            f"FP8 scale of shape {list(scale.shape)} does not fit weight of shape {list(wq.shape)} "
            f"with {block[0]}x{block[1]} blocks"
        )
    full = np.repeat(np.repeat(scale, block[0], axis=0), block[1], axis=1)
    return wq.astype(np.float32) * full[: wq.shape[0], : wq.shape[1]]


# --------------------------------------------------------------------------------------------
# The tensors of a checkpoint (SPEC sections 2, 3, 5, 6, 7)
# --------------------------------------------------------------------------------------------


class TensorSpec(NamedTuple):
    """Expected shape and safetensors dtype name of one checkpoint tensor."""

    shape: tuple[int, ...]
    dtype_name: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype_name].itemsize


_REQUIRED = object()


def _cfg_int(cfg: Mapping[str, Any], key: str, default: Any = _REQUIRED) -> Any:
    """An integer config field; absent or null gives ``default`` (an error when required)."""
    value = cfg.get(key)
    if value is None:
        if default is _REQUIRED:
            raise _error(f"config: missing field {key!r}")
        return default
    if type(value) is not int or value < 0:
        raise _error(f"config: field {key!r} must be a non-negative integer, got {value!r}")
    return value


def _is_fp8(cfg: Mapping[str, Any]) -> bool:
    qc = cfg.get("quantization_config")
    return isinstance(qc, dict) and qc.get("quant_method") == "fp8"


def _fp8_block(cfg: Mapping[str, Any]) -> tuple[int, int]:
    qc = cfg.get("quantization_config")
    block = qc.get("weight_block_size") if isinstance(qc, dict) else None
    if block is None:
        return DEFAULT_BLOCK
    if (
        not isinstance(block, list)
        or len(block) != 2
        or not all(type(b) is int and b > 0 for b in block)
    ):
        raise _error(
            f"config: quantization_config.weight_block_size must be [int, int], got {block!r}"
        )
    return (block[0], block[1])


def missing_extent(reader: Any, cfg: Any) -> str | None:
    """The name of a tensor of the deepest decoder layer or the last routed expert that ``cfg`` (a
    :class:`~deepseek_jax.config.DeepSeekConfig`) implies and ``reader`` lacks, else None: looked up
    before the spec of every tensor is built (a config of a million layers took a minute and 7 GB
    to say that the checkpoint does not have them)."""
    n, E = cfg.num_hidden_layers, cfg.n_routed_experts
    names = [f"model.layers.{n - 1}.input_layernorm.weight"]
    if n > cfg.first_k_dense_replace:
        names.append(f"model.layers.{n - 1}.mlp.experts.{E - 1}.down_proj.weight")
    return next((name for name in names if name not in reader), None)


def hub_tensor_specs(
    cfg: Mapping[str, Any], *, include_mtp: bool = True, fp8: bool | None = None
) -> dict[str, TensorSpec]:
    """Every tensor the Hub checkpoint of ``cfg`` (a ``config.json`` dict) must contain.

    Names and shapes follow SPEC sections 2-7, ordered like the model (embedding, layers,
    final norm, lm_head, then the MTP layers ``model.layers.{N+j}``).  ``fp8=None`` means FP8
    iff ``cfg`` has a ``quantization_config`` with ``quant_method == "fp8"``.  In FP8 layout,
    every linear weight of attention and of the dense/routed/shared MLPs is ``F8_E4M3`` with a
    ``<name>_scale_inv`` (F32 ``[ceil(out/b0), ceil(in/b1)]``, ``b`` = ``weight_block_size``);
    embeddings, heads, norms, the router gate and ``eh_proj`` are BF16 and the gate's
    ``e_score_correction_bias`` F32.  Without FP8, everything is BF16 but that bias.
    """
    if fp8 is None:
        fp8 = _is_fp8(cfg)
    block = _fp8_block(cfg) if fp8 else DEFAULT_BLOCK
    if cfg.get("attention_bias"):
        raise _error("config: attention_bias=true is not supported (DeepSeek-V3 has no such biases)")

    vocab = _cfg_int(cfg, "vocab_size")
    d = _cfg_int(cfg, "hidden_size")
    n_layers = _cfg_int(cfg, "num_hidden_layers")
    n_heads = _cfg_int(cfg, "num_attention_heads")
    q_lora = _cfg_int(cfg, "q_lora_rank", None)
    kv_lora = _cfg_int(cfg, "kv_lora_rank")
    nope = _cfg_int(cfg, "qk_nope_head_dim")
    rope = _cfg_int(cfg, "qk_rope_head_dim")
    v_dim = _cfg_int(cfg, "v_head_dim")
    n_experts = _cfg_int(cfg, "n_routed_experts", 0)
    first_dense = _cfg_int(cfg, "first_k_dense_replace", 0)
    moe_freq = _cfg_int(cfg, "moe_layer_freq", 1) or 1
    n_mtp = _cfg_int(cfg, "num_nextn_predict_layers", 0) if include_mtp else 0
    inter = _cfg_int(cfg, "intermediate_size")
    moe_inter = _cfg_int(cfg, "moe_intermediate_size") if n_experts else 0
    n_shared = _cfg_int(cfg, "n_shared_experts", 0) if n_experts else 0
    tied = bool(cfg.get("tie_word_embeddings", False))

    specs: dict[str, TensorSpec] = {}

    def bf16(name: str, *shape: int) -> None:
        specs[name] = TensorSpec(tuple(shape), "BF16")

    def linear(name: str, out_features: int, in_features: int) -> None:
        if fp8:
            specs[f"{name}.weight"] = TensorSpec((out_features, in_features), "F8_E4M3")
            specs[f"{name}.weight_scale_inv"] = TensorSpec(
                _scale_shape((out_features, in_features), block), "F32"
            )
        else:
            bf16(f"{name}.weight", out_features, in_features)

    def mlp(prefix: str, hidden: int) -> None:
        linear(f"{prefix}.gate_proj", hidden, d)
        linear(f"{prefix}.up_proj", hidden, d)
        linear(f"{prefix}.down_proj", d, hidden)

    def decoder_layer(i: int, moe: bool) -> None:
        p = f"model.layers.{i}"
        bf16(f"{p}.input_layernorm.weight", d)
        a = f"{p}.self_attn"
        if q_lora is None:
            linear(f"{a}.q_proj", n_heads * (nope + rope), d)
        else:
            linear(f"{a}.q_a_proj", q_lora, d)
            bf16(f"{a}.q_a_layernorm.weight", q_lora)
            linear(f"{a}.q_b_proj", n_heads * (nope + rope), q_lora)
        linear(f"{a}.kv_a_proj_with_mqa", kv_lora + rope, d)
        bf16(f"{a}.kv_a_layernorm.weight", kv_lora)
        linear(f"{a}.kv_b_proj", n_heads * (nope + v_dim), kv_lora)
        linear(f"{a}.o_proj", d, n_heads * v_dim)
        bf16(f"{p}.post_attention_layernorm.weight", d)
        if moe:
            bf16(f"{p}.mlp.gate.weight", n_experts, d)
            specs[f"{p}.mlp.gate.e_score_correction_bias"] = TensorSpec((n_experts,), "F32")
            for e in range(n_experts):
                mlp(f"{p}.mlp.experts.{e}", moe_inter)
            if n_shared:
                mlp(f"{p}.mlp.shared_experts", moe_inter * n_shared)
        else:
            mlp(f"{p}.mlp", inter)

    bf16("model.embed_tokens.weight", vocab, d)
    for i in range(n_layers):
        decoder_layer(i, moe=bool(n_experts) and i >= first_dense and i % moe_freq == 0)
    bf16("model.norm.weight", d)
    if not tied:
        bf16("lm_head.weight", vocab, d)
    for j in range(n_mtp):
        i = n_layers + j
        p = f"model.layers.{i}"
        bf16(f"{p}.embed_tokens.weight", vocab, d)
        bf16(f"{p}.enorm.weight", d)
        bf16(f"{p}.hnorm.weight", d)
        bf16(f"{p}.eh_proj.weight", d, 2 * d)
        decoder_layer(i, moe=bool(n_experts))
        bf16(f"{p}.shared_head.norm.weight", d)
        bf16(f"{p}.shared_head.head.weight", vocab, d)
    return specs


#: the float dtypes a BF16 or F32 tensor may come in (read as the model's, rounded or widened)
_FLOAT_NAMES = frozenset({"F32", "F16", "BF16"})


def spec_mismatches(reader: HubReader, specs: Mapping[str, TensorSpec], *,
                    any_float: bool = False) -> list[str]:
    """One-line descriptions of how the checkpoint differs from ``specs`` (empty if it matches).

    Reports missing tensors, unexpected tensors, and shape or dtype differences; with
    ``any_float``, F32 / F16 / BF16 stand for one another (FP8 weights still must be FP8).
    """
    problems: list[str] = []
    for name, spec in specs.items():
        if name not in reader:
            problems.append(f"missing tensor {name!r}")
            continue
        info = reader.info(name)
        same_dtype = info.dtype == DTYPES[spec.dtype_name] or (
            any_float and spec.dtype_name in _FLOAT_NAMES and dtype_name_of(info.dtype) in _FLOAT_NAMES)
        if info.shape != spec.shape or not same_dtype:
            problems.append(
                f"tensor {name!r} in {info.file} is {dtype_name_of(info.dtype)} {list(info.shape)}, "
                f"expected {spec.dtype_name} {list(spec.shape)}"
            )
    problems.extend(f"unexpected tensor {name!r}" for name in reader.names() if name not in specs)
    return problems

