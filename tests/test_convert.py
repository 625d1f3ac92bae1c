"""The Hub <-> Orbax converter (deepseek_jax.orbax_ckpt; `deepseek-jax convert|export|verify`)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import deepseek_jax as dj
from deepseek_jax import orbax_ckpt as oc
from deepseek_jax import scoring
from deepseek_jax.checkpoint import abstract_model, load_hub
from deepseek_jax.cli import main
from deepseek_jax.hub import INDEX_FILE, HubReader, dequantize_block_fp8_np, write_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small chunk limits for the tests that need parameters split over several chunks (grouped
# small tensors, one Hub tensor per chunk, row-split tensors with partial edge chunks).
# The kill-and-resume test also makes the converter fsync and mark a resume point every 16 KB.
SMALL_CHUNKS = {"GROUP_MAX_BYTES": 1024, "CHUNK_MAX_BYTES": 8192, "SYNC_EVERY_BYTES": 16384}


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _hub_tensors(path: str) -> dict[str, np.ndarray]:
    with HubReader(path) as r:
        return {n: np.array(r.get(n)) for n in r.names()}


def _assert_same_tensors(a: str, b: str) -> None:
    ta, tb = _hub_tensors(a), _hub_tensors(b)
    assert sorted(ta) == sorted(tb)
    for n in ta:
        assert ta[n].dtype == tb[n].dtype and ta[n].shape == tb[n].shape, n
        assert ta[n].tobytes() == tb[n].tobytes(), n


def _files(root: str) -> dict[str, bytes]:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


def _convert(src, out, **kw):
    oc.convert(src, out, progress=False, **kw)
    return str(out)


def _export(ck, out, **kw):
    oc.export(ck, out, progress=False, **kw)
    return str(out)


def _bf16_dequant(wq, s):
    return dequantize_block_fp8_np(wq, s).astype(ml_dtypes.bfloat16)


def _ids(vocab, seed=3):
    return np.random.default_rng(seed).integers(0, vocab, (2, 19)).astype(np.int32)


# ---------------------------------------------------------------------------------------------
# fixtures (the Hub checkpoints ckpt_a, ckpt_b, ckpt_a_bf16 come from conftest.py)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def conv_a(ckpt_a, tmp):
    return _convert(ckpt_a, tmp / "conv_a")


@pytest.fixture(scope="module")
def conv_b(ckpt_b, tmp):
    return _convert(ckpt_b, tmp / "conv_b")


@pytest.fixture(scope="module")
def conv_a_deq(ckpt_a, tmp):
    return _convert(ckpt_a, tmp / "conv_a_deq", dtype="bf16")


@pytest.fixture(scope="module")
def src_b_tok(ckpt_b, tmp):
    """ckpt_b plus tokenizer files (copied along by convert and export)."""
    d = tmp / "src_b_tok"
    shutil.copytree(ckpt_b, d)
    (d / "tokenizer.json").write_text('{"model": {"type": "BPE"}}\n')
    (d / "tokenizer_config.json").write_text('{"bos_token": "<s>"}\n')
    return str(d)


@pytest.fixture(scope="module")
def conv_b_small(src_b_tok, tmp):
    """An uninterrupted conversion with many chunks per parameter (the resume test's reference)."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in SMALL_CHUNKS.items():
            mp.setattr(oc, k, v)
        return _convert(src_b_tok, tmp / "conv_b_small")


# ---------------------------------------------------------------------------------------------
# round trips, layout, logits
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["a", "b", "a_bf16", "b_small"])
def test_round_trip_is_bit_identical(which, request, tmp):
    src = {"a": "ckpt_a", "b": "ckpt_b", "a_bf16": "ckpt_a_bf16", "b_small": "src_b_tok"}[which]
    src = request.getfixturevalue(src)
    conv = {"a": "conv_a", "b": "conv_b", "b_small": "conv_b_small"}.get(which)
    conv = request.getfixturevalue(conv) if conv else _convert(src, tmp / f"conv_{which}")
    back = _export(conv, tmp / f"back_{which}")
    _assert_same_tensors(src, back)  # FP8 values, scales, bf16, float32 bias: every byte
    if which == "b_small":
        for f in ("tokenizer.json", "tokenizer_config.json"):
            assert open(os.path.join(back, f)).read() == open(os.path.join(src, f)).read()
    cfg = json.load(open(os.path.join(back, "config.json")))
    assert dj.DeepSeekConfig.from_hub_dict(cfg) == dj.DeepSeekConfig.from_hub_dict(
        json.load(open(os.path.join(src, "config.json"))))


def test_layout_is_orbax_own(conv_a, ckpt_a, tmp):
    """_METADATA equals what Orbax writes for the model state; .zarray differ only in chunking
    and compression; StandardCheckpointer restores it; the restored tree is the model's state."""
    import orbax.checkpoint as ocp

    model = load_hub(ckpt_a)
    _, state = nnx.split(model)
    ref = str(tmp / "orbax_ref")
    ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False)).save(ref, args=ocp.args.PyTreeSave(state))
    assert json.load(open(os.path.join(conv_a, "_METADATA"))) == json.load(open(os.path.join(ref, "_METADATA")))
    arrays = [d for d in os.listdir(ref) if os.path.isdir(os.path.join(ref, d)) and d.endswith(".value")]
    assert sorted(arrays) == sorted(d for d in os.listdir(conv_a) if d.endswith(".value"))
    for d in arrays:
        za, zb = (json.load(open(os.path.join(r, d, ".zarray"))) for r in (conv_a, ref))
        for z in (za, zb):
            z.pop("chunks"), z.pop("compressor")
        assert za == zb, d
    abstract = nnx.state(abstract_model(model.cfg))
    restored = ocp.StandardCheckpointer().restore(os.path.abspath(conv_a), abstract)
    for (p, a), (_, b) in zip(nnx.to_flat_state(restored), nnx.to_flat_state(state)):
        assert a.dtype == b.dtype and np.asarray(a).tobytes() == np.asarray(b).tobytes(), p


