"""Generation: the compiled engine against the model's own prefill logits, sampling, eos, the
generate/chat/demo commands and their input errors.

Few compilations on purpose: the prompts and lengths are chosen so that every engine call on
``ckpt_a`` falls into the buckets (batch 4 or 1, prompt 16, cache 32), and the executables are
shared across generators (the CLI calls reuse the ones the engine tests compiled).
"""

from __future__ import annotations

import json
import os
import shutil
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deepseek_jax as dj
from deepseek_jax import cli
from deepseek_jax.commands.demo import demo_checkpoint
from deepseek_jax.commands.generate import timing_line
from deepseek_jax.errors import DeepSeekError
from deepseek_jax.generate import Generator, length_bucket
from deepseek_jax.sampling import SamplingParams, filter_logits
from deepseek_jax.tokenizer import Tokenizer

PROMPTS = [[0, 5, 17, 42], [0, 9, 3, 200, 77, 31, 8, 120, 64], [0, 250, 11]]
N = 20
TIE = 1e-4


@pytest.fixture(scope="module")
def model(ckpt_a):
    return dj.load(ckpt_a, dtype="float32")


@pytest.fixture(scope="module")
def gen(model):
    return Generator(model)


@pytest.fixture(scope="module")
def greedy(gen):
    res = gen.generate(PROMPTS, max_new_tokens=N, stop_at_eos=False)
    assert gen.last_stats.buckets == (4, 16, 32)
    return res


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, command="generate", contains=""):
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"deepseek-jax {command}: error: ")
    assert contains in lines[0], lines[0]


# ---- engine ----------------------------------------------------------------------------------
def test_greedy_is_argmax_of_prefill_logits(model, greedy):
    """Teacher-forced: each generated token is the argmax of the full-sequence (naive-MLA prefill)
    logits of the FP8 model at that position (positions with a near-tie are skipped)."""
    seqs = [p + r.output_ids for p, r in zip(PROMPTS, greedy)]
    T = max(map(len, seqs))
    ids = np.zeros((len(seqs), T), np.int32)   # right padding never reaches earlier positions
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = s
    logits = dj.logits(model, ids)
    checked = 0
    for b, (p, r) in enumerate(zip(PROMPTS, greedy)):
        assert len(r.output_ids) == N and r.finish_reason == "length"
        for i, tok in enumerate(r.output_ids):
            row = logits[b, len(p) - 1 + i]
            top2 = np.sort(row)[-2:]
            if top2[1] - top2[0] < TIE:
                continue
            assert tok == int(np.argmax(row)), (b, i)
            checked += 1
    assert checked >= 0.9 * N * len(PROMPTS)


def test_batch_rows_equal_single_prompts(gen, greedy):
    for p, r in zip(PROMPTS, greedy):
        alone = gen.generate([p], max_new_tokens=N, stop_at_eos=False)[0]
        assert alone.output_ids == r.output_ids
    assert gen.last_stats.buckets == (1, 16, 32)


def test_dequantized_weights_same_numbers(model, gen):
    """On CPU the generator dequantizes FP8 weights once: bit-identical logits to the FP8 model."""
    assert gen.weights == "dequantize" and gen.model is not model and not gen.model.cfg.fp8
    assert Generator(model, weights="as-is").model is model
    ids = np.array([PROMPTS[1]])
    np.testing.assert_array_equal(dj.logits(gen.model, ids), dj.logits(model, ids))


def test_top_k_1_and_temperature_0_are_greedy(gen, greedy):
    want = [r.output_ids for r in greedy]
    t0 = gen.generate(PROMPTS, max_new_tokens=N, stop_at_eos=False,
                      sampling=SamplingParams(temperature=0.0, top_k=7, top_p=0.5), seed=3)
    assert [r.output_ids for r in t0] == want
    k1 = gen.generate(PROMPTS, max_new_tokens=N, stop_at_eos=False,
                      sampling=SamplingParams(temperature=1.5, top_k=1), seed=4)
    assert [r.output_ids for r in k1] == want
    p0 = gen.generate(PROMPTS, max_new_tokens=N, stop_at_eos=False,
                      sampling=SamplingParams(temperature=1.0, top_p=1e-6), seed=5)
    assert [r.output_ids for r in p0] == want
    # a tiny temperature is near-greedy: logits / 1e-38 overflowed float32 (inf - inf = NaN in the
    # softmax) and drew token 0 and 1 instead
    for sp in (SamplingParams(temperature=1e-38), SamplingParams(temperature=1e-40, top_p=0.9, top_k=5)):
        tiny = gen.generate(PROMPTS, max_new_tokens=N, stop_at_eos=False, sampling=sp, seed=6)
        assert [r.output_ids for r in tiny] == want


