"""lm-evaluation-harness backend (deepseek_jax.harness) against lm_eval's own HF backend (HFLM)
over HF transformers' deepseek_v3 with the same weights: the same requests through the same
harness code must give the same answers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import deepseek_jax as dj
from deepseek_jax.errors import DeepSeekError

from lm_eval.api.instance import Instance   # a test dependency: missing, the file fails, not skips

from deepseek_jax.harness import DeepSeekLM

MAX_LENGTH = 32     # small, so that rolling windows and left truncation are exercised


@pytest.fixture(scope="module")
def demo():
    return dj.demo_checkpoint()


@pytest.fixture(scope="module")
def ours(demo):
    return DeepSeekLM(demo, batch_size=4, max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def hf(demo):
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    from tests.hf_ref import hf_model
    model, _ = hf_model(demo)
    return HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(demo), batch_size=4, device="cpu",
                max_length=MAX_LENGTH)


def _chat(lm: DeepSeekLM, question: str) -> str:
    """The demo model's prompt format; it starts with the bos text, so neither side adds one (HF's
    tokenizer for this tokenizer.json ignores add_bos_token, ours follows it)."""
    return lm.tokenizer.apply_chat_template([{"role": "user", "content": question}])


def test_loglikelihood_matches_hf(ours, hf):
    reqs = [("846+483", "1329"), ("846+483", "1328"), ("50+563", "613"), ("98+96", "194"), ("7+183", "19")]
    inst = [Instance("loglikelihood", {}, (_chat(ours, q), a), i) for i, (q, a) in enumerate(reqs)]
    inst.append(Instance("loglikelihood", {}, (_chat(ours, "1+1") + " ", "2"), len(inst)))  # trailing space moves
    inst.append(Instance("loglikelihood", {}, ("", "12+34"), len(inst)))                     # empty context: bos
    # a context longer than max_length is cut on the left (both sides the same way)
    inst.append(Instance("loglikelihood", {}, (_chat(ours, "1+2+3+4+5+6+7+8+9+10+11+12+13"), "91"), len(inst)))
    got, want = ours.loglikelihood(inst, disable_tqdm=True), hf.loglikelihood(inst, disable_tqdm=True)
    for (lp, greedy), (hlp, hgreedy) in zip(got, want):
        assert lp == pytest.approx(hlp, abs=1e-4, rel=1e-5)
        assert greedy == hgreedy
    flags = [g for _, g in got]
    assert flags[0] and not flags[1]          # the right sum is the greedy answer, the wrong one is not


def test_loglikelihood_at_the_models_whole_length(demo, ours, hf):
    """max_length = max_position_embeddings: a longer request keeps that many tokens in all (HF's
    backend keeps one more, fed but for its last); equal to HF's at max_length - 1."""
    from lm_eval.models.huggingface import HFLM
    limit = ours.model.cfg.max_position_embeddings
    full = DeepSeekLM(model=ours.model, tokenizer=ours.tokenizer, batch_size=2, max_length=limit)
    hf_short = HFLM(pretrained=hf.model, tokenizer=hf.tokenizer, batch_size=2, device="cpu", max_length=limit - 1)
    ctx = _chat(ours, "+".join(str(i) for i in range(1, 60)))
    assert len(ours.tok_encode(ctx)) > limit
    inst = [Instance("loglikelihood", {}, (ctx, "1770"), 0), Instance("loglikelihood", {}, (ctx, "17"), 1)]
    got, want = full.loglikelihood(inst, disable_tqdm=True), hf_short.loglikelihood(inst, disable_tqdm=True)
    for (lp, greedy), (hlp, hgreedy) in zip(got, want):
        assert lp == pytest.approx(hlp, abs=1e-4, rel=1e-5) and greedy == hgreedy


def test_loglikelihood_rolling_matches_hf(demo, ours, hf):
    texts = ["846+483=1329", "a text long enough to need more than one window of " + "digits 0123456789 " * 4, ""]
    inst = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    assert len(ours.tok_encode(texts[1], add_special_tokens=False)) > 2 * MAX_LENGTH
    got, want = ours.loglikelihood_rolling(inst, disable_tqdm=True), hf.loglikelihood_rolling(inst, disable_tqdm=True)
    assert got == pytest.approx(want, abs=1e-3, rel=1e-5)
    assert got[2] == 0.0                          # an empty document: no windows
    # the default max_length is the demo model's whole length: windows one token narrower (what
    # the model can take with the one context token), as HF's backend at max_length - 1
    from lm_eval.models.huggingface import HFLM
    limit = ours.model.cfg.max_position_embeddings
    full = DeepSeekLM(model=ours.model, tokenizer=ours.tokenizer, batch_size=2)
    hf_short = HFLM(pretrained=hf.model, tokenizer=hf.tokenizer, batch_size=2, device="cpu", max_length=limit - 1)
    inst = [Instance("loglikelihood_rolling", {}, ("846+483=1329 " * 30,), 0)]
    assert len(ours.tok_encode(inst[0].args[0], add_special_tokens=False)) > 2 * limit
    assert full.loglikelihood_rolling(inst, disable_tqdm=True) == pytest.approx(
        hf_short.loglikelihood_rolling(inst, disable_tqdm=True), abs=1e-3, rel=1e-5)


