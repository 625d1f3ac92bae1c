"""``scoring.sequence_logprobs`` (sequences of any lengths, batched by length and right-padded)
and ``deepseek-jax score --text-file``, against each sequence scored alone through ``dj.logits``."""

from __future__ import annotations

import json

import numpy as np
import pytest

import deepseek_jax as dj
from deepseek_jax import cli
from deepseek_jax.checkpoint import load_hub
from deepseek_jax.scoring import _bucket, sequence_logprobs
from deepseek_jax.tokenizer import Tokenizer


def alone(model, seq):
    """The reference: one sequence, unpadded, through the parity interface."""
    ids = np.array([seq], np.int32)
    return dj.token_logprobs(dj.logits(model, ids), ids)[0]


@pytest.fixture(scope="module")
def model_a(ckpt_a):
    return load_hub(ckpt_a)


def test_ragged_batches_equal_each_sequence_alone(model_a):
    cfg = model_a.cfg
    rng = np.random.default_rng(3)
    lengths = [7, 1, 40, 2, cfg.max_position_embeddings, 17, 33, 16]
    seqs = [rng.integers(0, cfg.vocab_size, n).tolist() for n in lengths]
    seqs[2] = np.asarray(seqs[2], np.int64)              # any integer array type
    for batch_size in (3, 8):
        got = sequence_logprobs(model_a, seqs, batch_size=batch_size)
        assert [g.shape for g in got] == [(n - 1,) for n in lengths] and got[0].dtype == np.float32
        for seq, g in zip(seqs, got):
            if len(seq) > 1:
                np.testing.assert_allclose(g, alone(model_a, list(seq)), rtol=0, atol=5e-5)


def test_buckets():
    assert [_bucket(n, 128) for n in (1, 16, 17, 64, 65, 128)] == [16, 16, 32, 64, 128, 128]
    # over the largest power of two under the limit: multiples of 16, capped at the limit
    assert [_bucket(n, 100) for n in (65, 81, 99, 100)] == [80, 96, 100, 100]


@pytest.mark.parametrize("seqs, kw, needle", [
    ([], {}, "seqs is empty"),
    ("1 2 3", {}, "must be a list"),
    ([[1, 2], [[1, 2]]], {}, "sequence 1: expected a 1-D"),
    ([[1, 2], [1, 256]], {}, "sequence 1: token id 256"),
    ([[1, 2], []], {}, "sequence 1:"),
    ([[1.5, 2]], {}, "sequence 0: expected integer"),
    ([[1, 2]], {"batch_size": 0}, "batch_size must be"),
    (None, {}, "sequence 0: length {n} exceeds max_position_embeddings"),
])
def test_bad_input(model_a, seqs, kw, needle):
    if seqs is None:   # one token over the model's length
        n = model_a.cfg.max_position_embeddings + 1
        seqs, needle = [[i % 256 for i in range(n)]], needle.format(n=n)
    with pytest.raises(dj.DeepSeekError, match=needle):
        sequence_logprobs(model_a, seqs, **kw)


