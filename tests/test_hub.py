"""Tests of deepseek_jax.hub (safetensors I/O, Hub layout, FP8 blocks) and deepseek_jax.synthetic."""

from __future__ import annotations

import ast
import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest

from deepseek_jax.errors import DeepSeekError
from deepseek_jax.hub import (
    DTYPES,
    INDEX_FILE,
    HubReader,
    HubWriter,
    TensorSpec,
    dequantize_block_fp8_np,
    hub_tensor_specs,
    quantize_block_fp8_np,
    spec_mismatches,
    write_config,
    write_safetensors,
)
from deepseek_jax.synthetic import random_hub_checkpoint, tiny_config

# The published DeepSeek-V3 config.json (SPEC section 1), as far as tensor shapes go.
V3_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "first_k_dense_replace": 3,
    "moe_layer_freq": 1,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "n_group": 8,
    "topk_group": 4,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "norm_topk_prob": True,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "rope_theta": 10000,
    "rope_scaling": {
        "type": "yarn",
        "factor": 40,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "attention_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "num_nextn_predict_layers": 1,
    "quantization_config": {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    },
}


# ----------------------------------------------------------------------------- helpers


def _sample(dtype_name: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random values of every bit pattern class for a safetensors dtype (incl. NaN/inf bits)."""
    dtype = DTYPES[dtype_name]
    rng = np.random.default_rng(seed)
    if dtype_name == "BOOL":
        return rng.integers(0, 2, shape).astype(bool)
    raw = rng.integers(0, 256, int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
    return raw.view(dtype).reshape(shape)


def _make_dir(tmp_path, tensors, name="model.safetensors", cfg=None):
    """A checkpoint directory with config.json and one safetensors file."""
    write_config(tmp_path, cfg if cfg is not None else {"model_type": "test"})
    write_safetensors(os.path.join(tmp_path, name), tensors)
    return str(tmp_path)


def _write_raw(path, header: dict | bytes, data: bytes = b"", header_len: int | None = None):
    """A safetensors file with an arbitrary (possibly broken) header."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if header_len is None else header_len))
        f.write(raw)
        f.write(data)


def _expect_error(fn, *needles: str) -> str:
    with pytest.raises(DeepSeekError) as excinfo:
        fn()
    message = str(excinfo.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def _read_all(directory) -> dict[str, np.ndarray]:
    with HubReader(directory) as r:
        return {name: np.array(r.get(name)) for name in r.names()}


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
def test_roundtrip_bit_exact_every_dtype(tmp_path, dtype_name):
    tensors = {
        "matrix": _sample(dtype_name, (5, 7), seed=1),
        "scalar": _sample(dtype_name, (), seed=2),
        "empty": _sample(dtype_name, (0, 3), seed=3),
        "cube": _sample(dtype_name, (2, 3, 4), seed=4),
    }
    directory = _make_dir(tmp_path, tensors)
    with HubReader(directory) as r:
        assert r.names() == sorted(tensors)
        assert r.config == {"model_type": "test"}
        for name, want in tensors.items():
            got = r.get(name)
            info = r.info(name)
            assert info.shape == want.shape and got.shape == want.shape
            assert info.dtype == DTYPES[dtype_name] and got.dtype == DTYPES[dtype_name]
            assert info.nbytes == want.nbytes and info.file == "model.safetensors"
            assert got.tobytes() == want.tobytes()
            assert not got.flags.writeable
            with pytest.raises(ValueError):
                got[...] = 0
        assert "matrix" in r and "nope" not in r
        assert r.source_files() == [
            ("model.safetensors", os.path.getsize(os.path.join(directory, "model.safetensors")))
        ]


def test_get_is_zero_copy_view_of_file(tmp_path):
    directory = _make_dir(tmp_path, {"w": np.arange(1000, dtype=np.float32)})
    with HubReader(directory) as r:
        w = r.get("w")
        assert not w.flags.owndata and w.base is not None
        np.testing.assert_array_equal(w, np.arange(1000, dtype=np.float32))
    # Arrays stay usable after close (the map is released when they are collected).
    assert float(w[999]) == 999.0


def test_big_endian_input_is_stored_little_endian(tmp_path):
    a = np.arange(6, dtype=">f4").reshape(2, 3)
    directory = _make_dir(tmp_path, {"a": a})
    got = _read_all(directory)["a"]
    assert got.dtype == np.dtype("<f4")
    np.testing.assert_array_equal(got, a)


def test_header_is_8_byte_aligned_and_metadata_kept(tmp_path):
    path = str(tmp_path / "m.safetensors")
    write_safetensors(path, {"x": np.ones(3, np.int8)}, metadata={"format": "pt", "k": "v"})
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    assert (8 + n) % 8 == 0
    assert header["__metadata__"] == {"format": "pt", "k": "v"}
    assert not os.path.exists(path + ".tmp")


def test_safetensors_library_reads_our_files(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file

    numpy_names = sorted(set(DTYPES) - {"BF16", "F8_E4M3", "F8_E5M2"})
    numeric = {f"t_{n}": _sample(n, (3, 5), seed=i) for i, n in enumerate(numpy_names)}
    path = str(tmp_path / "numeric.safetensors")
    write_safetensors(path, numeric, metadata={"format": "np"})
    loaded = load_file(path)
    assert sorted(loaded) == sorted(numeric)
    for name, want in numeric.items():
        assert loaded[name].dtype == want.dtype.newbyteorder("=")
        assert loaded[name].tobytes() == want.tobytes()

    # bf16 / f32 file: safe_open with ml_dtypes imported resolves "bfloat16" by name.
    mixed = {"b": _sample("BF16", (4, 6)), "f": _sample("F32", (7,)), "s": _sample("F32", ())}
    path = str(tmp_path / "bf16.safetensors")
    write_safetensors(path, mixed, metadata={"format": "pt"})
    with safe_open(path, framework="numpy") as f:
        assert sorted(f.keys()) == sorted(mixed)
        assert f.metadata() == {"format": "pt"}
        for name, want in mixed.items():
            got = f.get_tensor(name)
            assert got.shape == want.shape and got.tobytes() == want.tobytes()

    # FP8: the library validates the file and reports shape/dtype (numpy has no float8 dtype).
    path = str(tmp_path / "fp8.safetensors")
    write_safetensors(path, {"q": _sample("F8_E4M3", (3, 130)), "s": np.ones((1, 2), np.float32)})
    with safe_open(path, framework="numpy") as f:
        assert f.get_slice("q").get_shape() == [3, 130]
        assert f.get_slice("q").get_dtype() == "F8_E4M3"
        np.testing.assert_array_equal(f.get_tensor("s"), np.ones((1, 2), np.float32))


def test_we_read_safetensors_library_files(tmp_path):
    from safetensors.numpy import save_file

    tensors = {
        "a": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b": np.array([1, -2, 3], np.int64),
        "c": np.array([[True, False]]),
        "d": np.linspace(0, 1, 9, dtype=np.float16).reshape(3, 3),
        "e": np.array(7.5, np.float64),
    }
    write_config(tmp_path, {"model_type": "test"})
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "np"})
    with HubReader(tmp_path) as r:
        assert r.metadata == {"format": "np"}
        for name, want in tensors.items():
            got = r.get(name)
            assert got.dtype == want.dtype and got.shape == want.shape
            assert got.tobytes() == want.tobytes()


def test_hub_writer_shards_and_index(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {f"t{i}": rng.standard_normal((10, 10)).astype(np.float32) for i in range(7)}  # 400 B each
    tensors["big"] = np.zeros((40, 40), np.float32)  # 6400 B: over the limit, own shard
    tensors["last"] = np.ones(3, ml_dtypes.bfloat16)
    with HubWriter(tmp_path, max_shard_bytes=1000, metadata={"format": "pt"}) as w:
        for name, arr in tensors.items():
            w.add(name, arr)
    write_config(tmp_path, {"model_type": "test"})
    files = sorted(os.listdir(tmp_path))
    shards = [f for f in files if f.endswith(".safetensors")]
    # 7 x 400 B at <= 1000 B per shard: 4 shards, then "big" alone, then "last".
    assert shards == [f"model-{i:05d}-of-00006.safetensors" for i in range(1, 7)]
    assert set(files) == set(shards) | {INDEX_FILE, "config.json"}
    with open(tmp_path / INDEX_FILE) as f:
        index = json.load(f)
    assert index["metadata"] == {"format": "pt", "total_size": sum(a.nbytes for a in tensors.values())}
    assert index["weight_map"]["big"] == "model-00005-of-00006.safetensors"
    got = _read_all(tmp_path)
    assert sorted(got) == sorted(tensors)
    for name, want in tensors.items():
        assert got[name].tobytes() == want.tobytes()
    with HubReader(tmp_path) as r:
        assert [f for f, _ in r.source_files()] == shards
        assert r.info("t6").file == "model-00004-of-00006.safetensors"


def test_hub_writer_aborts_on_exception(tmp_path):
    with pytest.raises(RuntimeError):
        with HubWriter(tmp_path, max_shard_bytes=10) as w:
            w.add("a", np.zeros(8, np.float32))
            w.add("b", np.zeros(8, np.float32))
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_hub_writer_rejects_duplicates(tmp_path):
    with HubWriter(tmp_path) as w:
        w.add("a", np.zeros(2, np.float32))
        with pytest.raises(ValueError):
            w.add("a", np.zeros(2, np.float32))


def test_modules_do_not_import_jax_or_torch():
    """hub.py and synthetic.py must work on machines without jax or torch (checked statically,
    so that a package ``__init__`` importing jax does not hide a direct import here)."""
    import deepseek_jax.hub
    import deepseek_jax.synthetic

    for module in (deepseek_jax.hub, deepseek_jax.synthetic):
        tree = ast.parse(open(module.__file__, encoding="utf-8").read())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
        assert not imported & {"jax", "jaxlib", "flax", "torch", "transformers"}, module.__name__


# ----------------------------------------------------------------------------- FP8 blocks


def test_quantize_edge_blocks_and_error_bound():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((200, 130)).astype(np.float32)
    w[:128, 128:] *= 1000.0  # blocks with very different ranges
    w[128:, :128] *= 1e-3
    wq, scale = quantize_block_fp8_np(w)
    assert wq.dtype == ml_dtypes.float8_e4m3fn and wq.shape == (200, 130)
    assert scale.dtype == np.float32 and scale.shape == (2, 2)
    blocks = [(slice(0, 128), slice(0, 128)), (slice(0, 128), slice(128, 130)),
              (slice(128, 200), slice(0, 128)), (slice(128, 200), slice(128, 130))]
    for (rows, cols), s in zip(blocks, scale.reshape(-1)):
        np.testing.assert_allclose(s, np.abs(w[rows, cols]).max() / 448.0, rtol=1e-6)
    deq = dequantize_block_fp8_np(wq, scale)
    assert deq.dtype == np.float32 and deq.shape == w.shape
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normal values; values in the
    # subnormal range (< 2^-6 * scale) have an absolute error <= half the step 2^-9 * scale.
    s_full = np.repeat(np.repeat(scale, 128, 0), 128, 1)[:200, :130]
    err = np.abs(deq - w)
    assert np.all(err <= 0.07 * np.abs(w) + 2.0**-10 * s_full)
    big = np.abs(w) >= 2.0**-6 * s_full
    assert np.all(err[big] <= 0.07 * np.abs(w[big]))
    # The largest element of each block is exactly representable (448).
    assert np.max(np.abs(wq.astype(np.float32))) == 448.0


def test_quantize_all_zero_block_gives_no_nan():
    w = np.zeros((256, 130), np.float32)
    w[:128, :128] = 0.5
    wq, scale = quantize_block_fp8_np(w)
    assert scale[1, 0] == 1.0 and scale[0, 1] == 1.0 and scale[1, 1] == 1.0
    deq = dequantize_block_fp8_np(wq, scale)
    assert not np.isnan(wq.astype(np.float32)).any() and not np.isnan(deq).any()
    np.testing.assert_array_equal(deq, w)


def test_quantize_tiny_blocks_give_no_nan_and_agree_with_the_device_quantizer():
    """A block whose largest magnitude is ~1e-44 got a scale of 0 (16,383 NaN codes); ~1e-40 a
    subnormal scale, which XLA flushes to 0 on the device. Both quantizers now floor the scale at
    float32's smallest normal, and give the same weights (XLA on CPU reads the subnormal inputs
    as 0: its scale for those blocks is 1, with zero codes)."""
    from deepseek_jax.quant import quantize

    w = np.zeros((256, 256), np.float32)
    w[0, 0], w[0, 128], w[128, 5] = 1e-44, 1e-40, 1e-30
    w[130, 130] = 0.25
    wq, scale = quantize_block_fp8_np(w)
    assert (scale >= np.finfo(np.float32).tiny).all()
    assert not np.isnan(wq.astype(np.float32)).any() and not np.isnan(dequantize_block_fp8_np(wq, scale)).any()
    jq, js = quantize(w)
    np.testing.assert_allclose(dequantize_block_fp8_np(np.asarray(jq), np.asarray(js)),
                               dequantize_block_fp8_np(wq, scale), rtol=0, atol=np.finfo(np.float32).tiny)
    np.testing.assert_array_equal(np.asarray(js)[1], scale[1])   # the blocks of normal numbers


def test_dequantize_rejects_mismatched_scale():
    _expect_error(lambda: dequantize_block_fp8_np(np.zeros((200, 130), ml_dtypes.float8_e4m3fn),
                                                  np.ones((1, 2), np.float32)), "[1, 2]", "[200, 130]")


# ----------------------------------------------------------------------------- errors


def test_error_missing_directory(tmp_path):
    _expect_error(lambda: HubReader(tmp_path / "nowhere"), "nowhere")


def test_error_config_missing_or_bad(tmp_path):
    _expect_error(lambda: HubReader(tmp_path), "config.json")
    (tmp_path / "config.json").write_text("{not json")
    _expect_error(lambda: HubReader(tmp_path), "config.json")
    (tmp_path / "config.json").write_text("[1, 2]")
    _expect_error(lambda: HubReader(tmp_path), "config.json")


def test_error_no_weights(tmp_path):
    write_config(tmp_path, {})
    _expect_error(lambda: HubReader(tmp_path), INDEX_FILE, "model.safetensors")


def test_error_index_invalid(tmp_path):
    write_config(tmp_path, {})
    (tmp_path / INDEX_FILE).write_text('{"weight_map": ')
    _expect_error(lambda: HubReader(tmp_path), INDEX_FILE)
    (tmp_path / INDEX_FILE).write_text('{"metadata": {}}')
    _expect_error(lambda: HubReader(tmp_path), INDEX_FILE, "weight_map")
    (tmp_path / INDEX_FILE).write_text('{"weight_map": {"a": 3}}')
    _expect_error(lambda: HubReader(tmp_path), INDEX_FILE, "'a'")


def test_error_missing_shard(tmp_path):
    with HubWriter(tmp_path) as w:
        w.add("a", np.zeros(4, np.float32))
    write_config(tmp_path, {})
    os.remove(tmp_path / "model-00001-of-00001.safetensors")
    r = HubReader(tmp_path)  # shards open lazily
    _expect_error(lambda: r.get("a"), "model-00001-of-00001.safetensors")
    _expect_error(lambda: r.source_files(), "model-00001-of-00001.safetensors")


def test_error_tensor_absent_from_shard(tmp_path):
    with HubWriter(tmp_path) as w:
        w.add("a", np.zeros(4, np.float32))
    write_config(tmp_path, {})
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    index["weight_map"]["ghost.weight"] = "model-00001-of-00001.safetensors"
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    with HubReader(tmp_path) as r:
        assert "ghost.weight" in r
        _expect_error(lambda: r.info("ghost.weight"), "ghost.weight", "model-00001-of-00001.safetensors")
        _expect_error(lambda: r.get("not.there"), "not.there")
        np.testing.assert_array_equal(r.get("a"), np.zeros(4))


def test_error_truncated_shard(tmp_path):
    directory = _make_dir(tmp_path, {"a": np.zeros(4, np.float32), "b": np.ones(100, np.float32)})
    path = os.path.join(directory, "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 5)
    _expect_error(lambda: HubReader(directory), "model.safetensors", "truncated")
    with open(path, "r+b") as f:
        f.truncate(6)  # not even the length prefix
    _expect_error(lambda: HubReader(directory), "model.safetensors")


def test_error_offsets_do_not_match_shape(tmp_path):
    write_config(tmp_path, {})
    header = {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}
    _write_raw(tmp_path / "model.safetensors", header, bytes(24))
    with HubReader(tmp_path) as r:
        _expect_error(lambda: r.get("w"), "model.safetensors", "'w'")


def test_error_corrupt_header(tmp_path):
    write_config(tmp_path, {})
    path = tmp_path / "model.safetensors"
    _write_raw(path, {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(4),
               header_len=10**12)
    _expect_error(lambda: HubReader(tmp_path), "model.safetensors", "header")
    _write_raw(path, b"\xff\xfe{garbage!", bytes(4))
    _expect_error(lambda: HubReader(tmp_path), "model.safetensors", "JSON")
    _write_raw(path, b"[1, 2, 3]")
    _expect_error(lambda: HubReader(tmp_path), "model.safetensors", "object")
    _write_raw(path, {"w": {"dtype": "F32", "shape": "oops", "data_offsets": [0, 4]}}, bytes(4))
    _expect_error(lambda: HubReader(tmp_path), "model.safetensors", "'w'")
    _write_raw(path, {"w": {"dtype": "F32", "shape": [1]}}, bytes(4))
    _expect_error(lambda: HubReader(tmp_path), "model.safetensors", "'w'")
    # Overwrite bytes inside a valid header.
    directory = _make_dir(tmp_path / "x", {"w": np.zeros(4, np.float32)})
    with open(os.path.join(directory, "model.safetensors"), "r+b") as f:
        f.seek(8)
        f.write(b"\x00\x01\x02")
    _expect_error(lambda: HubReader(directory), "model.safetensors")


def test_error_unknown_dtype(tmp_path):
    write_config(tmp_path, {})
    header = {"w": {"dtype": "F4_E2M1", "shape": [2], "data_offsets": [0, 1]},
              "ok": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]}}
    _write_raw(tmp_path / "model.safetensors", header, bytes([0, 7, 9]))
    with HubReader(tmp_path) as r:
        _expect_error(lambda: r.get("w"), "model.safetensors", "'w'", "F4_E2M1")
        np.testing.assert_array_equal(r.get("ok"), [7, 9])


def test_error_config_fields():
    cfg = tiny_config()
    del cfg["hidden_size"]
    _expect_error(lambda: hub_tensor_specs(cfg), "hidden_size")
    _expect_error(lambda: hub_tensor_specs(tiny_config(kv_lora_rank="32")), "kv_lora_rank")


# ----------------------------------------------------------------------------- specs


def test_specs_of_deepseek_v3_671b():
    specs = hub_tensor_specs(V3_CONFIG)
    # Per layer: attention 5 linears (weight + scale) + 4 norms = 14; dense MLP 6;
    # MoE gate + bias + 257 SwiGLUs of 3 FP8 linears = 2 + 1542.
    attn, dense, moe = 14, 6, 2 + 257 * 6
    main = 3 + 3 * (attn + dense) + 58 * (attn + moe)
    mtp = attn + moe + 6
    assert len(specs) == main + mtp == 91991
    total = sum(s.nbytes for s in specs.values())
    assert 680e9 < total < 700e9
    main_params = sum(s.numel for n, s in specs.items()
                      if not n.startswith("model.layers.61.") and not n.endswith("_scale_inv"))
    assert abs(main_params - 671e9) < 0.01 * 671e9
    mtp_params = sum(s.numel for n, s in specs.items() if n.startswith("model.layers.61."))
    assert 13e9 < mtp_params < 15e9  # 11.5B + embedding and head copies (SPEC section 1)

    a = "model.layers.0.self_attn"
    assert specs[f"{a}.kv_a_proj_with_mqa.weight"] == TensorSpec((576, 7168), "F8_E4M3")
    assert specs[f"{a}.kv_a_proj_with_mqa.weight_scale_inv"] == TensorSpec((5, 56), "F32")
    assert specs[f"{a}.q_b_proj.weight"] == TensorSpec((128 * 192, 1536), "F8_E4M3")
    assert specs[f"{a}.kv_b_proj.weight"] == TensorSpec((128 * 256, 512), "F8_E4M3")
    assert specs[f"{a}.o_proj.weight"] == TensorSpec((7168, 128 * 128), "F8_E4M3")
    assert specs["model.layers.2.mlp.down_proj.weight"] == TensorSpec((7168, 18432), "F8_E4M3")
    assert "model.layers.2.mlp.gate.weight" not in specs
    assert specs["model.layers.3.mlp.gate.weight"] == TensorSpec((256, 7168), "BF16")
    assert specs["model.layers.3.mlp.gate.e_score_correction_bias"] == TensorSpec((256,), "F32")
    expert = "model.layers.60.mlp.experts.255.down_proj"
    assert specs[f"{expert}.weight_scale_inv"] == TensorSpec((56, 16), "F32")
    shared = "model.layers.61.mlp.shared_experts.up_proj"
    assert specs[f"{shared}.weight"] == TensorSpec((2048, 7168), "F8_E4M3")
    assert specs["model.layers.61.eh_proj.weight"] == TensorSpec((7168, 14336), "BF16")
    assert specs["model.layers.61.shared_head.head.weight"] == TensorSpec((129280, 7168), "BF16")
    assert specs["lm_head.weight"] == TensorSpec((129280, 7168), "BF16")
    assert "model.layers.62.enorm.weight" not in specs

    no_mtp = hub_tensor_specs(V3_CONFIG, include_mtp=False)
    assert len(no_mtp) == main and not any(n.startswith("model.layers.61.") for n in no_mtp)


def test_specs_bf16_layout_and_variants():
    specs = hub_tensor_specs(V3_CONFIG, fp8=False, include_mtp=False)
    assert not any(n.endswith("_scale_inv") for n in specs)
    dtypes = {s.dtype_name for n, s in specs.items() if not n.endswith("e_score_correction_bias")}
    assert dtypes == {"BF16"}
    assert specs["model.layers.5.mlp.gate.e_score_correction_bias"].dtype_name == "F32"

    cfg = tiny_config(q_lora_rank=None, tie_word_embeddings=True, num_nextn_predict_layers=0)
    specs = hub_tensor_specs(cfg)  # no quantization_config: BF16
    assert specs["model.layers.0.self_attn.q_proj.weight"] == TensorSpec((4 * 24, 64), "BF16")
    assert not any("q_a_proj" in n or "q_b_proj" in n or "q_a_layernorm" in n for n in specs)
    assert "lm_head.weight" not in specs and "model.layers.3.enorm.weight" not in specs

    cfg = tiny_config(quantization_config={"quant_method": "fp8", "weight_block_size": [32, 16]})
    specs = hub_tensor_specs(cfg)
    assert specs["model.layers.0.mlp.gate_proj.weight_scale_inv"] == TensorSpec((3, 4), "F32")
    assert specs["model.layers.1.mlp.experts.15.down_proj.weight_scale_inv"] == TensorSpec((2, 2), "F32")


# ----------------------------------------------------------------------------- synthetic


def _file_bytes(directory) -> dict[str, bytes]:
    return {f: open(os.path.join(directory, f), "rb").read() for f in sorted(os.listdir(directory))}


def test_random_checkpoint_is_deterministic_and_matches_specs(tmp_path):
    cfg = tiny_config()
    a = random_hub_checkpoint(tmp_path / "a", cfg, seed=3, max_shard_bytes=200_000)
    b = random_hub_checkpoint(tmp_path / "b", cfg, seed=3, max_shard_bytes=200_000)
    c = random_hub_checkpoint(tmp_path / "c", cfg, seed=4, max_shard_bytes=200_000)
    fa, fb, fc = _file_bytes(a), _file_bytes(b), _file_bytes(c)
    assert fa == fb
    assert len([f for f in fa if f.endswith(".safetensors")]) > 1
    assert fa["config.json"] == fc["config.json"] and fa != fc
    assert "quantization_config" not in cfg  # input not modified

    with HubReader(a) as r:
        assert r.config["quantization_config"]["quant_method"] == "fp8"
        specs = hub_tensor_specs(r.config)
        assert spec_mismatches(r, specs) == []
        assert len(r.names()) == len(specs) == 3 + 20 + 2 * 118 + 124
        # MTP embedding/head are copies of the main ones, as in the real checkpoint.
        for copy, source in [("model.layers.3.embed_tokens.weight", "model.embed_tokens.weight"),
                             ("model.layers.3.shared_head.head.weight", "lm_head.weight")]:
            assert r.get(copy).tobytes() == r.get(source).tobytes()
        bias = r.get("model.layers.1.mlp.gate.e_score_correction_bias")
        assert bias.dtype == np.float32 and bias.min() >= 0.0 and bias.max() <= 0.5
        name = "model.layers.2.mlp.experts.7.down_proj"
        w = dequantize_block_fp8_np(r.get(name + ".weight"), r.get(name + ".weight_scale_inv"))
        assert w.shape == (64, 32) and abs(w.std() * np.sqrt(32) - 1.0) < 0.15
        norm = r.get("model.layers.0.input_layernorm.weight").astype(np.float32)
        assert abs(norm.mean() - 1.0) < 0.05 and 0.05 < norm.std() < 0.15


def test_random_checkpoint_bf16_without_mtp(tmp_path):
    cfg = tiny_config(quantization_config={"quant_method": "fp8"})
    out = random_hub_checkpoint(tmp_path, cfg, fp8=False, include_mtp=False)
    with HubReader(out) as r:
        assert "quantization_config" not in r.config
        specs = hub_tensor_specs(r.config, include_mtp=False)
        assert spec_mismatches(r, specs) == []
        assert not any(n.startswith("model.layers.3.") for n in r.names())
        assert r.get("model.layers.0.self_attn.q_b_proj.weight").dtype == ml_dtypes.bfloat16
        assert spec_mismatches(r, hub_tensor_specs(r.config))[0].startswith("missing tensor")
