"""``deepseek-jax score``: outputs agree with the library, bad input gives one-line errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat

import numpy as np
import pytest

from deepseek_jax import cli, scoring
from deepseek_jax.api import load
from deepseek_jax.hub import HubReader, HubWriter, write_config


def run_cli(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def ids_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("ids") / "ids.npy"
    np.save(p, np.random.default_rng(0).integers(0, 256, (2, 9)).astype(np.int32))
    return str(p)


def test_score_outputs(ckpt_a, ids_file, tmp_path, capsys):
    out, lp = tmp_path / "logits.npy", tmp_path / "lp.npy"
    rc, stdout, _ = run_cli(capsys, "score", ckpt_a, "--ids", ids_file, "--out", str(out),
                            "--logprobs", str(lp), "--json", "--mesh", "data=1")
    assert rc == 0
    ids = np.load(ids_file)
    ref = scoring.logits(load(ckpt_a), ids)
    np.testing.assert_array_equal(np.load(out), ref)
    np.testing.assert_allclose(np.load(lp), scoring.token_logprobs(ref, ids), rtol=1e-6)
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert len(rows) == 2 and rows[0]["tokens_scored"] == 8 and rows[0]["perplexity"] > 1
    # new files get the umask's mode, not tempfile's private 0o600; a replaced file keeps its own
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(lp).st_mode) == 0o666 & ~umask
    os.chmod(out, 0o640)

    rc, _, _ = run_cli(capsys, "score", ckpt_a, "--ids", ids_file, "--out", str(out), "--mode", "decode",
                       "--prefill", "4")
    assert rc == 0 and stat.S_IMODE(os.stat(out).st_mode) == 0o640
    dec = np.load(out)
    assert np.linalg.norm(dec - ref) / np.linalg.norm(ref) < 1e-4

    rc, _, _ = run_cli(capsys, "score", ckpt_a, "--ids", ids_file, "--out", str(out), "--mtp")
    assert rc == 0 and np.load(out).shape == (2, 8, 256)


def test_score_flash_prefill_attention(ckpt_a, ids_file, tmp_path, capsys, monkeypatch):
    """``--prefill-attention flash`` reaches the model: with the GPU kernels interpreted
    (``$DEEPSEEK_JAX_KERNELS=interpret_gpu``) the flash kernel runs and the logits equal the plain
    form's; without the flag it does not run."""
    import kernels_pallas
    calls, real = [], kernels_pallas.causal_attention

    def recorded(q, *args, **kw):   # the real kernel; records its query's shape
        calls.append(q.shape)
        return real(q, *args, **kw)
    monkeypatch.setattr(kernels_pallas, "causal_attention", recorded)
    monkeypatch.setenv("DEEPSEEK_JAX_KERNELS", "interpret_gpu")
    ids = np.load(ids_file)
    out = tmp_path / "logits.npy"
    rc, _, err = run_cli(capsys, "score", ckpt_a, "--ids", ids_file, "--out", str(out), "--prefill-attention", "flash")
    assert rc == 0, err
    assert calls and all(s[:2] == ids.shape for s in calls), calls
    monkeypatch.delenv("DEEPSEEK_JAX_KERNELS")
    ref = scoring.logits(load(ckpt_a), ids)
    assert np.linalg.norm(np.load(out) - ref) / np.linalg.norm(ref) < 1e-4
    calls.clear()
    rc, _, err = run_cli(capsys, "score", ckpt_a, "--ids", ids_file, "--out", str(out))
    assert rc == 0 and not calls, err