def test_score_text_file(tmp_path, capsys):
    demo = dj.demo_checkpoint()
    lines = ["The sea is calm.", "", "846+483", "   ", "x", "Hello! Who are you?"]
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    rc = cli.main(["score", demo, "--text-file", str(path), "--json", "--batch-size", "2"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    rows = [json.loads(x) for x in out]
    model, tok = dj.load(demo), Tokenizer.from_dir(demo)
    want_lines = [i + 1 for i, t in enumerate(lines) if t.strip()]      # blank lines skipped, numbers kept
    assert [r["line"] for r in rows[:-1]] == want_lines == [1, 3, 5, 6]
    total, n = 0.0, 0
    for r in rows[:-1]:
        ref = alone(model, tok.encode(lines[r["line"] - 1]))
        assert r["tokens_scored"] == len(ref)
        assert r["mean_logprob"] == pytest.approx(float(ref.mean()), abs=1e-5)
        assert r["logprob"] == pytest.approx(float(ref.sum()), abs=1e-4)   # (the help promised it)
        assert r["perplexity"] == pytest.approx(float(np.exp(-ref.mean())), rel=1e-4)
        total, n = total + float(ref.sum()), n + len(ref)
    t = rows[-1]["total"]
    assert t["lines"] == 4 and t["tokens_scored"] == n
    assert t["mean_logprob"] == pytest.approx(total / n, abs=1e-5)
    assert t["logprob"] == pytest.approx(total, abs=1e-3)
    assert t["perplexity"] == pytest.approx(np.exp(-total / n), rel=1e-4)
    # the human form: one line per text line and a total
    assert cli.main(["score", demo, "--text-file", str(path)]) == 0
    text = capsys.readouterr().out.splitlines()
    assert len(text) == 5 and text[0].startswith("line 1: ") and text[-1].startswith("total: 4 lines")


@pytest.mark.parametrize("extra, content, needle", [
    (["--out", "{tmp}/x.npy"], "a\n", "--out does not apply to --text-file"),
    (["--mtp"], "a\n", "--mtp does not apply"),
    (["--batch-size", "0"], "a\n", "--batch-size must be >= 1"),
    ([], "\n  \n", "holds no text"),
    ([], "1+1=" * 100 + "\n", "line 1 is 401 tokens, over the model's max_position_embeddings 128"),
    (["--ids", "{tmp}/ids.npy"], "a\n", "not allowed with argument"),
    # (it named a byte offset into the whole file)
    ([], b"\xef\xbb\xbfok\n\nfine\nab\xffcd\n", "line 4 is not UTF-8 text: byte 0xff at byte 3 of the line"),
])
def test_score_text_file_bad_input(tmp_path, capsys, extra, content, needle):
    path = tmp_path / "lines.txt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    argv = ["score", dj.demo_checkpoint(), "--text-file", str(path)] + [a.format(tmp=tmp_path) for a in extra]
    try:
        rc = cli.main(argv)
    except SystemExit as e:      # argparse's own usage errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and needle in err, err
    assert not (tmp_path / "x.npy").exists()


def test_score_text_file_lines_end_at_newlines_only(tmp_path, capsys):
    """Form feeds and U+2028 stay inside their line, CRLF ends one, a BOM is not text."""
    demo = dj.demo_checkpoint()
    path = tmp_path / "lines.txt"
    path.write_bytes("\ufeffone\x0cstill one\r\ntwo\u2028still two\n\nthree".encode("utf-8"))
    assert cli.main(["score", demo, "--text-file", str(path), "--json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    tok = Tokenizer.from_dir(demo)
    assert [r["line"] for r in rows[:-1]] == [1, 2, 4]
    texts = ["one\x0cstill one", "two\u2028still two", "three"]
    assert [r["tokens_scored"] for r in rows[:-1]] == [len(tok.encode(t)) - 1 for t in texts]
    ids = tmp_path / "ids.npy"
    np.save(ids, np.zeros((1, 4), np.int32))
    assert cli.main(["score", demo, "--ids", str(ids), "--json", "--batch-size", "4"]) == 2
    assert "--batch-size applies to --text-file" in capsys.readouterr().err


def test_score_text_file_missing(capsys):
    assert cli.main(["score", dj.demo_checkpoint(), "--text-file", "/nonexistent/lines.txt"]) == 2
    assert "--text-file: cannot read /nonexistent/lines.txt" in capsys.readouterr().err


def test_on_a_mesh_equal_one_device(ckpt_a, model_a):
    """Sharded on data=2, expert=2, model=2 (8 CPU devices): sequence_logprobs and dj.internals
    as on one device; batches that do not divide the data axis (3 rows) included."""
    import jax

    from deepseek_jax.sharding import make_mesh
    if len(jax.devices()) < 8:
        pytest.skip("needs JAX_NUM_CPU_DEVICES=8")
    mesh = make_mesh({"data": 2, "expert": 2, "model": 2})
    sharded = dj.load(ckpt_a, mesh=mesh)
    rng = np.random.default_rng(5)
    seqs = [rng.integers(0, 256, n).tolist() for n in (9, 30, 3)]
    ids = rng.integers(0, 256, (3, 12))
    with jax.set_mesh(mesh):
        got = sequence_logprobs(sharded, seqs, batch_size=3)
        ins = dj.internals(sharded, ids, attention=True)
    for g, r in zip(got, sequence_logprobs(model_a, seqs, batch_size=3)):
        np.testing.assert_allclose(g, r, rtol=0, atol=2e-5)
    ref = dj.internals(model_a, ids, attention=True)
    np.testing.assert_array_equal(ins.experts, ref.experts)
    for k in ("hidden", "expert_weights", "attention", "logits"):
        np.testing.assert_allclose(getattr(ins, k), getattr(ref, k), rtol=1e-4, atol=1e-4, err_msg=k)
