"""Stop sequences: ``stop_token_ids`` (ended inside the compiled loop) and ``stop`` strings
(found on the host between decode chunks), in the engine, with streaming, speculative decoding
and on the command line.

All on the shipped demo model (a byte-level tokenizer: one digit per token). Greedy with
``stop_at_eos=False`` it writes long digit strings (``12+30`` -> ``42142159161...``), so stop
strings and ids can be picked from its own output. Few compilations: every call falls into the
same buckets (batch 4 or 1, prompt 16, cache 32); the CLI calls reuse the executables.
"""

from __future__ import annotations

import json
import os

import pytest

import deepseek_jax as dj
from deepseek_jax import cli
from deepseek_jax.errors import DeepSeekError
from deepseek_jax.generate import MAX_STOP_TOKEN_IDS, Generator
from deepseek_jax.tokenizer import Tokenizer

PROMPTS = ["12+30", "7+8", "123+456"]
N = 20
KW = dict(max_new_tokens=N, stop_at_eos=False)


@pytest.fixture(scope="module")
def gen():
    d = dj.demo_checkpoint()
    return Generator(dj.load(d, mtp=True), Tokenizer.from_dir(d))


@pytest.fixture(scope="module")
def base(gen):
    res = gen.generate_text(PROMPTS, **KW)
    assert gen.last_stats.buckets == (4, 16, 32)
    assert all(r.finish_reason == "length" and len(r.output_ids) == N for r in res)
    return res


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _expect(gen, base_result, stops):
    """What a stop-string call must give for one row: (text, output_ids, finish_reason), from the
    stop-less output (the smallest token prefix whose text holds a stop string)."""
    tok = gen.tokenizer
    ids = base_result.output_ids
    for k in range(1, len(ids) + 1):
        cut = _first_stop(tok.decode(ids[:k]), stops)
        if cut is not None:
            return tok.decode(ids[:k])[:cut], ids[:k], "stop"
    return base_result.text, ids, base_result.finish_reason


# ---- stop strings ----------------------------------------------------------------------------
@pytest.mark.parametrize("stops", [["142"], ["66", "9"], ["1"], ["zz"], ["4214215", "15"]])
def test_stop_strings_cut_each_row(gen, base, stops):
    """Each row of a batch ends at its own first stop string (or not at all), as it would alone:
    text cut before it, ids up to the token that completed it; other rows are unchanged."""
    res = gen.generate_text(PROMPTS, stop=stops, **KW)
    for r, b in zip(res, base):
        assert (r.text, r.output_ids, r.finish_reason) == _expect(gen, b, stops)
        assert not any(s in r.text for s in stops)
    # a row alone gets what it gets in the batch
    alone = gen.generate_text(PROMPTS[:1], stop=stops, **KW)[0]
    assert (alone.text, alone.output_ids, alone.finish_reason) == (res[0].text, res[0].output_ids,
                                                                   res[0].finish_reason)


def test_stop_strings_end_the_loop_early(gen, base):
    """Once every row has hit a stop string the loop ends (steps well below the budget), and a
    stop string that never appears changes nothing."""
    stops = sorted({b.text[2:4] for b in base})    # each row holds one by its 4th character
    res = gen.generate_text(PROMPTS, stop=stops, stream_chunk=2, **KW)
    assert [r.finish_reason for r in res] == ["stop"] * len(PROMPTS)
    assert gen.last_stats.steps <= max(len(r.output_ids) for r in res) + 2 < N
    never = gen.generate_text(PROMPTS, stop=["zz", "x"], **KW)
    assert [(r.text, r.output_ids, r.finish_reason) for r in never] == \
        [(b.text, b.output_ids, b.finish_reason) for b in base]
    assert gen.last_stats.steps == N


@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_streamed_text_never_holds_a_stop_string(gen, base, chunk):
    """The streamed pieces add up to the final text exactly, and no piece (nor the text streamed
    so far) ever holds a stop string or the part of one that is later cut off."""
    t0 = base[0].text                     # 42142159161...
    stops = [t0[2:5], t0[3:7] + "x"]      # "142" ends the row; "4215x" is a prefix that never completes
    got = {i: [] for i in range(len(PROMPTS))}
    res = gen.generate_text(PROMPTS, stop=stops, stream=lambda row, piece: got[row].append(piece),
                            stream_chunk=chunk, **KW)
    for i, r in enumerate(res):
        assert "".join(got[i]) == r.text
        assert all(got[i]) and not any(s in p for p in got[i] for s in stops)
    assert res[0].text == t0[:2] and res[0].finish_reason == "stop"
    # without a stop string streaming is unchanged: pieces add up to the text
    plain = {i: [] for i in range(len(PROMPTS))}
    res = gen.generate_text(PROMPTS, stream=lambda row, piece: plain[row].append(piece), stream_chunk=chunk, **KW)
    assert ["".join(plain[i]) for i in range(len(PROMPTS))] == [b.text for b in base]