def test_score_internals(ckpt_a, ids_file, tmp_path, capsys):
    """--internals writes dj.internals' arrays at exactly the path given; the logits of the same pass."""
    import deepseek_jax as dj
    path, out = tmp_path / "routing.data", tmp_path / "logits.npy"     # not .npz: no suffix is added
    rc, _, _ = run_cli(capsys, "score", ckpt_a, "--ids", ids_file, "--internals", str(path), "--out", str(out))
    assert rc == 0 and sorted(os.listdir(tmp_path)) == ["logits.npy", "routing.data"]
    got = np.load(path)
    ids = np.load(ids_file)
    model = load(ckpt_a)
    ref = dj.internals(model, ids)
    assert sorted(got.files) == sorted(set(ref._fields) - {"logits", "attention"})
    assert got["moe_layers"].dtype == np.int32 and got["experts"].dtype == np.int32
    for k in got.files:  # the CLI's program may fuse differently: float32 rounding apart
        want = np.asarray(getattr(ref, k), np.int32 if k == "moe_layers" else None)
        assert got[k].dtype == want.dtype and got[k].shape == want.shape, k
        if want.dtype.kind == "f":
            np.testing.assert_allclose(got[k], want, rtol=1e-5, atol=1e-5, err_msg=k)
        else:
            np.testing.assert_array_equal(got[k], want, err_msg=k)
    np.testing.assert_allclose(np.load(out), scoring.logits(model, ids), atol=1e-5)
    from deepseek_jax.introspect import expert_histogram, load_internals, logit_lens
    back = load_internals(path)
    assert back.logits is None and back.attention is None and back.moe_layers == ref.moe_layers
    np.testing.assert_array_equal(expert_histogram(back), expert_histogram(ref))
    np.testing.assert_allclose(logit_lens(model, back), logit_lens(model, ref), rtol=1e-5, atol=1e-4)
    # files that are not score --internals output: one line each (tracebacks before)
    raw = open(path, "rb").read()
    (tmp_path / "trunc.npz").write_bytes(raw[:300])
    np.save(tmp_path / "one.npy", np.zeros(3))
    arrays = dict(np.load(path))
    np.savez(tmp_path / "moe2d.npz", **dict(arrays, moe_layers=np.zeros((2, 2), np.int32)))
    for bad, needle in ((tmp_path / "trunc.npz", "not a readable .npz"), (tmp_path / "one.npy", "not an .npz archive"),
                        (5, "expected the path"), (tmp_path / "moe2d.npz", "moe_layers is int32 [2, 2]")):
        with pytest.raises(dj.DeepSeekError, match=re.escape(needle)):
            load_internals(bad)
    rc, _, _ = run_cli(capsys, "score", ckpt_a, "--ids", ids_file, "--internals", str(path), "--attention")
    assert rc == 0
    np.testing.assert_allclose(np.load(path)["attention"], dj.internals(model, ids, attention=True).attention,
                               atol=1e-5)
    rc, _, err = run_cli(capsys, "score", ckpt_a, "--ids", ids_file, "--out", str(out), "--attention")
    assert rc == 2 and "--internals" in err and len(err.strip().splitlines()) == 1
    rc, _, err = run_cli(capsys, "score", ckpt_a, "--ids", ids_file, "--internals", str(path), "--mtp")
    assert rc == 2 and "--internals" in err and len(err.strip().splitlines()) == 1
    rc, _, err = run_cli(capsys, "score", ckpt_a, "--ids", ids_file, "--internals", str(out), "--out", str(out))
    assert rc == 2 and "same file" in err


def test_score_writes_all_or_nothing(ckpt_a, ids_file, tmp_path, capsys, monkeypatch):
    """A failing write (here: the disk fills during the .npz) leaves every output as it was, with no
    partial file; an output that names the --ids input, even through a link, is refused up front."""
    out, ins = tmp_path / "logits.npy", tmp_path / "ins.npz"
    out.write_bytes(b"old logits")
    ins.write_bytes(b"old internals")

    def full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(np, "savez", full)
    rc, _, err = run_cli(capsys, "score", ckpt_a, "--ids", ids_file, "--out", str(out), "--internals", str(ins))
    assert rc == 2 and "--internals: cannot write" in err and "No space left" in err
    assert out.read_bytes() == b"old logits" and ins.read_bytes() == b"old internals"
    assert sorted(os.listdir(tmp_path)) == ["ins.npz", "logits.npy"]
    monkeypatch.undo()

    link = tmp_path / "ids_link.npy"
    link.symlink_to(ids_file)
    for argv in (["--out", ids_file], ["--internals", str(link)], ["--logprobs", str(link)]):
        rc, _, err = run_cli(capsys, "score", ckpt_a, "--ids", ids_file, *argv)
        assert rc == 2 and "is the --ids input" in err, err
    rc, _, err = run_cli(capsys, "score", ckpt_a, "--ids", ids_file, "--out", str(out), "--internals",
                         str(tmp_path / "." / "logits.npy"))
    assert rc == 2 and "same file" in err
    assert np.load(ids_file).dtype == np.int32          # the input is intact


def _copy_without(src: str, dst: str, drop: str) -> str:
    """A copy of a Hub checkpoint with one tensor left out (index and shards rewritten)."""
    with HubReader(src) as r:
        write_config(dst, r.config)
        with HubWriter(dst, max_shard_bytes=1 << 20) as w:
            for name in r.names():
                if name != drop:
                    w.add(name, np.asarray(r.get(name)))
    return dst