def test_seeded_sampling(gen, greedy):
    sp = SamplingParams(temperature=1.0, top_p=0.95)
    a = gen.generate(PROMPTS, max_new_tokens=N, stop_at_eos=False, sampling=sp, seed=11)
    b = gen.generate(PROMPTS, max_new_tokens=N, stop_at_eos=False, sampling=sp, seed=11)
    c = gen.generate(PROMPTS, max_new_tokens=N, stop_at_eos=False, sampling=sp, seed=12)
    ids = lambda rs: [r.output_ids for r in rs]  # noqa: E731
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)
    assert ids(a) != [r.output_ids for r in greedy]
    # Streaming in chunks draws the same tokens, and streams exactly them.
    got = {i: [] for i in range(len(PROMPTS))}
    s = gen.generate(PROMPTS, max_new_tokens=N, stop_at_eos=False, sampling=sp, seed=11,
                     stream=lambda row, new: got[row].extend(new), stream_chunk=3)
    assert ids(s) == ids(a)
    assert [got[i] for i in range(len(PROMPTS))] == ids(a)


def _pick_eos(greedy):
    """A token that row 0 generates at some index k > 0 (first occurrence) and rows 1, 2 never do."""
    r0 = greedy[0].output_ids
    others = set(greedy[1].output_ids) | set(greedy[2].output_ids)
    for k in range(2, N - 2):
        if r0[k] not in r0[:k] and r0[k] not in others:
            return r0[k], k
    pytest.skip("no token of row 0 is absent from the other rows")


def test_eos_ends_one_row_others_continue(gen, greedy):
    eos, k = _pick_eos(greedy)
    got = {i: [] for i in range(len(PROMPTS))}
    res = gen.generate(PROMPTS, max_new_tokens=N, eos_id=eos, stream=lambda row, new: got[row].extend(new))
    assert res[0].output_ids == greedy[0].output_ids[:k]
    assert res[0].finish_reason == "eos"
    assert got[0] == greedy[0].output_ids[:k]          # eos itself is not streamed
    for r, g in zip(res[1:], greedy[1:]):
        assert r.output_ids == g.output_ids and r.finish_reason == "length"
    # An eos as the very first token gives an empty output; ignoring eos generates on.
    first = gen.generate(PROMPTS, max_new_tokens=N, eos_id=greedy[0].output_ids[0])
    assert first[0].output_ids == [] and first[0].finish_reason == "eos"
    ignored = gen.generate(PROMPTS, max_new_tokens=N, eos_id=eos, stop_at_eos=False)
    assert [r.output_ids for r in ignored] == [r.output_ids for r in greedy]
    assert all(r.finish_reason == "length" for r in ignored)


def test_zero_new_tokens_and_buckets(gen):
    res = gen.generate(PROMPTS, max_new_tokens=0)
    assert [r.output_ids for r in res] == [[], [], []] and res[0].finish_reason == "length"
    assert [length_bucket(n) for n in (1, 16, 17, 100, 129, 192, 193, 300, 1000, 1025)] == \
        [16, 16, 32, 128, 192, 192, 256, 384, 1024, 1536]


