"""``dj.loglikelihood`` (log p(continuation | context) and is_greedy, the lm-evaluation-harness
primitive) against HF transformers' ``deepseek_v3`` on CPU in float32, and ``deepseek-jax score --pairs``."""

from __future__ import annotations

import json

import numpy as np
import pytest

import deepseek_jax as dj
from deepseek_jax import cli
from deepseek_jax.checkpoint import load_hub
from deepseek_jax.scoring import Likelihood, loglikelihood
from deepseek_jax.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def model_a(ckpt_a):
    return load_hub(ckpt_a)


def _hf_scores(hf, ctx, cont):
    """HF's (summed log-prob, per-token log-probs, is_greedy, top-1 minus top-2 margin at each
    continuation position), the request scored alone, unpadded."""
    import torch
    ids = torch.tensor([list(ctx) + list(cont)])
    with torch.no_grad():
        logits = hf(input_ids=ids).logits[0].double()
    rows = logits[len(ctx) - 1:-1]                     # row t predicts token t + 1
    lp = torch.log_softmax(rows, -1)[torch.arange(len(cont)), torch.tensor(cont)].numpy()
    top2 = rows.topk(2, -1).values
    greedy = bool((rows.argmax(-1) == torch.tensor(cont)).all())
    return float(lp.sum()), lp, greedy, (top2[:, 0] - top2[:, 1]).numpy()