@pytest.mark.parametrize("which", ["a", "b"])
def test_logits_from_orbax_equal_logits_from_hub(which, request):
    hub = request.getfixturevalue(f"ckpt_{which}")
    conv = request.getfixturevalue(f"conv_{which}")
    m_hub, m_ox = dj.load(hub), dj.load(conv)  # api.load dispatches on the directory's contents
    ids = _ids(m_hub.cfg.vocab_size)
    assert np.array_equal(scoring.logits(m_ox, ids), scoring.logits(m_hub, ids))
    assert np.array_equal(scoring.mtp_logits(m_ox, ids), scoring.mtp_logits(m_hub, ids))


def test_float_model_from_orbax_equals_the_hubs(conv_a, conv_a_deq, ckpt_a):
    """What `train --init ORBAX` starts from: the converted checkpoint read as a float model is the
    Hub checkpoint's, array for array (the same e4m3 values and scales, dequantized alike), on one
    device and in shards on a 2x2x2 mesh; from a --dtype bf16 conversion, those values rounded to
    bfloat16 (the float32 router bias as it was)."""
    import jax

    from deepseek_jax import sharding
    from deepseek_jax.train import load_float_model

    def flat(model):
        return {".".join(map(str, p)): np.asarray(jax.device_get(v[...]))
                for p, v in nnx.to_flat_state(nnx.state(model))}

    want = flat(load_float_model(ckpt_a))
    for got in (flat(load_float_model(conv_a)),
                flat(load_float_model(conv_a, mesh=sharding.make_mesh({"data": 2, "expert": 2, "model": 2})))):
        assert sorted(got) == sorted(want)
        for k in want:
            assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), k
    deq = flat(load_float_model(conv_a_deq))
    rounded = 0
    for k, w in want.items():
        if not k.endswith("e_score_correction_bias"):
            rounded += not np.array_equal(w.astype(ml_dtypes.bfloat16).astype(w.dtype), w)
            w = w.astype(ml_dtypes.bfloat16).astype(w.dtype)
        assert deq[k].dtype == w.dtype and np.array_equal(deq[k], w), k
    assert rounded > 10   # (dequantized FP8 weights are not bfloat16 values: the comparison can fail)


def test_a_second_writer_of_one_directory_is_refused(ckpt_a, conv_a, tmp_path, capsys):
    """convert or export started twice into one directory (the same command on every host of a
    slice): one failed on the other's half-written array ("No such file or directory: '.zarray'")
    or emptied it with --force. The directory is locked while written: the second says so and
    touches nothing; once the first is done, the next run proceeds."""
    import fcntl
    for command, src, out in (("convert", ckpt_a, tmp_path / "conv"), ("export", conv_a, tmp_path / "hub")):
        out.mkdir()
        (out / "theirs").write_text("x")
        fd = os.open(out, os.O_RDONLY)   # (the other writer's lock)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            assert main([command, src, str(out), "--force", "--quiet"]) == 2
            err = capsys.readouterr().err
            assert f"another {command} is writing there now" in err and err.count("\n") == 1, err
            assert os.listdir(out) == ["theirs"]
        finally:
            os.close(fd)
        assert main([command, src, str(out), "--force", "--quiet"]) == 0
        assert "theirs" not in os.listdir(out)
    capsys.readouterr()


def test_score_cli_accepts_orbax_dir(conv_a, ckpt_a, tmp):
    ids = tmp / "ids.npy"
    np.save(ids, _ids(256))
    assert main(["score", conv_a, "--ids", str(ids), "--out", str(tmp / "l_ox.npy")]) == 0
    assert main(["score", ckpt_a, "--ids", str(ids), "--out", str(tmp / "l_hub.npy")]) == 0
    assert np.array_equal(np.load(tmp / "l_ox.npy"), np.load(tmp / "l_hub.npy"))


def test_restore_without_mtp_and_no_mtp_conversion(conv_a, ckpt_a, tmp):
    m = oc.restore(conv_a, with_mtp=False)  # partial Orbax restore
    assert m.mtp is None
    conv = _convert(ckpt_a, tmp / "conv_a_nomtp", mtp=False)
    assert not any(k.startswith("mtp.") for k in json.load(open(os.path.join(conv, oc.MANIFEST)))["params"])
    assert json.load(open(os.path.join(conv, "config.json")))["num_nextn_predict_layers"] == 0
    m2, m_hub = dj.load(conv), dj.load(ckpt_a)
    assert m2.mtp is None
    ids = _ids(256)
    assert np.array_equal(scoring.logits(m2, ids), scoring.logits(m_hub, ids))
    with pytest.raises(dj.DeepSeekError, match="no MTP layer"):
        oc.restore(conv, with_mtp=True)
    back = _export(conv, tmp / "back_nomtp")
    want = {k: v for k, v in _hub_tensors(ckpt_a).items() if not k.startswith("model.layers.3.")}
    got = _hub_tensors(back)
    assert sorted(got) == sorted(want) and all(got[k].tobytes() == want[k].tobytes() for k in want)