def test_sampling_filters():
    lg = jnp.array([[4.0, 3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0, 4.0]])
    keep = lambda k, p: np.isfinite(np.asarray(filter_logits(lg, jnp.int32(k), jnp.float32(p))))  # noqa: E731
    assert keep(2, 1.0).sum(1).tolist() == [2, 2]
    assert keep(0, 1.0).all()
    probs = np.asarray(jax.nn.softmax(lg[0]))          # 0.636, 0.234, 0.086, ...
    assert keep(0, 0.5)[0].tolist() == [True, False, False, False, False]
    assert keep(0, 0.7)[0].tolist() == [True, True, False, False, False]
    assert keep(0, float(probs[:3].sum()) - 1e-3)[1].tolist() == [False, False, True, True, True]
    assert keep(1, 1.0)[1].tolist() == [False, False, False, False, True]


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompts_ids=[[]]), "prompt 0 is empty"),
    (dict(prompts_ids=[]), "non-empty list"),
    (dict(prompts_ids=[[0, 1], [3, 256]]), "outside the vocab"),
    (dict(prompts_ids=[[0, -1]]), "outside the vocab"),
    (dict(prompts_ids=[[3] * 256]), "at most 255 fit"),
    (dict(max_new_tokens=-1), "max-new-tokens"),
    (dict(sampling=SamplingParams(1.0, top_p=0.0)), "top-p"),
    (dict(sampling=SamplingParams(1.0, top_p=1.5)), "top-p"),
    (dict(sampling=SamplingParams(1.0, top_p=float("nan"))), "top-p"),
    (dict(sampling=SamplingParams(1.0, top_k=-1)), "top-k"),
    (dict(sampling=SamplingParams(float("inf"))), "temperature"),
    (dict(eos_id=999), "eos id"),
])
def test_engine_bad_input(gen, kwargs, match):
    kwargs.setdefault("prompts_ids", [[0, 1, 2]])
    with pytest.raises(DeepSeekError, match=match):
        gen.generate(kwargs.pop("prompts_ids"), **kwargs)


# ---- CLI on ckpt_a (token ids, no tokenizer) ---------------------------------------------------
def test_cli_generate_json_ids(ckpt_a, greedy, capsys):
    argv = ["generate", ckpt_a, "--max-new-tokens", N, "--temperature", 0, "--ignore-eos", "--json"]
    for p in PROMPTS:
        argv += ["--prompt-ids", ",".join(map(str, p))]
    code, out, _ = run_cli(capsys, *argv)
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == len(PROMPTS)
    for row, p, g in zip(rows, PROMPTS, greedy):
        assert set(row) == {"prompt_ids", "output_ids", "text", "finish_reason"}
        assert row["prompt_ids"] == p and row["output_ids"] == g.output_ids
        assert row["finish_reason"] == "length" and row["text"] is None


def test_cli_generate_in_batches(ckpt_a, capsys):
    """``--batch-size 2`` over 5 sampled prompts: three batches, printed in order, and every row
    draws what it does in one batch of 8 (row r samples with row r's key: ``first_row``). The
    prompts start with the same 32-token system prompt: the first batch prefills it once, and the
    next two (the last of one prompt) continue its kept cache, as the timing line says."""
    rng = np.random.default_rng(8)
    system = rng.integers(2, 250, 32).tolist()
    argv = ["generate", ckpt_a, "--max-new-tokens", 6, "--temperature", 1, "--seed", 4, "--ignore-eos", "--json"]
    for n in (3, 9, 5, 12, 4):
        argv += ["--prompt-ids", ",".join(map(str, system + rng.integers(2, 250, n).tolist()))]
    outs, errs = [], []
    for bs in (2, 8):
        code, out, err = run_cli(capsys, *argv, "--batch-size", bs)
        assert code == 0
        outs.append([json.loads(line) for line in out.splitlines()])
        errs.append(err)
    assert outs[0] == outs[1] and len(outs[0]) == 5
    assert "5 prompts in 3 batches" in errs[0] and "batch 5" in errs[1]
    assert "up to 32 leading prompt tokens shared by a batch (prefilled once, its cache kept for 2 later batches)" \
        in errs[0], errs[0]
    assert "32 leading prompt tokens shared by the batch (prefilled once)" in errs[1], errs[1]
    ids = [r["output_ids"] for r in outs[0]]
    assert len({tuple(i) for i in ids}) == 5       # (sampled: rows differ)


def test_cli_generate_prefill_chunk(ckpt_a, greedy, capsys):
    """``--prefill-chunk 16``: the 9-token prompt fits one chunk of its 16-token bucket, so the
    chunk is cut away; a prompt of 20 tokens (bucket 32) runs in two chunks and generates what
    ``--prefill-chunk none`` does."""
    outs = []
    for chunk in ("16", "none"):
        code, out, _ = run_cli(capsys, "generate", ckpt_a, "--prompt-ids", ",".join(map(str, range(3, 23))),
                               "--prompt-ids", ",".join(map(str, PROMPTS[1])), "--max-new-tokens", 8,
                               "--temperature", 0, "--ignore-eos", "--json", "--prefill-chunk", chunk)
        assert code == 0
        outs.append([json.loads(line)["output_ids"] for line in out.splitlines()])
    assert outs[0] == outs[1] and outs[0][1] == greedy[1].output_ids[:8]