def _hf_greedy(hf, ctx, n):
    """``n`` tokens greedy-decoded by HF after ``ctx`` (full recompute per step: tiny model)."""
    import torch
    ids = list(ctx)
    for _ in range(n):
        with torch.no_grad():
            ids.append(int(hf(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(ctx):]


def test_matches_hf(ckpt_a, model_a, monkeypatch):
    """Mixed lengths in batches of 4 (two length buckets, 16 and 64), a 1-token context, 1-token and
    long continuations, HF's own greedy continuation (is_greedy True), and that continuation with
    its last token changed (False), a context whose three answers run over its cached latents
    (one of them HF's greedy continuation): summed log-probs within 1e-4, is_greedy equal to HF's
    argmax."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tests import hf_ref
    hf, _ = hf_ref.hf_model(ckpt_a)
    V = model_a.cfg.vocab_size
    rng = np.random.default_rng(11)
    r = lambda n: rng.integers(0, V, n).tolist()  # noqa: E731
    greedy_ctx = r(9)
    greedy_cont = _hf_greedy(hf, greedy_ctx, 5)
    wrong_last = greedy_cont[:-1] + [(greedy_cont[-1] + 1) % V]
    long_ctx = r(37)
    requests = [
        (r(1), r(3)),                           # one context token
        (greedy_ctx, greedy_cont),              # greedy: True
        (long_ctx, r(20)),                      # 57 tokens: the 64 bucket
        (greedy_ctx, wrong_last),               # greedy up to the last token: False
        (np.asarray(r(6), np.int64), np.asarray(r(1), np.int16)),   # numpy arrays of any int type
        (long_ctx, _hf_greedy(hf, long_ctx, 3)),    # greedy, in the long bucket
    ]
    cached_ctx = r(60)    # three short answers after a long context: prefilled once, answers over its cache
    requests += [(cached_ctx, _hf_greedy(hf, cached_ctx, 4)), (cached_ctx, r(5)), (cached_ctx, r(2))]
    from deepseek_jax import scoring
    cached, real = [], scoring._context_pass

    def recorded(model, ids_BT, last_B, *args, **kw):   # the real pass; records its contexts
        cached.extend(tuple(np.asarray(ids_BT)[b, :int(last_B[b]) + 1]) for b in range(ids_BT.shape[0]))
        return real(model, ids_BT, last_B, *args, **kw)
    monkeypatch.setattr(scoring, "_context_pass", recorded)
    got = loglikelihood(model_a, requests, batch_size=4)
    assert cached == [tuple(cached_ctx)], len(cached)     # the others are scored as rows
    assert len(got) == len(requests) and all(isinstance(g, Likelihood) for g in got)
    flags = []
    for i, ((ctx, cont), g) in enumerate(zip(requests, got)):
        ctx, cont = [int(t) for t in ctx], [int(t) for t in cont]
        ref_sum, ref_lp, ref_greedy, margin = _hf_scores(hf, ctx, cont)
        assert g.tokens == len(cont) and g.token_logprobs.shape == (len(cont),), i
        assert g.token_logprobs.dtype == np.float32 and isinstance(g.logprob, float), i
        # float32 sums of ~20 logprobs of ~25 each: a few ulps of the sum apart (1.03e-4 at -474
        # with XLA's CPU compiler at optimization level 0, as tests/conftest.py runs it)
        assert abs(g.logprob - ref_sum) <= 1e-4 + 1e-6 * abs(ref_sum), (i, g.logprob, ref_sum)
        np.testing.assert_allclose(g.token_logprobs, ref_lp, rtol=0, atol=5e-5, err_msg=str(i))
        assert g.is_greedy is ref_greedy, i
        assert margin.min() > 1e-3, (i, margin)     # no near-tie: the argmax is not a rounding accident
        flags.append(g.is_greedy)
    assert flags == [False, True, False, False, False, True, True, False, False]


def test_shared_rows_equal_separate_rows(model_a):
    """Requests that differ only in their last token share one row (multiple choice with one-token
    answers): the same numbers as each request scored as its own row. Sets of 1, 2, 3 and 5
    requests (5: an 8-wide slot of other tokens), multi-token continuations sharing all but the
    last token, the same last token under two contexts, batches of 2 rows."""
    V = model_a.cfg.vocab_size
    rng = np.random.default_rng(5)
    r = lambda n: rng.integers(0, V, n).tolist()  # noqa: E731
    q1, q2, q3 = r(7), r(20), r(3)
    requests = [(q1, [t]) for t in r(5)]                               # five one-token answers
    requests += [(q2, [4, 9, t]) for t in r(3)]                        # three, sharing [4, 9]
    requests += [(q3, [t]) for t in r(2)] + [(r(11), r(2))]            # two; one alone
    requests += [(q1 + [5], [6]), (q1, [5, 6])]                        # same tokens, split apart
    rng.shuffle(requests)
    shared = loglikelihood(model_a, requests, batch_size=2)
    alone = loglikelihood(model_a, requests, batch_size=2, share=False)
    for i, (a, b) in enumerate(zip(shared, alone)):
        assert a.tokens == b.tokens and a.is_greedy == b.is_greedy, i
        np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, rtol=0, atol=2e-5, err_msg=str(i))
        assert abs(a.logprob - b.logprob) <= 5e-5, i


def test_cached_contexts_equal_separate_rows(model_a, monkeypatch):
    """Contexts continued by several answers of several tokens are prefilled once into the latent
    cache, their answers run over copies of it: the same numbers as each request scored as its own
    row. Answers of 1, 2, 16 and 17 tokens (two continuation buckets), 2 to 6 answers per context,
    continuation passes of 2 and 4 rows (two of them for one context), a one-token context, a
    duplicate request, a context whose padded answers run past ``max_position_embeddings``; beside
    them, contexts scored as rows: one with a single answer, one with one-token answers only, and
    one whose answers are as long as it is (caching would cost more passes than it saves)."""
    from deepseek_jax import scoring
    V, limit = model_a.cfg.vocab_size, model_a.cfg.max_position_embeddings
    rng = np.random.default_rng(8)
    r = lambda n: rng.integers(0, V, n).tolist()  # noqa: E731
    q1, q2, q3, q4, q5, edge = r(40), r(30), r(1), r(12), r(5), r(limit - 17)
    requests = [(q1, r(n)) for n in (1, 2, 16, 17, 3, 1)]                       # six answers
    requests += [(q2, r(2)), (q2, r(5))] + [(q3, r(4)), (q3, r(1))]             # two each
    requests += [(q3, requests[-2][1]), (edge, r(17)), (edge, r(2))]            # a duplicate; the edge
    requests += [(q4, [t]) for t in r(3)] + [(r(9), r(6))]                      # rows: shared last token; alone
    requests += [(q5, r(12)), (q5, r(14))]                                      # rows: not worth caching
    rng.shuffle(requests)
    cached_ctx, real, real_cont = [], scoring._context_pass, scoring._continuation_pass
    cont_rows = []

    def recorded(model, ids_BT, last_B, *args, **kw):   # the real pass; records its contexts
        ids, last = np.asarray(ids_BT), np.asarray(last_B)
        cached_ctx.extend(tuple(ids[b, :last[b] + 1]) for b in range(ids.shape[0]))
        return real(model, ids_BT, last_B, *args, **kw)
    def recorded_cont(model, cache, row_B, *args, **kw):   # the real pass; records its rows
        cont_rows.append(row_B.shape[0])
        return real_cont(model, cache, row_B, *args, **kw)
    monkeypatch.setattr(scoring, "_context_pass", recorded)
    monkeypatch.setattr(scoring, "_continuation_pass", recorded_cont)
    cached = loglikelihood(model_a, requests, batch_size=1)
    assert len(cached_ctx) == 4 and set(cached_ctx) == {tuple(q) for q in (q1, q2, q3, edge)}, len(cached_ctx)
    assert sorted(cont_rows) == [2, 2, 4, 4, 4], cont_rows   # q1 (r=2): two passes; q2, q3, edge: one
    alone = loglikelihood(model_a, requests, batch_size=2, share=False)
    assert len(cached_ctx) == 4
    for i, (a, b) in enumerate(zip(cached, alone)):
        assert a.tokens == b.tokens == len(requests[i][1]) and a.is_greedy == b.is_greedy, i
        np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, rtol=0, atol=3e-5, err_msg=str(i))
        assert abs(a.logprob - b.logprob) <= 2e-4, i


@pytest.mark.parametrize("requests, kw, needle", [
    ([], {}, "requests is empty"),
    ("1 2", {}, "requests must be a list"),
    ([([1], [2], [3])], {}, "request 0: expected a (context_ids, continuation_ids) pair"),
    ([([1], [2]), 5], {}, "request 1: expected a"),
    ([([1], [2]), ([], [2])], {}, "request 1: context: empty: no token ids"),
    ([([1], [])], {}, "request 0: continuation: empty: no token ids"),
    ([([1], [2]), ([1, 2], [256])], {}, "request 1: continuation: token id 256 at [0, 0] is outside the vocab"),
    ([([[1, 2]], [3])], {}, "request 0: context: expected a 1-D list"),
    ([([1.0], [3])], {}, "request 0: context: expected integer token ids"),
    ([("12+3", "4")], {}, "request 0: context: text where token ids are expected: encode it first"),
    ([([1] * 200, [2] * 57)], {}, "request 0: context + continuation is 257 tokens, over max_position_embeddings 256"),
    ([([1], [2])], {"batch_size": 0}, "batch_size must be an integer >= 1"),
])
def test_bad_requests(model_a, requests, kw, needle):
    with pytest.raises(dj.DeepSeekError) as e:
        loglikelihood(model_a, requests, **kw)
    assert str(e.value).startswith("loglikelihood: ") and needle in str(e.value) and "\n" not in str(e.value)


def _write(tmp_path, rows):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return str(path)


def test_score_pairs(tmp_path, capsys):
    """Text pairs and id pairs in one file on the demo model (trained on addition in the chat format):
    its right answer is its greedy continuation, a wrong one is not; results equal the library's."""
    demo = dj.demo_checkpoint()
    tok = Tokenizer.from_dir(demo)
    ctx = "<｜User｜>846+483<｜Assistant｜>"
    chat_ids = tok.encode(ctx)
    rows = [
        {"context": ctx, "continuation": "1329"},
        {"context": ctx, "continuation": "1328"},
        "",                                                          # blank: skipped, numbering kept
        {"context_ids": chat_ids, "continuation_ids": tok.encode("1329", add_bos=False)},
        {"context_ids": [5], "continuation_ids": [7, 8, 9]},
        {"context": "", "continuation": "The sea"},                  # empty context: just bos
    ]
    path = _write(tmp_path, rows)
    rc = cli.main(["score", demo, "--pairs", path, "--json", "--batch-size", "2"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    got = [json.loads(x) for x in out]
    assert [g["line"] for g in got[:-1]] == [1, 2, 4, 5, 6]
    requests = [(chat_ids, tok.encode("1329", add_bos=False)), (chat_ids, tok.encode("1328", add_bos=False)),
                (chat_ids, tok.encode("1329", add_bos=False)), ([5], [7, 8, 9]),
                ([tok.bos_id], tok.encode("The sea", add_bos=False))]
    ref = dj.loglikelihood(dj.load(demo), requests, batch_size=2)
    for g, r in zip(got[:-1], ref):
        assert g["tokens"] == r.tokens and g["is_greedy"] == r.is_greedy
        assert g["logprob"] == pytest.approx(r.logprob, abs=1e-4)
    assert [g["is_greedy"] for g in got[:-1]] == [True, False, True, False, False]
    assert got[0]["logprob"] == pytest.approx(got[2]["logprob"], abs=1e-5)      # text == its ids
    assert got[0]["logprob"] > got[1]["logprob"] + 3                             # the right answer wins
    total = got[-1]["total"]
    assert total["requests"] == 5 and total["greedy"] == 2 and total["greedy_accuracy"] == pytest.approx(0.4)
    assert total["logprob"] == pytest.approx(sum(r.logprob for r in ref), abs=1e-4)
    assert total["tokens"] == sum(r.tokens for r in ref)
    # the human form: one line per pair and a total
    assert cli.main(["score", demo, "--pairs", path]) == 0
    text = capsys.readouterr().out.splitlines()
    assert len(text) == 6 and text[0].startswith("line 1: log p ") and text[0].endswith(", greedy")
    assert text[1].endswith("not greedy") and text[-1].startswith("total: 5 pairs, 2 greedy (40.00%)")


def test_score_pairs_split_text_as_the_harness_does(tmp_path, capsys):
    """``score --pairs`` said "as lm-evaluation-harness" but encoded the continuation apart: a
    context ending in a space scored 5 tokens where the harness scores 6. Now each text pair's
    log-likelihood, token count and greedy flag equal lm_eval's own split (TemplateLM) through
    the harness backend."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from deepseek_jax.harness import DeepSeekLM
    demo = dj.demo_checkpoint()
    pairs = [("hello ", "world"), ("hello", " world"), ("<｜User｜>846+483<｜Assistant｜>", "1329"),
             ("", "The sea"), ("a  ", " b"), ("12+", "30=42")]
    path = _write(tmp_path, [{"context": c, "continuation": x} for c, x in pairs])
    assert cli.main(["score", demo, "--pairs", path, "--json"]) == 0
    got = [json.loads(x) for x in capsys.readouterr().out.splitlines()[:-1]]
    lm = DeepSeekLM(demo, batch_size=4)
    want = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
    for g, (lp, greedy) in zip(got, want):
        assert g["logprob"] == pytest.approx(lp, abs=1e-4) and g["is_greedy"] == greedy
    assert got[0]["logprob"] == pytest.approx(got[1]["logprob"], abs=1e-5) and got[0]["tokens"] == got[1]["tokens"]
    assert [g["tokens"] for g in got] == [len(lm._encode_pair(c, x)[1]) if c else len(lm.tok_encode(x, False))
                                          for c, x in pairs]


@pytest.mark.parametrize("rows, extra, needle", [
    (['{"context": "a", "continuation": "b"', ], [], "--pairs: line 1: not valid JSON"),
    (['{"context": "a", "continuation": "b"}', "[1, 2]"], [], "--pairs: line 2: expected a JSON object, got list"),
    ([{"context": "a"}], [], "--pairs: line 1: expected keys \"context\" and \"continuation\""),
    ([{"context": "a", "continuation": "b", "context_ids": [1], "continuation_ids": [2]}], [], "not both"),
    (["", {"context": "a", "continuation": ""}], [], "--pairs: line 2: \"continuation\" is empty"),
    ([{"context": "a", "continuation": "b"}, {"context": "a\ud800", "continuation": "b"}], [],
     "--pairs: line 2: text holds a lone surrogate"),
    ([{"context": 3, "continuation": "b"}], [], "line 1: \"context\" must be a string, got int"),
    ([{"context_ids": [], "continuation_ids": [2]}], [], "line 1: \"context_ids\" is empty"),
    ([{"context_ids": [1], "continuation_ids": [2.0]}], [], "\"continuation_ids\" must be a list of integer token ids"),
    ([{"context_ids": [1], "continuation_ids": [True]}], [], "\"continuation_ids\" must be a list of integer"),
    ([{"context_ids": [1], "continuation_ids": [2]}, {"context_ids": [1], "continuation_ids": [264]}], [],
     "--pairs: line 2: continuation token id 264 is outside the vocab [0, 264)"),
    ([{"context_ids": [-1], "continuation_ids": [2]}], [], "line 1: context token id -1 is outside the vocab"),
    ([{"context_ids": [1] * 100, "continuation_ids": [2] * 29}], [],
     "--pairs: line 1 is 129 tokens (context + continuation), over the model's max_position_embeddings 128"),
    (["  ", ""], [], "--pairs: {path} holds no text"),
    ([{"context_ids": [1], "continuation_ids": [2]}], ["--out", "{tmp}/x.npy"], "--out does not apply to --pairs"),
    ([{"context_ids": [1], "continuation_ids": [2]}], ["--batch-size", "0"], "--batch-size must be >= 1"),
    ([{"context_ids": [1], "continuation_ids": [2]}], ["--text-file", "{path}"], "not allowed with argument"),
])
def test_score_pairs_bad_input(tmp_path, capsys, rows, extra, needle):
    path = _write(tmp_path, rows)
    argv = ["score", dj.demo_checkpoint(), "--pairs", path] + [a.format(tmp=tmp_path, path=path) for a in extra]
    try:
        rc = cli.main(argv)
    except SystemExit as e:      # argparse's own usage errors
        rc = e.code
    out, err = capsys.readouterr()
    assert rc == 2 and needle.format(path=path) in err and out == "", err
    if "not allowed" not in needle:
        assert err.count("\n") == 1 and err.startswith("deepseek-jax score: error: "), err
    assert not (tmp_path / "x.npy").exists()


def test_score_pairs_without_tokenizer(ckpt_a, tmp_path, capsys):
    """ckpt_a has no tokenizer: id pairs are scored, a text pair names its line."""
    path = _write(tmp_path, [{"context_ids": [1, 2], "continuation_ids": [3]},
                             {"context": "a", "continuation": "b"}])
    assert cli.main(["score", ckpt_a, "--pairs", path]) == 2
    err = capsys.readouterr().err
    assert "--pairs: line 2 holds text, but" in err and "no tokenizer.json" in err and err.count("\n") == 1
    path = _write(tmp_path, [{"context_ids": [1, 2], "continuation_ids": [3, 4]}])
    assert cli.main(["score", ckpt_a, "--pairs", path, "--json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert rows[0]["line"] == 1 and rows[0]["tokens"] == 2 and rows[1]["total"]["requests"] == 1