def test_stop_string_with_eos_and_length(gen):
    """With eos on, rows that end at eos before any stop string keep "eos"; with the budget cut
    keep "length"; the stop string wins when it comes first."""
    eos = gen.generate_text(PROMPTS, max_new_tokens=N)
    assert all(r.finish_reason == "eos" for r in eos)
    res = gen.generate_text(PROMPTS, max_new_tokens=N, stop=["zz"])
    assert [(r.text, r.output_ids, r.finish_reason) for r in res] == \
        [(r.text, r.output_ids, r.finish_reason) for r in eos]
    res = gen.generate_text(PROMPTS, max_new_tokens=N, stop=eos[0].text[-1:])   # "2" of "42"
    assert res[0].text == eos[0].text[:-1] and res[0].finish_reason == "stop"
    short = gen.generate_text(PROMPTS, max_new_tokens=1, stop=["zz"], stop_at_eos=False)
    assert all(r.finish_reason == "length" and len(r.output_ids) == 1 for r in short)


def test_stop_strings_with_speculative(gen, base):
    stops = [base[0].text[2:5]]
    res = gen.generate_text(PROMPTS, stop=stops, speculative="mtp", **KW)
    assert [(r.text, r.output_ids, r.finish_reason) for r in res] == [_expect(gen, b, stops) for b in base]


# ---- stop token ids --------------------------------------------------------------------------
def _pick(ids: list[int]) -> tuple[int, int]:
    """A token of ``ids`` and the index of its first occurrence, at index >= 2."""
    for k in range(2, len(ids)):
        if ids[k] not in ids[:k]:
            return ids[k], k
    pytest.skip("no new token after index 2")


@pytest.mark.parametrize("speculative", [None, "mtp"])
def test_stop_token_ids_end_rows_in_the_loop(gen, base, speculative):
    """A stop token id ends each row at its first occurrence (not output, finish "stop"), even
    with ``stop_at_eos=False``; rows without it run on; the ids are traced (no recompile)."""
    tid, k = _pick(base[0].output_ids)
    gen.generate_text(PROMPTS, speculative=speculative, **KW)   # compiled for this call
    compiles = gen.compile_count
    streamed = {i: [] for i in range(len(PROMPTS))}
    for stream in (None, lambda row, ids: streamed[row].extend(ids)):
        res = gen.generate([gen.encode_prompt(p) for p in PROMPTS], stop_token_ids=[tid, 250],
                           speculative=speculative, stream=stream, stream_chunk=3, **KW)
        for r, b in zip(res, base):
            ids = b.output_ids
            if tid in ids:
                j = ids.index(tid)
                assert (r.output_ids, r.finish_reason) == (ids[:j], "stop")
            else:
                assert (r.output_ids, r.finish_reason) == (ids, "length")
        assert res[0].output_ids == base[0].output_ids[:k]
    assert [streamed[i] for i in range(len(PROMPTS))] == [r.output_ids for r in res]
    assert gen.compile_count == compiles
    # other ids, same executables
    other = gen.generate_text(PROMPTS, stop_token_ids=[base[1].output_ids[0]], speculative=speculative, **KW)
    assert other[1].output_ids == [] and other[1].finish_reason == "stop" and other[1].text == ""
    assert gen.compile_count == compiles


def test_stop_token_id_and_eos(gen):
    """eos keeps "eos"; a stop id that comes first gives "stop"; eos as a stop id with
    ``stop_at_eos=False`` ends the row as "stop"."""
    eos = gen.generate_text(PROMPTS, max_new_tokens=N)
    res = gen.generate_text(PROMPTS, max_new_tokens=N, stop_token_ids=[250])
    assert [(r.output_ids, r.finish_reason) for r in res] == [(r.output_ids, "eos") for r in eos]
    res = gen.generate_text(PROMPTS, max_new_tokens=N, stop_token_ids=[eos[0].output_ids[-1]])
    assert res[0].output_ids == eos[0].output_ids[:-1] and res[0].finish_reason == "stop"
    res = gen.generate_text(PROMPTS, stop_token_ids=[gen.eos_id], **KW)
    assert [(r.output_ids, r.finish_reason) for r in res] == [(r.output_ids, "stop") for r in eos]