def test_cli_generate_streams_ids(ckpt_a, greedy, capsys):
    code, out, err = run_cli(capsys, "generate", ckpt_a, "--prompt-ids", "0, 5, 17, 42", "--max-new-tokens", N,
                             "--temperature", 0, "--ignore-eos")
    assert code == 0
    assert [int(t) for t in out.split()] == greedy[0].output_ids
    assert "tokens/s" in err


@pytest.mark.parametrize("args, contains", [
    (["--prompt-ids", "0,999"], "outside the vocab [0, 256)"),
    (["--prompt-ids", ",".join(["3"] * 300)], "at most 255 fit"),
    (["--prompt-ids", "1,x"], "not a comma-separated list"),
    (["--prompt-ids", " "], "empty prompt"),
    (["--prompt-ids", "1", "--max-new-tokens", "-1"], "--max-new-tokens"),
    (["--prompt-ids", "1", "--temperature", "1", "--top-p", "0"], "top-p"),
    (["--prompt-ids", "1", "--top-p", "1.01"], "top-p"),
    (["--prompt-ids", "1", "--top-k", "-2"], "top-k"),
    (["--prompt", "hello"], "tokenizer.json"),
    (["--input-file", "/nonexistent/prompts.txt"], "cannot read"),
    (["--prompt-ids", "1", "--prefill-chunk", "7"], "--prefill-chunk"),
    (["--prompt-ids", "1", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["--prompt-ids", "1", "--raw"], "--raw applies to text prompts"),            # was silently ignored
    (["--prompt-ids", "1", "--chat-template"], "--chat-template applies to text prompts"),
])
def test_cli_generate_bad_input(ckpt_a, capsys, args, contains):
    code, _, err = run_cli(capsys, "generate", ckpt_a, *args)
    assert_one_line_error(code, err, contains=contains)


def test_cli_generate_bad_input_file(ckpt_a, tmp_path, capsys):
    code, _, err = run_cli(capsys, "generate", ckpt_a, "--input-file", tmp_path)   # a directory
    assert_one_line_error(code, err, contains="cannot read")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    code, _, err = run_cli(capsys, "generate", ckpt_a, "--input-file", blank)
    assert_one_line_error(code, err, contains="holds no text")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    code, _, err = run_cli(capsys, "generate", ckpt_a, "--input-file", binary)
    assert_one_line_error(code, err, contains="line 1 is not UTF-8 text: byte 0xff at byte 1")


# ---- demo checkpoint: text, chat template, chat, demo ------------------------------------------
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Runs ``deepseek-jax demo`` into an empty directory; returns (dir, stdout)."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    d = tmp_path_factory.mktemp("demo") / "ckpt"
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.main(["demo", "--dir", str(d), "--max-new-tokens", "8", "--temperature", "0"])
    assert code == 0, err.getvalue()
    return str(d), out.getvalue()


def test_demo_end_to_end(demo):
    from deepseek_jax.commands.demo import DEFAULT_PROMPTS

    d, out = demo
    assert "tokens/s" in out and out.count(">>> ") == len(DEFAULT_PROMPTS)
    assert f"{len(DEFAULT_PROMPTS)}/{len(DEFAULT_PROMPTS)} additions right" in out   # the trained model
    assert demo_checkpoint(d) == d          # reused, not copied again
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o777 & ~umask   # as mkdir would (tempfile's is 0o700)
    tok = Tokenizer.from_dir(d)
    assert tok.chat_template and dj.load_config(d).vocab_size == dj.load_config(demo_checkpoint()).vocab_size


def test_chat_template_asked_of_a_tokenizer_without_one(tmp_path, capsys):
    """--chat-template on a checkpoint whose tokenizer has no template said "pass a raw prompt
    instead", which names no flag; and a one-token cap read "at most 1 new tokens"."""
    d = tmp_path / "ckpt"
    shutil.copytree(demo_checkpoint(), d)
    tc = json.loads((d / "tokenizer_config.json").read_text())
    del tc["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    code, _, err = run_cli(capsys, "generate", d, "--prompt", "1+1", "--chat-template")
    assert_one_line_error(code, err, contains="(--raw encodes the prompts as they are)")
    max_len = dj.load_config(d).max_position_embeddings
    code, _, err = run_cli(capsys, "generate", d, "--temperature", "0", "--prompt-ids", "3",
                           "--prompt-ids", ",".join(["3"] * (max_len - 1)), "--max-new-tokens", "4")
    assert code == 0 and "(--prompt-ids #2: at most 1 new token)" in err, err


def test_demo_dir_semantics(demo, tmp_path, capsys):
    d, _ = demo
    assert demo_checkpoint() != d and os.path.isfile(os.path.join(demo_checkpoint(), "config.json"))
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "demo", "--dir", junk)
    assert_one_line_error(code, err, command="demo", contains="pick another --dir")
    code, out, _ = run_cli(capsys, "demo", "--dir", d, "--prompt", "12+30", "--speculative", "mtp")
    assert code == 0 and "\n42  [correct]" in out and "drafts accepted" in out


def test_cli_generate_text_json_and_input_file(demo, tmp_path, capsys):
    from deepseek_jax.commands.demo import DEFAULT_PROMPTS

    d, _ = demo
    f = tmp_path / "prompts.txt"   # as a Windows editor saves it: a byte-order mark, CRLF line ends
    f.write_bytes(b"\xef\xbb\xbf" + ("\r\n".join(DEFAULT_PROMPTS) + "\r\n\r\n").encode())
    code, out, _ = run_cli(capsys, "generate", d, "--input-file", f, "--max-new-tokens", 8, "--temperature", 0,
                           "--json")
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == len(DEFAULT_PROMPTS)
    tok = Tokenizer.from_dir(d)
    for row, text in zip(rows, DEFAULT_PROMPTS):
        assert row["prompt_ids"] == tok.encode_chat([{"role": "user", "content": text}])
        assert row["text"] == tok.decode(row["output_ids"])
        assert row["finish_reason"] in ("eos", "length") and len(row["output_ids"]) <= 8
    # --raw encodes the text as it is (bos per the tokenizer config, no template).
    code, out, _ = run_cli(capsys, "generate", d, "--input-file", f, "--raw", "--max-new-tokens", 0, "--json")
    assert code == 0
    row = json.loads(out.splitlines()[0])
    assert row["prompt_ids"] == tok.encode(DEFAULT_PROMPTS[0]) and row["output_ids"] == []
    # one prompt per line: str.splitlines also split at U+2028, a form feed and a lone \r (6 prompts)
    f.write_text("first\u2028second\x0cthird\rfourth\r\nlast\n", encoding="utf-8", newline="")
    code, out, _ = run_cli(capsys, "generate", d, "--input-file", f, "--raw", "--max-new-tokens", 0, "--json")
    assert code == 0
    assert [json.loads(line)["prompt_ids"] for line in out.splitlines()] == [
        tok.encode("first\u2028second\x0cthird\rfourth"), tok.encode("last")]


def test_cli_text_bad_input(demo, capsys):
    d, _ = demo
    # the demo's max length (128) caps the default 200 new tokens: that note came before the error
    code, _, err = run_cli(capsys, "generate", d, "--prompt-ids", "0,5,999")
    assert_one_line_error(code, err, contains="token id 999 at index 2 is outside the vocab")
    code, _, err = run_cli(capsys, "generate", d, "--prompt", "")
    assert_one_line_error(code, err, contains="--prompt is empty")
    # a byte that is not UTF-8 in argv (Python keeps it as U+DCFF): the error named a lone surrogate
    # at its position in the rendered chat template
    code, _, err = run_cli(capsys, "generate", d, "--prompt", "ok", "--prompt", "ab\udcffcd")
    assert_one_line_error(code, err, contains="--prompt #2 is not UTF-8 text: byte 0xff at character 2")
    # prompts are named as the user counts them: an input file's line (blank lines skipped), not
    # a 0-based index among the non-blank lines
    f = d + "/../prompts.txt"
    with open(f, "w") as fh:
        fh.write("1+1\n\n" + "1" * 200 + "\n")
    code, _, err = run_cli(capsys, "generate", d, "--input-file", f)
    assert_one_line_error(code, err, contains="--input-file line 3 has 2")
    for prompt, needle in (("", "--prompt #2 is empty"), ("1" * 200, "--prompt #2 has")):
        code, out, err = run_cli(capsys, "demo", "--dir", d, "--prompt", "1+1", "--prompt", prompt)
        assert_one_line_error(code, err, command="demo", contains=needle)
        assert out == ""   # (the model's description was printed first)


def test_cli_chat_piped(demo, monkeypatch, capsys):
    import io

    d, _ = demo
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n\nHello\n/clear\nHello\n/exit\nnever read\n"))
    system = "You are a small model that adds numbers."
    code, out, err = run_cli(capsys, "chat", d, "--max-new-tokens", 6, "--temperature", 0, "--system", system,
                             "--verbose")
    assert code == 0, err
    tok = Tokenizer.from_dir(d)
    gen = Generator(dj.load(d, mtp=False), tok)
    sys_msg = [{"role": "system", "content": system}]
    first = gen.generate([tok.encode_chat(sys_msg + [{"role": "user", "content": "Hello"}])], max_new_tokens=6)[0]
    r1 = tok.decode(first.output_ids)
    history = sys_msg + [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": r1},
                         {"role": "user", "content": "Hello"}]
    r2 = tok.decode(gen.generate([tok.encode_chat(history)], max_new_tokens=6)[0].output_ids)
    # Second turn sees the history (prefilling only what the first turn's cache lacks: the same
    # reply as a fresh prefill gives); after /clear the first turn repeats; /exit stops reading.
    assert out == f"{r1}\n{r2}\n{r1}\n"
    assert "history cleared" in err
    timings = [ln for ln in err.splitlines() if "tokens/s" in ln]
    assert len(timings) == 3 and "from the last turn's cache" in timings[1]


def test_cli_chat_needs_tokenizer(ckpt_a, capsys):
    code, _, err = run_cli(capsys, "chat", ckpt_a)
    assert_one_line_error(code, err, command="chat", contains="tokenizer.json")


@pytest.mark.parametrize("speculative", [None, "mtp"])
def test_small_models_decode_from_per_layer_weights(ckpt_a, monkeypatch, speculative):
    """The CPU engine decodes a small dequantized model from per-layer weights and a per-layer
    cache (faster steps) and generates the same tokens as from the stacked, scanned layers."""
    from deepseek_jax import generate
    model = dj.load(ckpt_a, dtype="float32", mtp=True)
    prompts = [[5, 9, 17, 3], [7, 7, 2, 40, 11, 6], [100, 3], [8, 1, 9]]
    gen = Generator(model)
    assert gen._prepared.weights.layers is not None
    per_layer = gen.generate(prompts, max_new_tokens=12, stop_at_eos=False, speculative=speculative)
    monkeypatch.setattr(generate, "_PER_LAYER_MAX_LAYERS", 0)
    stacked_gen = Generator(model)
    assert stacked_gen._prepared.weights.layers is None
    stacked = stacked_gen.generate(prompts, max_new_tokens=12, stop_at_eos=False, speculative=speculative)
    assert [r.output_ids for r in per_layer] == [r.output_ids for r in stacked]


@pytest.mark.parametrize("speculative,weights", [(None, "auto"), ("mtp", "auto"), (None, "as-is")])
def test_chunked_prefill_gives_the_one_pass_tokens(ckpt_a, speculative, weights):
    """A prompt prefilled in 16-token chunks (the first naive, the rest absorbed over the cache,
    in a loop inside the executable) generates what one naive pass does: prompts shorter than a
    chunk, ending exactly at a chunk's end, and spanning three chunks, in one batch; plain and
    speculative (the MTP's own prompt pass is chunked too); per-layer and stacked FP8 weights."""
    model = dj.load(ckpt_a, dtype="float32", mtp=True)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(2, 250, n).tolist() for n in (40, 16, 5, 33)]
    kw = dict(max_new_tokens=10, stop_at_eos=False, speculative=speculative)
    one = Generator(model, weights=weights, prefill_chunk=None)
    want = one.generate(prompts, **kw)
    assert one.last_stats.prefill_chunk is None and one.last_stats.buckets[1] == 64
    chunked = Generator(model, weights=weights, prefill_chunk=16)
    got = chunked.generate(prompts, **kw)
    assert chunked.last_stats.prefill_chunk == 16
    assert [r.output_ids for r in got] == [r.output_ids for r in want]
    streamed = [[] for _ in prompts]   # streaming (decode in chunks of 3 steps) after a chunked prefill
    chunked.generate(prompts, stream=lambda row, ids: streamed[row].extend(ids), stream_chunk=3, **kw)
    assert streamed == [r.output_ids for r in want]