@pytest.mark.parametrize("case,needle", [
    ("not_deepseek", "model_type"),
    ("missing_tensor", "model.layers.1.self_attn.o_proj.weight"),
    ("missing_scale", "model.layers.2.mlp.experts.3.up_proj.weight_scale_inv"),
    ("vocab", "outside the vocab"),
    ("float_ids", "integer"),
    ("no_ids_file", "not found"),
    ("decode_prefill", "--prefill"),
    ("npz_ids", "is an .npz archive; expected a .npy array"),   # (an --internals file): a traceback before
    ("ids_dir", "is a directory"),
])
def test_score_bad_input(case, needle, ckpt_a, ids_file, tmp_path, capsys):
    ckpt, ids = ckpt_a, ids_file
    if case == "not_deepseek":
        ckpt = str(tmp_path / "ck")
        shutil.copytree(ckpt_a, ckpt)
        cfg = json.load(open(os.path.join(ckpt, "config.json")))
        cfg["model_type"] = "llama"
        json.dump(cfg, open(os.path.join(ckpt, "config.json"), "w"))
    elif case == "missing_tensor":
        ckpt = _copy_without(ckpt_a, str(tmp_path / "ck"), "model.layers.1.self_attn.o_proj.weight")
    elif case == "missing_scale":
        ckpt = _copy_without(ckpt_a, str(tmp_path / "ck"), "model.layers.2.mlp.experts.3.up_proj.weight_scale_inv")
    elif case == "vocab":
        ids = str(tmp_path / "ids.npy")
        np.save(ids, np.array([[1, 2, 999]], np.int32))
    elif case == "float_ids":
        ids = str(tmp_path / "ids.npy")
        np.save(ids, np.array([[1.0, 2.0]], np.float32))
    elif case == "no_ids_file":
        ids = str(tmp_path / "nope.npy")
    elif case == "npz_ids":
        ids = str(tmp_path / "ids.npz")
        np.savez(ids, ids=np.array([[1, 2]], np.int32))
    elif case == "ids_dir":
        ids = str(tmp_path / "adir")
        os.mkdir(ids)
    extra = ["--mode", "decode", "--prefill", "99"] if case == "decode_prefill" else []
    rc, out, err = run_cli(capsys, "score", ckpt, "--ids", ids, "--out", str(tmp_path / "o.npy"), *extra)
    assert rc == 2
    assert needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "o.npy").exists()


def test_score_ep_capacity_reaches_the_exchange(ckpt_a, tmp_path, capsys, monkeypatch):
    """``--ep-capacity`` reaches the expert-parallel all-to-all: on ``expert=8`` at 0.25 the
    exchange runs in rounds (the rounds' function is traced), and the logits equal one device's;
    ``--ep-capacity worst`` runs one worst-case round. A bad value is a one-line error."""
    from deepseek_jax import expert_parallel
    monkeypatch.setattr(expert_parallel, "ROUNDS_MIN_ROWS", 0)   # a tiny model's exchange is small
    calls, real = [], expert_parallel._exchange_rounds

    def recorded(static, *args):
        calls.append(static[4])   # the rows per pair of a round
        return real(static, *args)

    monkeypatch.setattr(expert_parallel, "_exchange_rounds", recorded)
    ids_path = tmp_path / "ids.npy"
    ids = np.random.default_rng(1).integers(0, 256, (4, 16)).astype(np.int32)
    np.save(ids_path, ids)
    ref = scoring.logits(load(ckpt_a), ids)
    for cap, traced in (("0.25", True), ("worst", False)):
        calls.clear()
        out = tmp_path / f"logits_{cap}.npy"
        rc, _, err = run_cli(capsys, "score", ckpt_a, "--ids", str(ids_path), "--out", str(out),
                             "--mesh", "expert=8", "--ep-capacity", cap)
        assert rc == 0, err
        assert bool(calls) == traced
        got = np.load(out)
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-5
    with pytest.raises(SystemExit):
        cli.main(["score", ckpt_a, "--ids", str(ids_path), "--ep-capacity", "0"])
    assert "--ep-capacity: expected a number > 0 or 'worst', got '0'" in capsys.readouterr().err


def test_score_json_writes_null_for_nan():
    """A model whose weights hold inf scores NaN: ``score --json`` printed bare ``NaN``, which is
    not JSON (strict parsers refuse it); ``score`` and ``generate`` write their JSON lines through
    one writer that writes null."""
    import json as _json

    from deepseek_jax.commands import generate, json_line, score
    line = json_line({"row": 0, "mean_logprob": float("nan"), "x": [1.5, np.float32("-inf")], "n": 3,
                      "y": np.float32(0.5)})
    assert _json.loads(line) == {"row": 0, "mean_logprob": None, "x": [1.5, None], "n": 3, "y": 0.5}
    assert "NaN" not in line and "Infinity" not in line
    for mod in (score, generate):   # (their JSON output goes through it)
        assert "json.dumps(" not in open(mod.__file__, encoding="utf-8").read()