def test_bad_arguments(demo, ours):
    with pytest.raises(DeepSeekError, match="unknown argument.*flavour"):
        DeepSeekLM(demo, flavour="x")
    with pytest.raises(DeepSeekError, match="batch_size must be a positive integer"):
        DeepSeekLM(demo, batch_size="0")
    with pytest.raises(DeepSeekError, match="exceeds the model's max_position_embeddings"):
        DeepSeekLM(demo, max_length=10 ** 6)
    with pytest.raises(DeepSeekError, match="either pretrained=DIR or model="):
        DeepSeekLM()
    with pytest.raises(DeepSeekError, match="seed must be an integer, got 'abc'"):
        DeepSeekLM(model=ours.model, tokenizer=ours.tokenizer, seed="abc")
    with pytest.raises(DeepSeekError, match="prefill attention 'fast' unsupported"):
        DeepSeekLM(demo, prefill_attention="fast")
    with pytest.raises(DeepSeekError, match="prefill_attention apply to pretrained"):
        DeepSeekLM(model=ours.model, tokenizer=ours.tokenizer, prefill_attention="flash")
    assert DeepSeekLM(demo, prefill_attention="flash").model.prec.prefill_attention == "flash"
    with pytest.raises(DeepSeekError, match="ep_capacity: expected a number > 0 or 'worst', got '0'"):
        DeepSeekLM(demo, ep_capacity="0")
    with pytest.raises(DeepSeekError, match="ep_capacity apply to pretrained"):
        DeepSeekLM(model=ours.model, tokenizer=ours.tokenizer, ep_capacity="worst")
    assert DeepSeekLM(demo, ep_capacity="0.5").model.prec.ep_capacity == 0.5   # as --model_args passes it
    assert DeepSeekLM(demo, ep_capacity="worst").model.prec.ep_capacity is None
    with pytest.raises(DeepSeekError, match="continuation alone has"):
        ours.loglikelihood([Instance("loglikelihood", {}, ("1", "9" * 40), 0)], disable_tqdm=True)
    with pytest.raises(DeepSeekError, match="path must be a string"):   # (not os.fspath's TypeError)
        DeepSeekLM(123)
    with pytest.raises(DeepSeekError, match="dtype apply to pretrained"):   # a bf16 evaluation ran in float32
        DeepSeekLM(model=ours.model, tokenizer=ours.tokenizer, dtype="bfloat16")
    # lm_eval's own request number (the requests are regrouped by length before scoring)
    reqs = [(None, [1, 2, 3, 4, 5, 6], [7]), (None, [1, 2], [3]), (None, [7], [10 ** 6]), (None, [4], [5])]
    with pytest.raises(DeepSeekError, match=r"request 2: token id 1000000 is outside the model's vocab"):
        ours._loglikelihood_tokens(reqs, disable_tqdm=True)