def test_prefill_chunk_choice():
    """``prefill_chunk_for``: "auto" keeps one pass while the naive scores fit the budget and
    otherwise takes the largest power-of-two chunk whose scores fit; chunks always divide the
    prompt bucket; bad values are one-line errors."""
    from deepseek_jax.generate import prefill_chunk_for
    assert prefill_chunk_for(8, 64, 128, 4, "auto") is None                 # tiny: one pass
    c = prefill_chunk_for(1, 4096, 8192, 128, "auto")                        # DeepSeek-V3, 4K prompt
    assert c == 512 and 128 * c * 8192 * 4 <= 2 << 30 < 128 * 2 * c * 8192 * 4
    assert prefill_chunk_for(1, 32768, 32768, 128, "auto") == 128
    assert prefill_chunk_for(1, 384, 512, 4, 256) == 128                     # 384 = 3 x 128
    assert prefill_chunk_for(1, 128, 128, 4, 100) == 64 and prefill_chunk_for(1, 64, 64, 4, 100) is None
    assert prefill_chunk_for(1, 64, 64, 4, None) is None
    # a bucket capped at an odd max length (37): 37 chunks of 1 token before; one pass if it fits
    assert prefill_chunk_for(1, 37, 37, 4, 16) is None
    assert prefill_chunk_for(1, 40, 40, 4, 16) is None and prefill_chunk_for(1, 48, 48, 4, 16) == 16
    assert prefill_chunk_for(1, 100_001, 100_001, 128, 1024) == 1                    # too big for one pass
    for bad in (8, 0, "big", 16.0, True):
        with pytest.raises(dj.DeepSeekError, match="prefill_chunk"):
            Generator.__new__(Generator).__init__(None, prefill_chunk=bad)