def test_restore_sharded_subprocess(conv_a, ckpt_a):
    """Restores onto a 4-device CPU mesh (experts sharded) from a callable and from a dict."""
    script = textwrap.dedent(f"""
        import jax, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P, AxisType
        from flax import nnx
        from deepseek_jax import orbax_ckpt as oc
        from deepseek_jax.checkpoint import load_hub
        mesh = jax.make_mesh((4,), ("e",), axis_types=(AxisType.Auto,))
        rep = NamedSharding(mesh, P())
        ex = NamedSharding(mesh, P(None, "e"))
        def shard(path):
            return ex if path[0] == "moe_layers" and path[2] == "experts" else rep
        ref = dict((".".join(map(str, p)), np.asarray(v.get_value()))
                   for p, v in nnx.to_flat_state(nnx.state(load_hub({ckpt_a!r}))))
        for how in ("callable", "dict"):
            arg = shard if how == "callable" else {{k: shard(tuple(k.split("."))) for k in ref}}
            m = oc.restore({conv_a!r}, shardings=arg)
            for p, v in nnx.to_flat_state(nnx.state(m)):
                k = ".".join(map(str, p)); a = v.get_value()
                assert a.sharding == shard(tuple(k.split("."))), (k, a.sharding)
                assert np.asarray(a).tobytes() == ref[k].tobytes(), k
            w = m.moe_layers.mlp.experts.up_proj.weight.get_value()
            assert len(w.addressable_shards) == 4 and w.addressable_shards[0].data.shape[1] == 4
        print("SHARDED-OK")
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="4")
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "SHARDED-OK" in r.stdout, r.stderr[-3000:]


def test_export_of_an_orbax_ocdbt_checkpoint(ckpt_a, tmp):
    """A plain StandardCheckpointer save of the model state (OCDBT) + config.json exports too."""
    import orbax.checkpoint as ocp

    model = load_hub(ckpt_a)
    d = str(tmp / "std_ocdbt")
    with ocp.StandardCheckpointer() as c:
        c.save(d, nnx.state(model))
    write_config(d, model.cfg.to_hub_dict())
    _assert_same_tensors(ckpt_a, _export(d, tmp / "back_std"))


# ---------------------------------------------------------------------------------------------
# bf16
# ---------------------------------------------------------------------------------------------


def test_bf16_conversion_equals_numpy_dequantization(conv_a_deq, conv_a, ckpt_a, tmp):
    src = _hub_tensors(ckpt_a)
    cfg = json.load(open(os.path.join(conv_a_deq, "config.json")))
    assert "quantization_config" not in cfg
    for back in (_export(conv_a_deq, tmp / "deq_back"), _export(conv_a, tmp / "deq_export", dtype="bf16")):
        assert "quantization_config" not in json.load(open(os.path.join(back, "config.json")))
        got = _hub_tensors(back)
        assert sorted(got) == sorted(n for n in src if not n.endswith("_scale_inv"))
        for n, a in got.items():
            w = src[n]
            want = _bf16_dequant(w, src[n + "_scale_inv"]) if w.dtype == ml_dtypes.float8_e4m3fn else w
            assert a.dtype == want.dtype and a.tobytes() == want.tobytes(), n
    oc.verify(conv_a_deq, against=ckpt_a, progress=False)


def test_bf16_with_row_split_chunks_and_fp8_requantized_export(ckpt_b, tmp, monkeypatch):
    """Dequantization over 128-aligned row chunks (partial edge blocks of config B) is exact;
    exporting a bf16 checkpoint as fp8 block-quantizes it (and loads)."""
    for k, v in SMALL_CHUNKS.items():
        monkeypatch.setattr(oc, k, v)
    conv = _convert(ckpt_b, tmp / "conv_b_deq_small", dtype="bf16")
    oc.verify(conv, against=ckpt_b, progress=False)
    fp8 = _export(conv, tmp / "b_requant", dtype="fp8")
    t = _hub_tensors(fp8)
    assert t["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"].dtype == ml_dtypes.float8_e4m3fn
    assert "model.layers.1.self_attn.kv_a_proj_with_mqa.weight_scale_inv" in t
    assert dj.load(fp8).cfg.fp8


def test_chunk_policy_for_the_671b_shapes():
    f8, bf, f4 = 1, 2, 4
    assert oc._chunk_shape((58, 256), (2048, 7168), f8) == (1, 1, 2048, 7168)     # one expert
    assert oc._chunk_shape((58, 256), (16, 56), f4) == (1, 256, 16, 56)          # scales per layer
    assert oc._chunk_shape((58,), (7168,), bf) == (58, 7168)                      # norms grouped
    emb = oc._chunk_shape((), (129280, 7168), bf)                                 # row blocks
    assert emb[1] == 7168 and emb[0] % 128 == 0 and emb[0] * 7168 * bf <= oc.CHUNK_MAX_BYTES


# ---------------------------------------------------------------------------------------------
# bad input: one-line error, exit 2, nothing that looks complete
# ---------------------------------------------------------------------------------------------


def _index(d):
    return json.load(open(os.path.join(d, INDEX_FILE)))


def _shard(d, name):
    return os.path.join(d, _index(d)["weight_map"][name])


def _rewrite_header(path, fn):
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    fn(header)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    open(path, "wb").write(struct.pack("<Q", len(h)) + h + raw[8 + n:])


def _patch_tensor(path, name, values):
    raw = bytearray(open(path, "rb").read())
    (n,) = struct.unpack("<Q", raw[:8])
    begin = json.loads(raw[8:8 + n])[name]["data_offsets"][0] + 8 + n
    b = np.asarray(values).tobytes()
    raw[begin:begin + len(b)] = b
    open(path, "wb").write(bytes(raw))


W = "model.layers.1.mlp.experts.3.up_proj.weight"


def _missing_shard(d):
    os.remove(_shard(d, W))


def _truncated_shard(d):
    p = _shard(d, W)
    os.truncate(p, os.path.getsize(p) // 2)


def _corrupt_header(d):
    p = _shard(d, W)
    raw = bytearray(open(p, "rb").read())
    raw[8:24] = b"#corrupt!header#"
    open(p, "wb").write(bytes(raw))


def _absent_tensor(d):
    idx = _index(d)
    files = sorted(set(idx["weight_map"].values()))
    idx["weight_map"][W] = next(f for f in files if f != idx["weight_map"][W])
    json.dump(idx, open(os.path.join(d, INDEX_FILE), "w"))


def _missing_scale(d):
    name = W + "_scale_inv"
    _rewrite_header(_shard(d, name), lambda h: h.pop(name))
    idx = _index(d)
    del idx["weight_map"][name]
    json.dump(idx, open(os.path.join(d, INDEX_FILE), "w"))


def _config(d, **kw):
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg.update(kw)
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))


def _unknown_dtype(d):
    name = "model.layers.1.mlp.gate.weight"
    _rewrite_header(_shard(d, name), lambda h: h[name].update(dtype="F4_E2M1"))


def _nonfinite_scale(d):
    name = W + "_scale_inv"
    _patch_tensor(_shard(d, name), name, np.array([np.inf], np.float32))


BAD = {
    "missing_shard": (_missing_shard, [], "not found"),
    "truncated_shard": (_truncated_shard, [], "truncated"),
    "corrupt_header": (_corrupt_header, [], "corrupt"),
    "tensor_absent": (_absent_tensor, [], "absent"),
    "missing_scale": (_missing_scale, [], "missing tensor '" + W + "_scale_inv'"),
    "shape_vs_config": (lambda d: _config(d, intermediate_size=128), [], "disagrees with config.json"),
    "unknown_tensor_dtype": (_unknown_dtype, [], "unknown dtype 'F4_E2M1'"),
    "unknown_dtype_arg": (lambda d: None, ["--dtype", "fp16"], "unknown dtype 'fp16'"),
    "config_missing": (lambda d: os.remove(os.path.join(d, "config.json")), [], "config file not found"),
    "not_deepseek": (lambda d: _config(d, model_type="llama"), [], "not DeepSeek-V3"),
    "non_finite_scale": (_nonfinite_scale, [], "non-finite"),
    "nonempty_out": (lambda d: None, ["@nonempty"], "not empty"),
    # a config with fewer layers than the weights: --no-mtp left out layer 2 as if it were MTP's
    "layers_vs_config_no_mtp": (lambda d: _config(d, num_hidden_layers=2), ["--no-mtp"],
                                "num_hidden_layers match the weights"),
    # was "internal: Hub tensor model.layers.4.* maps to no model parameter"
    "two_mtp_layers": (lambda d: _config(d, num_nextn_predict_layers=2), [], "the model has one MTP layer"),
    # was "has no model.layers.4.* (MTP) tensors; pass --no-mtp", and --no-mtp then failed otherwise
    "layers_one_too_many": (lambda d: _config(d, num_hidden_layers=4), [], "model.layers.3 is the MTP layer"),
    # a decoder layer past num_hidden_layers is not an MTP layer to leave out, even with nextn = 0
    "decoder_layer_more_no_mtp": (lambda d: _config(d, num_hidden_layers=2, num_nextn_predict_layers=0), [],
                                  "unexpected tensor 'model.layers.2."),
    # --force emptied OUT first, and --resume was ignored without a word
    "resume_and_force": (lambda d: None, ["--resume", "--force"], "pass one of them"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_line_error(case, ckpt_a, tmp_path, capsys):
    mutate, args, expect = BAD[case]
    src, out = tmp_path / "src", tmp_path / "out"
    shutil.copytree(ckpt_a, src)
    mutate(str(src))
    if "@nonempty" in args:
        args = []
        out.mkdir()
        (out / "precious.txt").write_text("x")
    rc = main(["convert", str(src), str(out), *args])
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], err
    assert not oc.is_complete(out)
    assert not (out / "_METADATA").exists() and not (out / oc.MANIFEST).exists()
    if case == "nonempty_out":
        assert sorted(os.listdir(out)) == ["precious.txt"] and (out / "precious.txt").read_text() == "x"
    else:
        assert not out.exists()  # the source is validated before anything is written


def test_float32_and_float16_sources_convert_as_bf16(ckpt_a_bf16, tmp_path, capsys):
    """dj.load reads a Hub checkpoint saved in F32 (or with F16 tensors); convert refused it with
    a hint blaming config.json. Now it stores them as BF16: widened BF16 values come back to the
    bit, an F32 value between two BF16s is rounded to nearest, and verify --against agrees."""
    from deepseek_jax.hub import HubWriter
    src = str(tmp_path / "f32")
    with HubReader(ckpt_a_bf16) as r:
        tensors = {n: np.array(r.get(n)) for n in r.names()}
        config = dict(r.config)
    name = "model.layers.0.self_attn.q_a_proj.weight"
    with HubWriter(src, max_shard_bytes=300_000, metadata={"format": "pt"}) as w:
        for n, a in tensors.items():
            if a.dtype == ml_dtypes.bfloat16:
                a = a.astype(np.float16 if n.endswith("layernorm.weight") else np.float32)
            if n == name:   # halfway up to the next bf16 after 1.0, plus a little: rounds up
                a = a.copy()
                a[0, 0] = np.float32(1.0 + 2.0 ** -8 + 2.0 ** -12)
            w.add(n, a)
    write_config(src, config)
    assert main(["convert", src, str(tmp_path / "o"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert ("note: source tensors in other float dtypes were converted to the Hub layout's (float16 -> bfloat16, "
            "float32 -> bfloat16; rounded to nearest where narrower)") in out
    assert main(["verify", str(tmp_path / "o"), "--against", src, "--quiet"]) == 0
    assert main(["export", str(tmp_path / "o"), str(tmp_path / "hub"), "--quiet"]) == 0
    back = _hub_tensors(str(tmp_path / "hub"))
    assert float(back[name][0, 0]) == 1.0 + 2.0 ** -7
    back[name][0, 0] = tensors[name][0, 0]
    for n, a in tensors.items():
        assert back[n].dtype == a.dtype and back[n].tobytes() == a.tobytes(), n


def test_output_paths_that_are_files_links_or_full(conv_a, ckpt_a, tmp_path, capsys, monkeypatch):
    """export onto a file said "not empty (pass --force)", and with --force gave an errno; --force
    through a symbolic link to a folder failed in rmtree; a full disk named no path. Now: one line
    each, the link kept (its folder emptied and filled), and nothing left of a failed export."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    for extra in ([], ["--force"]):
        assert main(["export", conv_a, str(afile), "--quiet", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "exists and is not a directory" in err[0]
    assert afile.read_text() == "x"
    for command, src in (("convert", ckpt_a), ("export", conv_a)):
        target, link = tmp_path / f"{command}_target", tmp_path / f"{command}_link"
        target.mkdir()
        (target / "old.txt").write_text("old")
        link.symlink_to(target)
        assert main([command, src, str(link), "--force", "--quiet"]) == 0, capsys.readouterr().err
        assert link.is_symlink() and not (target / "old.txt").exists() and (target / "config.json").exists()

    import deepseek_jax.hub as hub_mod

    def full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(hub_mod, "write_safetensors", full)
    out = tmp_path / "full"
    assert main(["export", conv_a, str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{out}: cannot write the Hub checkpoint (No space left on device)" in err[0]
    assert not out.exists()


def test_export_fp8_of_non_finite_weights_is_refused(ckpt_a_bf16, tmp_path, capsys):
    """An inf in a BF16 weight became an inf scale, a NaN code and a block of zeros, which the
    converter itself then refused to read back; now one line naming the tensor, and no output."""
    src, out = str(tmp_path / "src"), str(tmp_path / "hub")
    shutil.copytree(ckpt_a_bf16, src)
    name = "model.layers.0.self_attn.q_a_proj.weight"
    _patch_tensor(_shard(src, name), name, np.array([np.inf], ml_dtypes.bfloat16))
    assert main(["convert", src, str(tmp_path / "o"), "--quiet"]) == 0   # BF16 stores it as it is
    assert main(["export", str(tmp_path / "o"), out, "--dtype", "fp8", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{name}: non-finite values" in err[0] and "block [0, 0]" in err[0]
    assert not os.path.exists(out)


@pytest.mark.parametrize("command", ["convert", "export"])
def test_output_path_under_a_file_is_one_line(command, ckpt_a, tmp_path, capsys):
    """An output folder that cannot be made (a file where a parent folder should be): one line
    naming the path, exit status 2 (it was a NotADirectoryError traceback)."""
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "sub"
    src = ckpt_a
    if command == "export":   # from an Orbax checkpoint
        src = str(tmp_path / "orbax")
        assert main(["convert", ckpt_a, src]) == 0
        capsys.readouterr()
    rc = main([command, src, str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "afile" in lines[0] and lines[0].startswith(f"deepseek-jax {command}: error"), lines
    assert (tmp_path / "afile").read_text() == "x"


def test_fp8_from_bf16_source_is_an_error(ckpt_a_bf16, tmp_path, capsys):
    assert main(["convert", ckpt_a_bf16, str(tmp_path / "o"), "--dtype", "fp8"]) == 2
    assert "needs an FP8 checkpoint" in capsys.readouterr().err


def test_tools_script(ckpt_a, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("convert_tool", os.path.join(REPO, "tools", "convert.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main([ckpt_a, str(tmp_path / "o"), "--quiet"]) == 0
    assert oc.is_complete(tmp_path / "o")
    assert tool.main([ckpt_a, str(tmp_path / "o")]) == 2
    assert "not empty" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# kill and resume; --resume / --force on a finished conversion
# ---------------------------------------------------------------------------------------------


def _run_killed(src, out, die_after):
    script = textwrap.dedent(f"""
        import sys
        from deepseek_jax import orbax_ckpt as oc
        from deepseek_jax.cli import main
        for k, v in {SMALL_CHUNKS!r}.items():
            setattr(oc, k, v)
        sys.exit(main(sys.argv[1:]))
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu", **{oc.DIE_AFTER_ENV: str(die_after)})
    args = ["convert", src, out, "--quiet"] + (["--resume"] if os.path.exists(out) else [])
    return subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_kill_and_resume_is_bit_identical(src_b_tok, conv_b_small, tmp_path, monkeypatch, capsys):
    for k, v in SMALL_CHUNKS.items():
        monkeypatch.setattr(oc, k, v)
    manifest = json.load(open(os.path.join(conv_b_small, oc.MANIFEST)))
    n_chunks = sum(int(np.prod([-(-s // c) for s, c in zip(p["shape"], p["chunks"])]))
                   for p in manifest["params"].values())
    assert n_chunks > 100 and any(p["chunks"][0] > 1 for p in manifest["params"].values())
    out = str(tmp_path / "out")
    r = _run_killed(src_b_tok, out, n_chunks // 3)  # killed a third of the way
    assert r.returncode == oc.DIE_EXIT_CODE, r.stderr[-2000:]
    assert not oc.is_complete(out) and not os.path.exists(os.path.join(out, "_METADATA"))
    with pytest.raises(dj.DeepSeekError, match="incomplete conversion"):
        dj.load(out)
    assert main(["convert", src_b_tok, out]) == 2  # no --resume: refused
    assert "--resume" in capsys.readouterr().err
    r = _run_killed(src_b_tok, out, n_chunks // 3)  # killed again, while resuming
    assert r.returncode == oc.DIE_EXIT_CODE, r.stderr[-2000:]
    with open(os.path.join(out, oc.JOURNAL_FILE), "a") as f:
        f.write("torn line without newline")  # a line cut short by the kill is ignored
    assert main(["convert", src_b_tok, out, "--resume", "--quiet"]) == 0
    assert "chunks resumed" in capsys.readouterr().out
    assert _files(out) == _files(conv_b_small)  # every file, name and byte
    oc.verify(out, against=src_b_tok, progress=False)


def test_resume_refuses_another_source_of_the_same_shape(ckpt_a, tmp_path, monkeypatch, capsys):
    """Another checkpoint of the same config (a fine-tune: same file names, sizes, config.json)
    was taken for the one the conversion started from, mixing both, and a finished conversion
    was reported complete for it."""
    from deepseek_jax.synthetic import random_hub_checkpoint

    from tests.conftest import CONFIG_A
    for k, v in SMALL_CHUNKS.items():   # the chunking of _run_killed's process
        monkeypatch.setattr(oc, k, v)
    other = str(tmp_path / "other")
    random_hub_checkpoint(other, CONFIG_A, seed=5, max_shard_bytes=200_000, bias_range=(0.0, 0.5))
    with HubReader(other) as a, HubReader(ckpt_a) as b:
        assert a.source_files() == b.source_files() and a.config == b.config
    out = str(tmp_path / "out")
    r = _run_killed(ckpt_a, out, 40)
    assert r.returncode == oc.DIE_EXIT_CODE, r.stderr[-2000:]
    assert main(["convert", other, out, "--resume", "--quiet"]) == 2
    assert "other options or another source" in capsys.readouterr().err
    assert main(["convert", ckpt_a, out, "--resume", "--quiet"]) == 0
    assert main(["convert", other, out, "--resume", "--quiet"]) == 2
    assert "finished conversion with other options or another source" in capsys.readouterr().err


def test_resume_rewrites_journaled_chunks_that_are_gone(src_b_tok, conv_b_small, tmp_path, monkeypatch, capsys):
    """A journaled (synced) chunk whose file is missing or cut short is written again, and the
    journal is cut back to its last sync point, so lines of a killed run are never trusted later."""
    for k, v in SMALL_CHUNKS.items():
        monkeypatch.setattr(oc, k, v)
    out = str(tmp_path / "out")
    r = _run_killed(src_b_tok, out, 60)
    assert r.returncode == oc.DIE_EXIT_CODE, r.stderr[-2000:]
    journal = os.path.join(out, oc.JOURNAL_FILE)
    trusted = oc._load_journal(journal)
    assert len(trusted) > 4
    keys = sorted(trusted)
    arrays = {p["array"]: p for p in json.load(open(os.path.join(conv_b_small, oc.MANIFEST)))["params"].values()}
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs
                   if os.path.basename(d) in arrays and f != ".zarray")
    open(files[0], "wb").close()          # truncated to 0 bytes
    os.remove(files[-1])                  # gone
    with open(journal, "a") as f:         # lines after the last sync point, then a later run's sync
        f.write(f"{keys[0][0]}\t99999\t{'0' * 64}\n")
    assert main(["convert", src_b_tok, out, "--resume", "--quiet"]) == 0
    assert _files(out) == _files(conv_b_small)
    oc.verify(out, against=src_b_tok, progress=False)


def test_mtp_layer_beyond_the_config_is_left_out_as_dj_load_does(ckpt_a, tmp_path, capsys):
    """num_nextn_predict_layers = 0 with the MTP layer still in the files: dj.load takes it (without
    MTP) and convert refused it, even with --no-mtp, blaming num_hidden_layers."""
    src = tmp_path / "src"
    shutil.copytree(ckpt_a, src)
    _config(str(src), num_nextn_predict_layers=0)
    assert main(["convert", str(src), str(tmp_path / "out"), "--quiet"]) == 0, capsys.readouterr().err
    ids = _ids(8)
    np.testing.assert_array_equal(scoring.logits(dj.load(str(tmp_path / "out")), ids),
                                  scoring.logits(dj.load(str(src)), ids))
    assert not dj.load(str(tmp_path / "out")).mtp


def test_a_second_mtp_layer_is_not_loaded_and_the_first_drafts(ckpt_a, tmp_path):
    """num_nextn_predict_layers 2 (the README: the first MTP layer, model.layers.<n>, drafts; the
    second is not loaded): the MTP logits are those of the same files without the second layer."""
    from deepseek_jax.synthetic import random_hub_checkpoint
    from tests.conftest import CONFIG_A
    two = random_hub_checkpoint(tmp_path / "two", dict(CONFIG_A, num_nextn_predict_layers=2), seed=1,
                                max_shard_bytes=200_000, bias_range=(0.0, 0.5))
    n = CONFIG_A["num_hidden_layers"]
    assert f"model.layers.{n + 1}.eh_proj.weight" in HubReader(two).names()
    ids = _ids(8)
    np.testing.assert_array_equal(scoring.mtp_logits(dj.load(two), ids), scoring.mtp_logits(dj.load(ckpt_a), ids))


def test_resume_of_a_finished_conversion_checks_the_source_config(ckpt_a, conv_a, tmp_path, capsys):
    """--resume on a finished conversion compared the source's files and a sample of their bytes,
    not its config.json: an edited routed_scaling_factor was "already complete", the old one kept."""
    src, out = tmp_path / "src", str(tmp_path / "o")
    shutil.copytree(ckpt_a, src)
    shutil.copytree(conv_a, out)
    assert main(["convert", str(src), out, "--resume", "--quiet"]) == 0   # the same source: complete
    _config(str(src), routed_scaling_factor=1.0)
    capsys.readouterr()
    assert main(["convert", str(src), out, "--resume", "--quiet"]) == 2
    assert "other options or another source" in capsys.readouterr().err


def test_unreadable_file_beside_the_weights_fails_before_any_array(ckpt_a, tmp_path):
    """The tokenizer and other files beside the weights are copied last: one that could not be read
    failed the conversion after every array was written (hours for 671B), with a bare errno."""
    src, out = tmp_path / "src", tmp_path / "out"
    shutil.copytree(ckpt_a, src)
    (src / "tokenizer.json").write_text("{}")
    os.chmod(src / "tokenizer.json", 0)
    prefix = []
    if os.geteuid() == 0:   # root reads anything: drop the capabilities that let it
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv")
        caps = "-dac_override,-dac_read_search,-fowner"
        prefix = ["setpriv", "--bounding-set", caps, "--inh-caps", caps]
    r = subprocess.run([*prefix, sys.executable, "-m", "deepseek_jax.cli", "convert", str(src), str(out), "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "tokenizer.json: cannot be read (Permission denied)" in r.stderr
    assert not out.exists()


def test_resume_and_force_on_finished_conversion(ckpt_a, conv_a, tmp_path, capsys):
    out = str(tmp_path / "o")
    shutil.copytree(conv_a, out)
    assert main(["convert", ckpt_a, out, "--resume"]) == 0
    assert "already complete" in capsys.readouterr().out
    with open(os.path.join(out, "junk"), "w") as f:
        f.write("x")
    assert main(["convert", ckpt_a, out, "--force", "--quiet"]) == 0
    assert _files(out) == _files(conv_a)


# ---------------------------------------------------------------------------------------------
# verify
# ---------------------------------------------------------------------------------------------


def test_verify_passes_on_good_checkpoints(conv_a, ckpt_a, conv_b, ckpt_b, capsys):
    assert main(["verify", conv_a, "--against", ckpt_a, "--quiet"]) == 0
    assert "383 tensors equal" in capsys.readouterr().out
    assert main(["verify", conv_b, "--quiet"]) == 0


def _tamper_chunk(d):
    arr = os.path.join(d, "moe_layers.mlp.experts.up_proj.weight.value")
    chunk = next(os.path.join(arr, f) for f in sorted(os.listdir(arr)) if f != ".zarray")
    raw = bytearray(open(chunk, "rb").read())
    raw[len(raw) // 2] ^= 0x01
    open(chunk, "wb").write(bytes(raw))


def _tamper_manifest(d):
    p = os.path.join(d, oc.MANIFEST)
    m = json.load(open(p))
    m["params"]["lm_head.weight"]["sha256"] = "0" * 64
    json.dump(m, open(p, "w"))


def _drop_array(d):
    shutil.rmtree(os.path.join(d, "lm_head.weight.value"))


@pytest.mark.parametrize("tamper,expect", [
    (_tamper_chunk, "checksum mismatch in parameter moe_layers.mlp.experts.up_proj.weight"),
    (_tamper_manifest, "does not match the CONVERT_COMPLETE marker"),
    (_drop_array, "lm_head.weight"),
    (lambda d: os.remove(os.path.join(d, oc.MARKER)), "incomplete conversion"),
    # an edit of the config changes every logit and no array: it was not noticed
    (lambda d: _config(d, routed_scaling_factor=1.0), "config.json was changed after the conversion"),
    (lambda d: os.remove(os.path.join(d, "config.json")), "config.json"),
    # TensorStore reads a missing chunk as fill: it was a "checksum mismatch", no file named
    (lambda d: os.remove(os.path.join(d, "lm_head.weight.value", "0.0")), "chunk file lm_head.weight.value/0.0"),
])
def test_verify_fails_on_tampered_checkpoint(tamper, expect, conv_a, tmp_path, capsys):
    d = str(tmp_path / "t")
    shutil.copytree(conv_a, d)
    tamper(d)
    assert main(["verify", d, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expect in err[0]


def test_verify_against_another_source_fails(conv_a, ckpt_b, capsys):
    assert main(["verify", conv_a, "--against", ckpt_b, "--quiet"]) == 2
    assert "config.json has vocab_size = 256, " in capsys.readouterr().err


def test_verify_against_a_source_whose_config_differs(conv_a, ckpt_a, tmp_path, capsys):
    """Same tensors, another model: a source whose config.json differs in a field the weights do
    not show (it passed, tensor by tensor)."""
    src = str(tmp_path / "src")
    shutil.copytree(ckpt_a, src)
    _config(src, rms_norm_eps=0.1)
    assert main(["verify", conv_a, "--against", src, "--quiet"]) == 2
    assert "config.json has rms_norm_eps = 1e-06, " in capsys.readouterr().err


def test_verify_against_a_source_with_a_tensor_more(conv_a, ckpt_a, tmp_path, capsys):
    """Only the tensors the checkpoint has were compared: a source holding one more (which convert
    refuses) verified "OK"."""
    from deepseek_jax.hub import write_safetensors

    src = tmp_path / "src"
    shutil.copytree(ckpt_a, src)
    name = "model.layers.1.mlp.experts.3.up_proj.bias"
    write_safetensors(src / "extra.safetensors", {name: np.zeros(4, np.float32)})
    idx = _index(str(src))
    idx["weight_map"][name] = "extra.safetensors"
    json.dump(idx, open(src / INDEX_FILE, "w"))
    assert main(["verify", conv_a, "--against", str(src), "--quiet"]) == 2
    assert f"holds tensor {name}, which the checkpoint has no counterpart for" in capsys.readouterr().err


def test_verify_against_a_copy_sharded_otherwise(conv_a, ckpt_a, tmp_path, capsys):
    """The same tensors in other shard files verify: every tensor is compared, not the file list."""
    from deepseek_jax.synthetic import random_hub_checkpoint, tiny_config
    other = random_hub_checkpoint(tmp_path / "resharded", tiny_config(), seed=1, max_shard_bytes=150_000)
    assert sorted(os.listdir(other)) != sorted(os.listdir(ckpt_a))
    assert main(["verify", conv_a, "--against", other, "--quiet"]) == 0
    assert "383 tensors equal" in capsys.readouterr().out
    # and one changed tensor among them fails
    r = HubReader(other)
    name = "model.layers.1.self_attn.o_proj.weight"
    f = os.path.join(other, r.info(name).file)
    r.close()
    raw = bytearray(open(f, "rb").read())
    hdr = struct.unpack("<Q", raw[:8])[0]
    start = json.loads(raw[8:8 + hdr])[name]["data_offsets"][0]
    raw[8 + hdr + start] ^= 0x01
    open(f, "wb").write(bytes(raw))
    assert main(["verify", conv_a, "--against", other, "--quiet"]) == 2
    assert "differs from" in capsys.readouterr().err


def _truncate_chunk(d):
    arr = os.path.join(d, "embed_tokens.weight.value")
    chunk = next(os.path.join(arr, f) for f in sorted(os.listdir(arr)) if f != ".zarray")
    os.truncate(chunk, 1000)


def _garble_zarray(d):
    open(os.path.join(d, "embed_tokens.weight.value", ".zarray"), "w").write("{bad")


@pytest.mark.parametrize("damage,expect", [
    (_truncate_chunk, "chunk file embed_tokens.weight.value/0"),
    (_garble_zarray, "embed_tokens.weight.value/.zarray: cannot read the zarr metadata"),
    (_drop_array, "lm_head.weight.value/.zarray: the zarr metadata of lm_head.weight.value not found"),
])
@pytest.mark.parametrize("command", ["score", "export"])
def test_damaged_checkpoint_is_one_line_and_exports_nothing(damage, expect, command, conv_a, tmp_path, capsys):
    """A damaged array fails loading and export with one line naming its file (Orbax's own errors
    were TensorStore specs, after a logged traceback per cancelled read), and export leaves no
    output directory behind."""
    d = str(tmp_path / "t")
    shutil.copytree(conv_a, d)
    damage(d)
    out, ids = tmp_path / "out", tmp_path / "ids.npy"
    np.save(ids, _ids(8))
    argv = ["score", d, "--ids", str(ids), "--json"] if command == "score" else ["export", d, str(out), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expect in err[0], err
    assert not out.exists()


def test_tools_convert_is_the_cli(ckpt_a, tmp, capsys):
    """``tools/convert.py`` handled only the package's own errors: an OUT under a file was a
    ``NotADirectoryError`` traceback there and one line from ``deepseek-jax convert``."""
    spec = importlib.util.spec_from_file_location("tools_convert", os.path.join(os.path.dirname(__file__), "..",
                                                                                "tools", "convert.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    blocker = tmp / "a_file"
    blocker.write_text("")
    out = str(blocker / "out")
    assert main(["convert", ckpt_a, out, "--quiet"]) == 2
    want = capsys.readouterr().err
    assert tool.main([ckpt_a, out, "--quiet"]) == 2
    assert capsys.readouterr().err == want and want.count("\n") == 1 and "Not a directory" in want


def test_export_keeps_the_users_directory_and_copies_only_the_conversions_files(conv_a, tmp_path):
    """A failed export removed an output directory the user had made (a mount point, say), not only
    what it wrote; and when the source had no files beside its weights, export copied whatever
    lay in the checkpoint's directory (an empty list in the manifest read as "none recorded")."""
    ck = tmp_path / "ck"
    shutil.copytree(conv_a, ck)
    (ck / "notes.txt").write_text("mine")
    out = tmp_path / "out"
    assert main(["export", str(ck), str(out), "--quiet"]) == 0
    assert "notes.txt" not in os.listdir(out)
    mine = tmp_path / "mine"
    mine.mkdir()
    # a file size limit makes the first shard's write fail (Python ignores SIGXFSZ: EFBIG)
    r = subprocess.run(["bash", "-c", f"ulimit -f 64; exec {sys.executable} -m deepseek_jax.cli export {ck} {mine} --quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "nothing was kept" in r.stderr, r.stderr
    assert mine.is_dir() and os.listdir(mine) == []