def test_lm_eval_command_line(demo, tmp_path):
    """`python -m deepseek_jax.harness` is lm_eval's own CLI with this backend: a local
    multiple-choice task (held-out additions of the demo model, three choices each)."""
    from deepseek_jax.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(demo)
    rows = []
    for a, b in [(846, 483), (50, 563), (760, 792), (98, 96), (7, 183), (949, 412)]:
        s = a + b
        rows.append({"context": tok.apply_chat_template([{"role": "user", "content": f"{a}+{b}"}]),
                     "choices": [str(s + 1), str(s), str(s - 10)], "label": 1})
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "demo_addition.yaml").write_text(
        "task: demo_addition\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'data.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        'target_delimiter: ""\nmetric_list:\n  - metric: acc\n    higher_is_better: true\n')
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-m", "deepseek_jax.harness", "--model", "deepseek_jax",
                        "--model_args", f"pretrained={demo},batch_size=4", "--tasks", "demo_addition",
                        "--include_path", str(tmp_path), "--output_path", str(tmp_path / "out")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    [result] = list((tmp_path / "out").rglob("results_*.json"))
    acc = json.loads(result.read_text())["results"]["demo_addition"]["acc,none"]
    assert acc == 1.0, r.stdout[-2000:]
    # a user's mistake ends the command with one line, not a traceback
    r = subprocess.run([sys.executable, "-m", "deepseek_jax.harness", "--model", "deepseek_jax",
                        "--model_args", f"pretrained={demo},batch_size=abc", "--tasks", "demo_addition",
                        "--include_path", str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == \
        "deepseek_jax.harness: error: batch_size must be a positive integer, got 'abc'"
    assert "Traceback" not in r.stderr


def test_generate_until_matches_hf(ours, hf):
    """Greedy generation with stop strings: the same text as HF's generate through HFLM."""
    def req(i, q, **kw):
        return Instance("generate_until", {}, (_chat(ours, q), {"do_sample": False, **kw}), i)
    inst = [req(0, "846+483", until=["\n"], max_gen_toks=8),
            req(1, "846+483", until=["2"], max_gen_toks=8),       # cut inside the answer: "13"
            req(2, "50+563", until=["1", "9"], max_gen_toks=8),   # the earliest of two
            req(3, "949+412", max_gen_toks=2),                    # no stop: the length cuts it
            req(4, "98+96", until="4", max_gen_toks=8)]
    got, want = ours.generate_until(inst, disable_tqdm=True), hf.generate_until(inst, disable_tqdm=True)
    assert got == want
    assert got[:4] == ["1329", "13", "6", "13"]


def test_generate_until_bad_settings(ours):
    with pytest.raises(DeepSeekError, match="unsupported generation setting.*num_beams"):
        ours.generate_until([Instance("generate_until", {}, ("1+1", {"num_beams": 4}), 0)], disable_tqdm=True)
    with pytest.raises(DeepSeekError, match="'until' must be a string or a list of strings"):
        ours.generate_until([Instance("generate_until", {}, ("1+1", {"until": [3]}), 0)], disable_tqdm=True)
    for key, value, what in (("temperature", "abc", "a number"), ("top_k", "abc", "an integer"),
                             ("seed", "x", "an integer"), ("max_gen_toks", 0, "a positive integer")):
        with pytest.raises(DeepSeekError, match=f"request 0: {key} must be {what}"):
            ours.generate_until([Instance("generate_until", {}, ("1+1", {key: value, "do_sample": True}), 0)],
                                disable_tqdm=True)


def test_generate_until_default_budget_fits(ours):
    """Without max_gen_toks a request gets 256 new tokens at most, or half of max_length."""
    lm = DeepSeekLM(model=ours.model, tokenizer=ours.tokenizer)    # max_length: the demo's 128
    assert lm.max_gen_toks == 64
    [text] = lm.generate_until([Instance("generate_until", {}, (_chat(ours, "50+563"), {"until": ["\n"]}), 0)],
                               disable_tqdm=True)
    assert text == "613"


def test_sampled_repeats_differ_whatever_the_batch_size(ours):
    """Sampled repeats of one request (lm-eval's ``repeats``: self-consistency, pass@k) are
    independent draws: each batch re-drew the first batch's samples (2 distinct among 6 at batch
    size 2), and the samples depended on the batch size."""
    req = (_chat(ours, "846+483"), {"until": ["\n"], "max_gen_toks": 6, "do_sample": True, "temperature": 5.0})
    inst = [Instance("generate_until", {}, req, i) for i in range(6)]
    at4 = ours.generate_until(inst, disable_tqdm=True)
    at2 = DeepSeekLM(model=ours.model, tokenizer=ours.tokenizer, batch_size=2,
                     max_length=MAX_LENGTH).generate_until(inst, disable_tqdm=True)
    assert at2 == at4
    assert len(set(at4)) >= 5


def test_chat_template_continues_a_gen_prefix(ours, hf):
    """lm-eval renders a task's ``gen_prefix`` as the last (assistant) message with
    ``add_generation_prompt=False``: the prompt must end with it, as HF's backend renders it, not
    with the eos that closes an assistant turn."""
    history = [{"role": "user", "content": "846+483"}, {"role": "assistant", "content": "Sum:"}]
    got = ours.apply_chat_template(history, add_generation_prompt=False)
    assert got == hf.apply_chat_template(history, add_generation_prompt=False)
    assert got.endswith("Sum:")
    assert ours.apply_chat_template(history[:1]) == hf.apply_chat_template(history[:1])
    # a prefix that recurs in the eos the template closes the turn with, or only whitespace: the
    # text was cut inside that eos ("...s<｜end▁of▁s"), or kept it
    for prefix in ("s", "end", " ", " Sum: "):
        h = [history[0], {"role": "assistant", "content": prefix}]
        assert ours.apply_chat_template(h, add_generation_prompt=False) == \
            hf.apply_chat_template(h, add_generation_prompt=False), prefix


def test_tokenizer_name_tells_templates_apart(ours, tmp_path):
    """lm-eval keys its request cache by ``tokenizer_name``: it was one constant, so a second
    checkpoint with another chat template was served the first one's rendered prompts."""
    import json
    import shutil

    from deepseek_jax.tokenizer import Tokenizer
    d = tmp_path / "other"
    shutil.copytree(ours.tokenizer._source, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "SYSTEM " + cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    other = DeepSeekLM(model=ours.model, tokenizer=Tokenizer.from_dir(d), max_length=MAX_LENGTH)
    same = DeepSeekLM(model=ours.model, tokenizer=Tokenizer.from_dir(ours.tokenizer._source), max_length=MAX_LENGTH)
    assert other.tokenizer_name != ours.tokenizer_name == same.tokenizer_name