def test_config_eos_list_ends_rows_as_eos(gen, base, tmp_path, capsys):
    """A Hub config's ``eos_token_id`` list: every id in it ends a row with finish "eos" (not
    output), in the loop and with speculative decoding; ``stop_at_eos=False`` and an explicit
    ``eos_id`` leave the further ids alone."""
    import shutil
    eos = gen.generate_text(PROMPTS, max_new_tokens=N)
    tid = eos[2].output_ids[1]   # ("579": "7" ends the third row; the others do not hold it)
    assert tid not in eos[0].output_ids + eos[1].output_ids + eos[2].output_ids[:1]
    d = tmp_path / "ckpt"
    shutil.copytree(dj.demo_checkpoint(), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["eos_token_id"] = [gen.eos_id, tid]
    (d / "config.json").write_text(json.dumps(cfg))
    g = Generator(dj.load(d, mtp=True), Tokenizer.from_dir(d))
    assert g.eos_ids == (gen.eos_id, tid)
    for speculative in (None, "mtp"):
        res = g.generate_text(PROMPTS, max_new_tokens=N, speculative=speculative)
        for r, e in zip(res, eos):
            ids = e.output_ids + ([gen.eos_id] if e.finish_reason == "eos" else [])
            cut = [i for i, t in enumerate(ids) if t in (gen.eos_id, tid)]
            want = (ids[:cut[0]], "eos") if cut else (ids, "length")
            assert (r.output_ids, r.finish_reason) == want
        assert res[2].output_ids == eos[2].output_ids[:1] and res[:2] == eos[:2]
    res = g.generate_text(PROMPTS, **KW)
    assert [r.output_ids for r in res] == [b.output_ids for b in base]
    res = g.generate_text(PROMPTS, max_new_tokens=N, eos_id=gen.eos_id)
    assert [(r.output_ids, r.finish_reason) for r in res] == [(e.output_ids, e.finish_reason) for e in eos]
    with pytest.raises(DeepSeekError, match="further eos ids"):
        g.generate_text(["1+1"], max_new_tokens=2, stop_token_ids=list(range(2, MAX_STOP_TOKEN_IDS + 2)))
    # the command line checks them with the config's further eos ids before anything is printed
    # (the length cap's notice came first, then the error)
    from deepseek_jax.cli import main
    stops = [a for t in range(2, MAX_STOP_TOKEN_IDS + 2) for a in ("--stop-token-id", str(t))]
    capsys.readouterr()
    assert main(["generate", str(d), "--prompt", "1+1", "--max-new-tokens", "100000", *stops]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "further eos ids" in err, err
    assert main(["generate", str(d), "--prompt", "1+1", "--max-new-tokens", "2", "--ignore-eos", *stops]) == 0
    cfg["eos_token_id"] = [gen.eos_id, 10 ** 6]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DeepSeekError, match="list entry 1000000"):
        dj.load(d)


@pytest.mark.parametrize("kwargs, match", [
    (dict(stop_token_ids=[264]), "outside the vocab"),
    (dict(stop_token_ids=[-1]), "outside the vocab"),
    (dict(stop_token_ids=["5"]), "not an integer"),
    (dict(stop_token_ids=[True]), "not an integer"),
    (dict(stop_token_ids=5), "expected a list"),
    (dict(stop_token_ids=list(range(MAX_STOP_TOKEN_IDS + 1))), f"at most {MAX_STOP_TOKEN_IDS}"),
    (dict(stop=""), "must not be empty"),
    (dict(stop=["ok", ""]), "must not be empty"),
    (dict(stop=[3]), "not a string"),
    (dict(stop=b"x"), "expected a string"),
])
def test_bad_stop_input(gen, kwargs, match):
    with pytest.raises(DeepSeekError, match=match) as e:
        gen.generate_text(["1+1"], max_new_tokens=2, **kwargs)
    assert "\n" not in str(e.value)


# ---- CLI -------------------------------------------------------------------------------------
def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_stop_json(gen, base, capsys):
    stops = [base[0].text[2:5]]
    argv = ["generate", dj.demo_checkpoint(), "--max-new-tokens", N, "--temperature", 0, "--ignore-eos", "--json"]
    for p in PROMPTS:
        argv += ["--prompt", p]
    code, out, err = run_cli(capsys, *argv, "--stop", stops[0], "--stop", "zz")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    for row, b in zip(rows, base):
        assert (row["text"], row["output_ids"], row["finish_reason"]) == _expect(gen, b, stops)
    assert rows[0]["finish_reason"] == "stop"
    tid, k = _pick(base[0].output_ids)
    code, out, err = run_cli(capsys, *argv, "--stop-token-id", tid)
    assert code == 0, err
    row = json.loads(out.splitlines()[0])
    assert row["output_ids"] == base[0].output_ids[:k] and row["finish_reason"] == "stop"


def test_cli_stop_streams_the_cut_text(base, capsys):
    code, out, err = run_cli(capsys, "generate", dj.demo_checkpoint(), "--prompt", PROMPTS[0], "--max-new-tokens", N,
                             "--temperature", 0, "--ignore-eos", "--stop", base[0].text[2:5])
    assert code == 0, err
    assert out == base[0].text[:2] + "\n" and "tokens/s" in err


@pytest.mark.parametrize("args, contains", [
    (["--prompt", "1+1", "--stop", ""], "--stop: the stop text must not be empty"),
    (["--prompt", "1+1", "--stop-token-id", "-3"], "--stop-token-id"),
    (["--prompt", "1+1", "--stop-token-id", "999"], "--stop-token-id: stop token id 999 is outside the vocab"),
    (["--prompt", "1+1", *sum((["--stop-token-id", str(i)] for i in range(17)), [])], "at most 16"),
])
def test_cli_stop_bad_input(capsys, args, contains):
    code, _, err = run_cli(capsys, "generate", dj.demo_checkpoint(), *args)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("deepseek-jax generate: error: "), err
    assert contains in lines[0], lines[0]


def test_cli_stop_token_id_needs_an_int(capsys):
    """argparse rejects a non-integer id (its usage error, exit 2)."""
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", dj.demo_checkpoint(), "--prompt", "1+1", "--stop-token-id", "x"])
    assert e.value.code == 2
    assert "--stop-token-id" in capsys.readouterr().err


def test_cli_stop_needs_a_tokenizer(ckpt_a, capsys):
    code, _, err = run_cli(capsys, "generate", ckpt_a, "--prompt-ids", "1,2", "--stop", "x")
    assert code == 2 and "--stop needs the checkpoint's tokenizer" in err and err.count("\n") == 1


def test_stop_completed_by_a_token_that_also_begins_a_character():
    """A byte-level token "b" + 0xC3 completes the stop "ab" and begins "é": the decoder releases
    its text only with the next token, and output_ids kept that next token too (one late)."""
    import tokenizers

    from deepseek_jax.generate import _StopText
    j = json.load(open(os.path.join(dj.demo_checkpoint(), "tokenizer.json"), encoding="utf-8"))
    j["model"]["vocab"]["bÃ"] = max(j["model"]["vocab"].values()) + 1     # byte-level "b" + 0xC3
    j["model"]["merges"] = j["model"].get("merges", []) + [["b", "Ã"]]
    tok = Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(j)))
    ids = tok.encode("xabé", add_bos=False)
    assert len(ids) == 4 and tok.decode(ids[:3]).endswith("\ufffd")        # x, a, b+0xC3, 0xA9
    st = _StopText(tok.stream_decoder(), ["ab"])
    assert st.feed(ids) and st.kept == 3 and st.finish() == "x"