def test_reused_prefix_gives_the_fresh_tokens(ckpt_a):
    """``reuse_prefix=True`` (chat): a single-prompt call that starts with the last call's prompt
    and reply prefills only the rest, absorbed over the kept cache, and generates what a fresh
    generator does; a prompt with no shared start, a batch, or a speculative call prefill from
    scratch (and a batch or speculative call drops the kept cache)."""
    model = dj.load(ckpt_a, dtype="float32", mtp=True)
    rng = np.random.default_rng(6)
    fresh, gen = Generator(model), Generator(model, reuse_prefix=True)
    kw = dict(max_new_tokens=10, stop_at_eos=False)
    prompt = rng.integers(2, 250, 30).tolist()
    for turn in range(2):
        got = gen.generate([prompt], **kw)[0]
        assert got.output_ids == fresh.generate([prompt], **kw)[0].output_ids, turn
        assert gen.last_stats.reused_prefix == (0 if turn == 0 else prev_len + 10 - 1), turn
        prev_len = len(prompt)
        prompt = prompt + got.output_ids + rng.integers(2, 250, 7).tolist()   # the next "turn"
    streamed = []   # streaming over a continued prefill
    got = gen.generate([prompt], stream=lambda row, ids: streamed.extend(ids), stream_chunk=4, **kw)[0]
    assert gen.last_stats.reused_prefix == prev_len + 10 - 1 and streamed == got.output_ids
    assert got.output_ids == fresh.generate([prompt], **kw)[0].output_ids
    other = rng.integers(2, 250, 40).tolist()
    gen.generate([other], **kw)
    assert gen.last_stats.reused_prefix == 0
    gen.generate([other + [7] * 3, other], **kw)      # a batch: no reuse, nothing kept
    assert gen.last_stats.reused_prefix == 0 and gen._kept is None
    gen.generate([other + [7] * 3], speculative="mtp", **kw)
    assert gen.last_stats.reused_prefix == 0 and gen._kept is None