def test_stop_completed_before_a_long_run_of_held_back_tokens():
    """Tokens that each end mid-emoji ("\u0122\u00f0\u0141\u013a": its last byte and the next one's
    first three) hold the text back for as long as they run: output_ids kept tokens past the stop
    (the search looked back 4 tokens at most). With two stop strings, the ids are cut where the
    text is, at the first occurrence."""
    import tokenizers

    from deepseek_jax.generate import _StopText
    j = json.load(open(os.path.join(dj.demo_checkpoint(), "tokenizer.json"), encoding="utf-8"))
    vocab = j["model"]["vocab"]
    for t in ("\u00f0\u0141\u013a", "\u0122\u00f0\u0141\u013a"):   # F0 9F 98 | 80 F0 9F 98 (byte-level)
        vocab[t] = max(vocab.values()) + 1
    tok = Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(j)))
    a, b = tok.encode("ab", add_bos=False)
    head, mid = vocab["\u00f0\u0141\u013a"], vocab["\u0122\u00f0\u0141\u013a"]
    ids = [a, b, head, *[mid] * 6, vocab["\u0122"]]
    assert tok.decode(ids) == "ab" + "\U0001F600" * 7
    st = _StopText(tok.stream_decoder(), ["\U0001F600"])
    assert st.feed(ids) and st.finish() == "ab" and st.kept == 4   # its 4th token completed the first emoji
    assert tok.decode(ids[:4]) == "ab\U0001F600\ufffd" and tok.decode(ids[:3]) == "ab\ufffd"
    st = _StopText(tok.stream_decoder(), ["ab\U0001F600\U0001F600", "\U0001F600"])
    assert st.feed(ids) and st.finish() == "" and st.kept == 5   # "ab" + 2 emoji: through the 5th token