@pytest.mark.parametrize("weights,chunk", [("auto", "auto"), ("as-is", 16)])
def test_shared_prefix_gives_the_unshared_tokens(ckpt_a, weights, chunk):
    """A batch whose prompts start with the same 32 tokens (a system prompt) prefills them once and
    each row's rest over a copy of that cache, and generates the tokens and log-probs of
    prefilling every row whole: rests of 1, 20 and 7 tokens, a padding row (3 rows in a batch of
    4), sampling, streaming, and (log-probs only) FP8 weights read as-is with the prefix and the
    rests in 16-token chunks; prompts that share too little prefill whole. Read as-is, the next
    batch with the same system prompt continues its kept cache, but not after a weight update
    (new arrays): it prefills it again, from the new weights."""
    model = dj.load(ckpt_a, dtype="float32")
    rng = np.random.default_rng(7)
    system = rng.integers(2, 250, 32).tolist()
    prompts = [system + rng.integers(2, 250, n).tolist() for n in (1, 20, 7)]
    whole = Generator(model, weights=weights, prefill_chunk=chunk, share_prefix=False)
    shared = Generator(model, weights=weights, prefill_chunk=chunk)
    for kw in (dict(logprobs=True), dict(sampling=dict(temperature=1.0), seed=3))[:2 if weights == "auto" else 1]:
        kw.update(max_new_tokens=10, stop_at_eos=False)
        want = whole.generate(prompts, **kw)
        assert whole.last_stats.shared_prefix == 0
        got = shared.generate(prompts, **kw)
        assert shared.last_stats.shared_prefix == 32 and shared.last_stats.buckets == (4, 64, 64)
        assert [r.output_ids for r in got] == [r.output_ids for r in want]
        if kw.get("logprobs"):
            np.testing.assert_allclose(np.array([r.logprobs for r in got]), np.array([r.logprobs for r in want]),
                                       atol=2e-5)
    if weights != "auto":
        again = [system + p[32:][::-1] for p in prompts]
        for update in (False, True):
            if update:
                emb = model.embed_tokens.weight
                emb.value = emb.value * 2
            want = whole.generate(again, **kw)
            got = shared.generate(again, **kw)
            assert shared.last_stats.shared_prefix == 32 and shared.last_stats.prefix_cached is not update
            assert [r.output_ids for r in got] == [r.output_ids for r in want]
            np.testing.assert_allclose(np.array([r.logprobs for r in got]), np.array([r.logprobs for r in want]),
                                       atol=2e-5)
        return
    kw = dict(max_new_tokens=10, stop_at_eos=False)
    want = whole.generate(prompts, **kw)
    streamed = [[] for _ in prompts]
    got = shared.generate(prompts, stream=lambda row, ids: streamed[row].extend(ids), stream_chunk=3, **kw)
    assert shared.last_stats.shared_prefix == 32
    assert streamed == [r.output_ids for r in got] == [r.output_ids for r in want]
    short = [system[:16] + rng.integers(2, 250, 40).tolist() for _ in range(2)]
    shared.generate(short, **kw)    # 16 shared tokens and rests of 40: a 64-token bucket either way
    assert shared.last_stats.shared_prefix == 0


def test_kept_shared_prefix_across_calls(ckpt_a):
    """The batch-1 cache of a batch's shared prefix is kept: the next batch (other rests) and a
    single prompt that start with the same 32 tokens continue it without prefilling them
    (``prefix_cached``), and generate the tokens and log-probs of prefilling every prompt whole; a
    prefix that differs in its first token only and ``forget_prefix`` prefill afresh (the
    executables are the test above's; its as-is case checks a weight update)."""
    model = dj.load(ckpt_a, dtype="float32")
    rng = np.random.default_rng(7)
    system = rng.integers(2, 250, 32).tolist()
    other = [system[0] % 200 + 3] + system[1:]
    first, second = ([system + rng.integers(2, 250, n).tolist() for n in rests] for rests in ((1, 20, 7), (5, 18, 2)))
    kw = dict(max_new_tokens=10, stop_at_eos=False, logprobs=True)

    def check(gen, ref, prompts, cached, want=None):
        want = want or ref.generate(prompts, **kw)
        got = gen.generate(prompts, **kw)
        assert (gen.last_stats.shared_prefix, gen.last_stats.prefix_cached) == (32, cached)
        assert [r.output_ids for r in got] == [r.output_ids for r in want]
        np.testing.assert_allclose(np.array([r.logprobs for r in got]), np.array([r.logprobs for r in want]),
                                   atol=2e-5)
        return want

    whole, shared = Generator(model, share_prefix=False), Generator(model)
    check(shared, whole, first, False)
    want = check(shared, whole, second, True)
    check(shared, whole, second[1:2], True, want[1:2])   # one prompt (its row of the whole batch)
    assert "32 leading prompt tokens from an earlier batch's kept cache" in timing_line(shared.last_stats)
    check(shared, whole, [other + p[32:] for p in second], False)
    check(shared, whole, second, False)                  # (the kept prefix was `other`'s)
    shared.forget_prefix()
    assert shared._prefix is None
    check(shared, whole, second, False)
    assert whole._prefix is None and whole.last_stats.shared_prefix == 0

