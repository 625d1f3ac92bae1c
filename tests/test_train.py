"""Training: loss decrease, gradients vs finite differences, the routing-bias update, the MTP loss
term, exact resume, Hub export, and the ``train`` CLI.

Every test uses one tiny float32 config and one TrainConfig (loss coefficients are traced, not
compiled in), so the whole file compiles the train step once.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import api
from deepseek_jax.hub import HubReader, hub_tensor_specs, spec_mismatches
from deepseek_jax.quant import Precision
from deepseek_jax.synthetic import random_hub_checkpoint, tiny_config
from deepseek_jax.tasks import make_dataset
from deepseek_jax.tokenizer import TINY_TOKENIZER_DIR, Tokenizer
from deepseek_jax.train import (TrainConfig, Trainer, cast_params, export_hub, load_float_model,
                                model_logits)

# 1 dense + 1 MoE layer + MTP, 8 experts in 2 groups (top-1 group, 2 experts per token), vocab of
# the tiny tokenizer.
CFG = tiny_config(vocab_size=512, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                  num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2,
                  q_lora_rank=32, kv_lora_rank=16, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                  topk_group=1, max_position_embeddings=64)
STEPS = 30
TCFG = TrainConfig(steps=STEPS, lr=1e-2, warmup=3, weight_decay=0.01, mtp_weight=0.3, balance_alpha=1e-4,
                   bias_gamma=0.0)
GAMMA = 0.01


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory) -> str:
    """Random initial weights (router biases zero) in the Hub layout."""
    d = random_hub_checkpoint(tmp_path_factory.mktemp("init"), CFG, seed=3, fp8=False, bias_range=(0.0, 0.0))
    return str(d)


def fresh_model(init_dir):
    return load_float_model(init_dir)


@pytest.fixture(scope="module")
def data():
    return make_dataset("synthetic:addition", batch_size=16, seed=0)


def run(trainer, data, steps, start=0):
    return [jax.device_get(trainer.train_step(data.batch_at(s))) for s in range(start, start + steps)]


@pytest.fixture(scope="module")
def runs(init_dir, data):
    """30 steps from the same initialisation on the same data: (lr, gamma) -> (trainer, metrics).
    The learning rate is traced like gamma: all four runs share one compiled step."""
    out = {}
    for lr, gamma in ((TCFG.lr, GAMMA), (3e-3, 0.0), (3e-3, GAMMA)):
        trainer = Trainer(fresh_model(init_dir), TrainConfig(**{**TCFG.__dict__, "lr": lr, "bias_gamma": gamma}))
        out[lr, gamma] = (trainer, run(trainer, data, STEPS))
    return out


def test_loss_decreases(runs):
    hist = runs[TCFG.lr, GAMMA][1]
    loss = np.array([m["loss"] for m in hist])
    mtp = np.array([m["mtp_ce"] for m in hist])
    assert np.all(np.isfinite(loss))
    assert loss[-5:].mean() < 0.4 * loss[:3].mean(), loss
    assert mtp[-5:].mean() < 0.5 * mtp[:3].mean(), mtp
    # Metrics are what they claim: tokens are the real tokens, lr follows the warmup.
    assert hist[0]["tokens"] == float(data_valid_tokens(0))
    assert hist[0]["lr"] == pytest.approx(TCFG.lr / 3)


def data_valid_tokens(step):
    return make_dataset("synthetic:addition", batch_size=16, seed=0).batch_at(step).valid.sum()


def test_bias_update_reduces_imbalance(runs):
    """max/mean expert load (averaged over the MoE layer and the MTP block), same model, same data,
    same learning rate: the sign rule keeps the load far more even than gamma = 0."""
    (t0, h0), (t1, h1) = runs[3e-3, 0.0], runs[3e-3, GAMMA]
    imb0 = np.array([m["imbalance"] for m in h0])
    imb1 = np.array([m["imbalance"] for m in h1])
    assert imb0[0] == pytest.approx(imb1[0])  # same model, same data at step 0
    # Measured: gamma = 0 drifts from 1.5 to ~3.0 (of at most E/K = 4); gamma = 0.01 stays ~1.3.
    assert imb1[-10:].mean() < 0.6 * imb0[-10:].mean(), (imb0, imb1)
    assert imb1[-10:].mean() < imb1[0]
    # gamma = 0 leaves the biases at zero; gamma > 0 moves them.
    b0 = jax.tree.leaves(t0.state.biases)
    b1 = jax.tree.leaves(t1.state.biases)
    assert all(np.all(np.asarray(b) == 0) for b in b0)
    assert any(np.abs(np.asarray(b)).max() > 0 for b in b1)


def test_bias_update_rule(init_dir, data):
    """One step: bias == gamma * sign(mean load - load) of that step's loads, per router."""
    trainer = Trainer(fresh_model(init_dir), TrainConfig(**{**TCFG.__dict__, "bias_gamma": GAMMA}))
    batch = data.batch_at(0)
    _, aux, grads = trainer.loss_and_grads(batch)
    # Loads count the real tokens' assignments only: K per valid token.
    K = CFG["num_experts_per_tok"]
    np.testing.assert_allclose(np.asarray(aux["moe_load"]).sum(-1), batch.valid.sum() * K)
    np.testing.assert_allclose(np.asarray(aux["mtp_load"]).sum(), batch.valid[:, 1:].sum() * K)
    # RouterBias gets no gradient: it is not in the differentiated state.
    assert not any("e_score_correction_bias" in "/".join(map(str, p)) for p, _ in
                   jax.tree_util.tree_flatten_with_path(grads)[0])
    trainer.train_step(batch)
    bias = {str(p[0]): np.asarray(v[...]) for p, v in __import__("flax").nnx.to_flat_state(trainer.state.biases)}
    for name, load in (("moe_layers", np.asarray(aux["moe_load"])), ("mtp", np.asarray(aux["mtp_load"]))):
        want = GAMMA * np.sign(load.mean(-1, keepdims=True) - load)
        np.testing.assert_allclose(bias[name], want, atol=1e-7)


def test_gradients_match_finite_differences(init_dir, data):
    """Gradient of the full loss (CE + λ MTP + α balance) vs central differences, float32."""
    tcfg = TrainConfig(**{**TCFG.__dict__, "balance_alpha": 0.05})  # make the balance term visible
    trainer = Trainer(fresh_model(init_dir), tcfg)
    batch = make_dataset("synthetic:addition", batch_size=16, seed=5).batch_at(0)  # the train shape
    loss0, _, grads = trainer.loss_and_grads(batch)
    params = trainer.state.params
    p_leaves, treedef = jax.tree.flatten(params)
    g_leaves = jax.tree.leaves(grads)
    paths = ["/".join(str(k.key) for k in p if hasattr(k, "key"))
             for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    rng = np.random.default_rng(0)
    # eps: float32 rounding of a loss ~20 leaves ~1e-3 of noise in the difference quotient; a
    # much larger eps flips top-k routing choices (the loss is only piecewise smooth).
    eps = 2e-3
    for i, name in enumerate(paths):  # one entry of every parameter
        g = np.asarray(g_leaves[i])
        flat = np.abs(g).reshape(-1)
        # The largest-gradient entry among a random subset (a non-negligible gradient).
        cand = rng.choice(flat.size, size=min(64, flat.size), replace=False)
        j = int(cand[np.argmax(flat[cand])])
        idx = np.unravel_index(j, g.shape)
        assert flat[j] > 1e-2, (name, flat[j])

        def loss_at(delta):
            leaves = list(p_leaves)
            leaves[i] = leaves[i].at[idx].add(delta)
            return float(trainer.loss_and_grads(batch, jax.tree.unflatten(treedef, leaves))[0])

        fd = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
        assert abs(fd - g[idx]) <= 2e-2 * abs(g[idx]) + 1e-3, (name, idx, fd, g[idx])
    assert len(paths) > 40 and "mtp/mlp/gate/weight" in paths and "embed_tokens/weight" in paths
    # The tied MTP copies are not trained parameters: they get the gradient through the main ones.
    assert "mtp/embed_tokens/weight" not in paths and "mtp/shared_head/head/weight" not in paths


def test_flash_attention_gradients_equal_plain(init_dir, data, monkeypatch):
    """``prefill_attention="flash"`` on CPU trains through the blocked jnp attention (here in
    blocks of 4 keys, so a row's 16 tokens span 4 of them) and its own backward, and with the TPU
    kernels (interpreted) through the TPU flash kernel and its backward kernels: the loss and
    every parameter's gradient equal the plain form's."""
    from kernels_pallas import blocked_attention
    monkeypatch.setattr(blocked_attention, "BLOCK_K", 4)
    batch = data.batch_at(0)
    out = {}
    modes = {"plain": Precision(), "flash": Precision(prefill_attention="flash"),
             "flash on TPU kernels": Precision(prefill_attention="flash", kernels="interpret_tpu")}
    for mode, prec in modes.items():
        trainer = Trainer(load_float_model(init_dir, prec=prec), TCFG)
        loss, _, grads = trainer.loss_and_grads(batch)
        out[mode] = float(loss), jax.tree_util.tree_flatten_with_path(grads)[0]
    assert batch.ids.shape[1] > 8
    for mode in ("flash", "flash on TPU kernels"):
        assert abs(out[mode][0] - out["plain"][0]) <= 1e-5 * abs(out["plain"][0]), mode
        for (path, g), (_, want) in zip(out[mode][1], out["plain"][1]):
            want = np.asarray(want)
            np.testing.assert_allclose(np.asarray(g), want, rtol=1e-3, atol=1e-4 * np.abs(want).max() + 1e-9,
                                       err_msg=f"{mode}: {jax.tree_util.keystr(path)}")


def test_chunked_loss_equals_the_whole_logits(init_dir, data, monkeypatch):
    """With the batch's logits over ``train.CE_CHUNK_BYTES`` the loss runs the heads (main and
    MTP) over 3 positions at a time (16-token rows: the last chunk partial), recomputing each
    chunk's logits in the backward: the loss, its terms, the accuracies and every gradient equal
    the whole-logits form's, on one device and on a data=2, expert=2, model=2 mesh (the batch
    over ``data``, the vocabulary over ``model``)."""
    from deepseek_jax import sharding
    from deepseek_jax import train as T
    batch = data.batch_at(0)
    model = load_float_model(init_dir)
    b, t = batch.ids.shape
    mesh = sharding.make_mesh({"data": 2, "expert": 2, "model": 2})
    out = {}
    chunked = 3 * b * model.cfg.vocab_size * 4
    for name, budget, on in (("whole", T.CE_CHUNK_BYTES, None), ("chunked", chunked, None),
                             ("chunked on a mesh", chunked, mesh)):
        monkeypatch.setattr(T, "CE_CHUNK_BYTES", budget)
        jax.clear_caches()
        loss, aux, grads = Trainer(load_float_model(init_dir), TCFG, mesh=on).loss_and_grads(batch)
        out[name] = float(loss), aux, jax.tree_util.tree_flatten_with_path(grads)[0]
    assert t % 3 != 0 and b * t * model.cfg.vocab_size * 4 <= T.CE_CHUNK_BYTES * 6
    assert model.mtp is not None and out["whole"][1]["mtp_ce"] > 0
    for name in ("chunked", "chunked on a mesh"):
        assert abs(out[name][0] - out["whole"][0]) <= 1e-5 * abs(out["whole"][0]), name
        for k in ("ce", "mtp_ce", "acc", "exact"):
            np.testing.assert_allclose(float(out[name][1][k]), float(out["whole"][1][k]), rtol=1e-5,
                                       err_msg=f"{name}: {k}")
        for (path, g), (_, want) in zip(out[name][2], out["whole"][2]):
            want = np.asarray(want)
            np.testing.assert_allclose(np.asarray(g), want, rtol=1e-4, atol=1e-5 * np.abs(want).max() + 1e-9,
                                       err_msg=f"{name}: {jax.tree_util.keystr(path)}")


def test_mtp_loss_term_matches_independent_computation(runs, data):
    """aux['mtp_ce'] == mean over masked i of -log_softmax(mtp_logits[i])[ids[i+2]], in numpy."""
    trainer = runs[TCFG.lr, GAMMA][0]
    batch = data.batch_at(100)
    _, aux, _ = trainer.loss_and_grads(batch)
    logits, mtp = model_logits(trainer.model(), batch.ids)
    ids, mask = batch.ids, batch.loss_mask
    B, T = ids.shape
    assert mtp.shape == (B, T - 1, CFG["vocab_size"])
    total, n = 0.0, 0
    for b in range(B):
        for i in range(T - 2):         # row i predicts token i+2
            if mask[b, i + 2]:
                row = mtp[b, i].astype(np.float64)
                lse = np.log(np.sum(np.exp(row - row.max()))) + row.max()
                total += lse - row[ids[b, i + 2]]
                n += 1
    assert n == int(mask[:, 2:].sum())
    np.testing.assert_allclose(float(aux["mtp_ce"]), total / n, rtol=2e-5)
    # And the main CE the same way, for good measure.
    lp = logits[:, :-1].astype(np.float64)
    lp = lp - (np.log(np.exp(lp - lp.max(-1, keepdims=True)).sum(-1, keepdims=True)) + lp.max(-1, keepdims=True))
    nll = -np.take_along_axis(lp, ids[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(float(aux["ce"]), (nll * mask[:, 1:]).sum() / mask[:, 1:].sum(), rtol=2e-5)


def test_resume_continues_the_same_curve(init_dir, data, tmp_path):
    tcfg = TrainConfig(**{**TCFG.__dict__, "bias_gamma": GAMMA})
    straight = Trainer(fresh_model(init_dir), tcfg)
    want = [m["loss"] for m in run(straight, data, 6)]

    first = Trainer(fresh_model(init_dir), tcfg)
    got = [m["loss"] for m in run(first, data, 3)]
    first.save(tmp_path / "ckpt", {"note": "three steps"})
    del first
    assert Trainer.latest_step(tmp_path / "ckpt") == 3
    second = Trainer(fresh_model(init_dir), tcfg)
    meta = second.restore(tmp_path / "ckpt")
    assert meta["note"] == "three steps" and second.step == 3
    got += [m["loss"] for m in run(second, data, 3, start=second.step)]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(straight.state), jax.tree.leaves(second.state)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_export_hub_loads_with_same_logits(runs, data, tmp_path):
    trainer = runs[TCFG.lr, GAMMA][0]
    model = trainer.model()
    ids = data.batch_at(7).ids[:4]
    ref, ref_mtp = model_logits(model, ids)

    tok_dir = tmp_path / "tok"   # a tokenizer keeping its template in chat_template.jinja (newer HF exports)
    shutil.copytree(TINY_TOKENIZER_DIR, tok_dir)
    (tok_dir / "chat_template.jinja").write_text("J:{% for m in messages %}{{ m.content }}{% endfor %}")
    hub = export_hub(model, tmp_path / "hub", fp8=False, tokenizer_dir=tok_dir)
    with HubReader(hub) as reader:
        assert spec_mismatches(reader, hub_tensor_specs(reader.config)) == []
        assert "quantization_config" not in reader.config
    assert os.path.isfile(os.path.join(hub, "tokenizer.json"))
    # (the .jinja was left behind: the export had no template, and generate encoded prompts raw)
    assert Tokenizer.from_dir(hub).apply_chat_template([{"role": "user", "content": "hi"}]) == "J:hi"
    loaded = api.load(hub)
    assert loaded.cfg.replace(extra={}) == model.cfg.replace(extra={})
    # The Hub layout stores BF16: the loaded model equals the trained one with bf16-rounded weights,
    # exactly (float32 compute), and the trained biases come back exactly (F32).
    got, got_mtp = model_logits(cast_params(loaded, jnp.float32), ids)
    rounded = cast_params(cast_params(model, jnp.bfloat16), jnp.float32)
    want, want_mtp = model_logits(rounded, ids)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_mtp, want_mtp)
    np.testing.assert_array_equal(np.asarray(loaded.moe_layers.mlp.gate.e_score_correction_bias[...]),
                                  np.asarray(model.moe_layers.mlp.gate.e_score_correction_bias[...]))
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() < 0.05 * scale

    hub8 = export_hub(model, tmp_path / "hub8", fp8=True)
    assert not os.path.exists(os.path.join(hub8, "tokenizer.json"))   # none unless named: never the wrong one
    with HubReader(hub8) as reader:
        assert spec_mismatches(reader, hub_tensor_specs(reader.config)) == []
        assert reader.config["quantization_config"]["quant_method"] == "fp8"
    loaded8 = api.load(hub8)
    assert loaded8.cfg.fp8
    got8, got8_mtp = model_logits(loaded8, ids)
    # Exactly the FP8 semantics: the same as a float model holding the dequantized weights...
    deq8, deq8_mtp = model_logits(load_float_model(hub8), ids)
    np.testing.assert_allclose(got8, deq8, rtol=1e-4, atol=1e-4 * scale)
    np.testing.assert_allclose(got8_mtp, deq8_mtp, rtol=1e-4, atol=1e-4 * scale)
    # ... and close to the trained model on the real tokens (e4m3 keeps ~3 mantissa bits).
    valid = data.batch_at(7).valid[:4]
    err = np.abs(got8 - ref)[valid]
    assert err.mean() < 0.1 * np.abs(ref[valid]).mean()
    assert (got8.argmax(-1) == ref.argmax(-1))[valid].mean() > 0.8


def test_datasets_are_deterministic_disjoint_and_masked(tmp_path):
    """Batches are a pure function of (seed, split, step); held-out problems never appear in
    training; the loss mask covers exactly the answer and eos; text is packed and resumable."""
    tr = make_dataset("synthetic:addition", batch_size=8, seed=1)
    ev = make_dataset("synthetic:addition", batch_size=8, seed=2, split="eval")
    b1, b2 = tr.batch_at(5), make_dataset("synthetic:addition", batch_size=8, seed=1).batch_at(5)
    assert all(np.array_equal(x, y) for x, y in zip(b1, b2))
    assert not np.array_equal(tr.batch_at(6).ids, b1.ids)
    train_prompts = {p for s in range(50) for p, _ in tr.examples(s)}
    eval_prompts = {p for s in range(50) for p, _ in ev.examples(s)}
    assert train_prompts and eval_prompts and not train_prompts & eval_prompts
    tok = tr.tok
    for (prompt, answer), ids, mask, valid in zip(tr.examples(5), *b1):
        a, b = prompt.split("+")
        assert answer == str(int(a) + int(b))
        assert tok.decode(ids[mask > 0]) == answer and ids[mask > 0][-1] == tok.eos_id
        full = tok.encode_chat([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                               add_generation_prompt=False)
        assert list(ids[valid]) == full and not valid[len(full):].any()
    rev = make_dataset("synthetic:reverse", batch_size=4, seed=0)
    for (prompt, answer), ids, mask, _ in zip(rev.examples(0), *rev.batch_at(0)):
        assert answer == prompt[::-1] and rev.tok.decode(ids[mask > 0]) == answer

    text = tmp_path / "lines.txt"
    text.write_text("".join(f"line number {i} of the file\n" for i in range(40)))
    td = make_dataset(str(text), tok, batch_size=3, seq_len=16, seed=0)
    ids, mask, valid = td.batch_at(4)
    assert ids.shape == (3, 16) and np.array_equal(mask > 0, valid)
    assert np.array_equal(td.batch_at(4).ids, make_dataset(str(text), tok, batch_size=3, seq_len=16).batch_at(4).ids)
    # One epoch visits every packed row once.
    n = len(td.rows)
    seen = np.concatenate([td.batch_at(s).ids for s in range(n)])[:n]
    assert sorted(map(tuple, seen)) == sorted(map(tuple, td.rows))
    held = make_dataset(str(text), tok, batch_size=3, seq_len=16, split="eval")
    assert "line number 19 " in tok.decode(held.rows.reshape(-1)) and \
        "line number 19 " not in tok.decode(td.rows.reshape(-1))


def test_train_cli_and_resume(init_dir, tmp_path, capsys):
    """``deepseek-jax train`` end to end: 6 steps with checkpoints at 3 and 6; dropping the last
    checkpoint and resuming replays steps 3-5 with identical metrics; the Hub export is usable."""
    import shutil

    from deepseek_jax.cli import main
    from deepseek_jax.errors import DeepSeekError
    from deepseek_jax.tokenizer import Tokenizer

    out = tmp_path / "run"
    args = ["train", "--init", init_dir, "--data", "synthetic:addition", "--batch", "16", "--out", str(out),
            "--steps", "6", "--lr", "1e-2", "--warmup", "3", "--bias-gamma", str(GAMMA), "--eval-batches", "1",
            "--save-every", "3", "--eval-every", "2"]
    assert main(args) == 0
    evals = [json.loads(ln) for ln in open(out / "eval.jsonl")]
    assert [e["step"] for e in evals] == [2, 4, 6] and evals[-1] == json.load(open(out / "eval.json"))
    assert evals[-1]["loss"] < evals[0]["loss"]
    first = [json.loads(ln) for ln in open(out / "metrics.jsonl")]
    assert [m["step"] for m in first] == list(range(6))
    assert first[-1]["loss"] < first[0]["loss"]
    assert Trainer.latest_step(out / "ckpt") == 6
    assert main(args) == 2  # refuses to overwrite a run without --resume
    shutil.rmtree(out / "ckpt" / "6")
    assert Trainer.latest_step(out / "ckpt") == 3
    assert main(args + ["--resume"]) == 0
    second = [json.loads(ln) for ln in open(out / "metrics.jsonl")]
    assert [m["step"] for m in second] == list(range(6))
    again = [json.loads(ln) for ln in open(out / "eval.jsonl")]    # steps 2 kept, 4 and 6 evaluated again
    assert [e["step"] for e in again] == [2, 4, 6]
    np.testing.assert_allclose([e["loss"] for e in again], [e["loss"] for e in evals], rtol=1e-5)
    np.testing.assert_allclose([m["loss"] for m in second], [m["loss"] for m in first], rtol=1e-6)
    assert main(args[:-2] + ["--resume", "--batch", "8"]) == 2  # different data: refused
    err = capsys.readouterr().err
    assert "different data" in err and "--resume" in err
    # settings the state depends on are refused before anything loads (Orbax cast the parameters to
    # bfloat16, and failed on the optimizer state of clipping turned off, after a note accepting it)
    for extra, needle in ((["--param-dtype", "bfloat16"], "the checkpoint's parameters are float32"),
                          (["--clip", "0"], "trained with gradient clipping on (--clip 1)"),
                          (["--steps", "2"], "--steps 2 is below the checkpoint's step 6")):
        assert main(args + ["--resume"] + extra) == 2
        assert needle in capsys.readouterr().err
    # a new run refuses an OUT holding an earlier run's files (it deleted a hub/ folder's contents)
    other = tmp_path / "other"
    (other / "hub").mkdir(parents=True)
    (other / "hub" / "mine.txt").write_text("x")
    assert main(args[:args.index("--out")] + ["--out", str(other)] + args[args.index("--out") + 2:]) == 2
    assert "already holds hub" in capsys.readouterr().err and (other / "hub" / "mine.txt").exists()
    # a --seq-len that a synthetic example can outgrow fails now, not after steps were trained and saved
    assert main(args + ["--seq-len", "13", "--out", str(tmp_path / "short")]) == 2
    assert "--seq-len 13 is shorter than synthetic:addition's longest example, up to 15 tokens" in \
        capsys.readouterr().err
    # resuming a finished run with another learning rate: a note names it, and the final evaluation,
    # run again, replaces the step-6 line instead of adding a second one
    assert main(args + ["--resume", "--lr", "2e-2"]) == 0
    assert "note: --resume with other settings than the checkpoint's: lr 0.01 -> 0.02" in capsys.readouterr().out
    assert [json.loads(ln)["step"] for ln in open(out / "eval.jsonl")] == [2, 4, 6]
    hub = out / "hub"
    with HubReader(hub) as reader:
        assert spec_mismatches(reader, hub_tensor_specs(reader.config)) == []
    assert Tokenizer.from_dir(hub).vocab_size == CFG["vocab_size"]
    assert json.load(open(out / "eval.json"))["step"] == 6
    run = json.load(open(out / "run.json"))
    assert "exit_stack" not in run["argv"]
    # each resume's settings on top, the earlier invocations' kept in order (they were overwritten)
    assert run["start_step"] == 6 and run["argv"]["lr"] == 2e-2
    assert [(r["start_step"], r["argv"]["lr"]) for r in run["earlier_runs"]] == [(0, 1e-2), (3, 1e-2)]
    assert all("earlier_runs" not in r for r in run["earlier_runs"])
    # a step's training state is not a model: the error points at OUT/hub
    np.save(out / "ids.npy", np.ones((1, 4), np.int32))
    assert main(["score", str(out / "ckpt" / "6"), "--ids", str(out / "ids.npy"), "--out", str(out / "x.npy")]) == 2
    assert f"the trained model to load is {hub}" in capsys.readouterr().err
    # the run's directory itself stands for its trained model (a note says so); from Python, a hint
    assert main(["score", str(out), "--ids", str(out / "ids.npy"), "--out", str(out / "x.npy")]) == 0
    assert f"using its trained model, {hub}" in capsys.readouterr().err
    assert np.load(out / "x.npy").shape[:2] == (1, 4)
    with pytest.raises(DeepSeekError, match="a training run's output; the trained model to load is"):
        api.load(str(out))


def test_trainable_subset(init_dir, data):
    """TrainConfig.trainable: the gradients of full training restricted to the matched parameters;
    the others bit-identical after steps and without optimizer state; bad patterns rejected."""
    from flax import nnx

    from deepseek_jax.errors import DeepSeekError
    from deepseek_jax.train import param_path

    pattern = "self_attn|norm"
    sub = Trainer(fresh_model(init_dir), TrainConfig(**{**TCFG.__dict__, "trainable": pattern}))
    full = Trainer(fresh_model(init_dir), TCFG)
    batch = data.batch_at(0)
    loss_s, _, g_sub = sub.loss_and_grads(batch)
    loss_f, _, g_full = full.loss_and_grads(batch)
    assert float(loss_s) == float(loss_f)
    full_grads = {param_path(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(g_full)}
    sub_grads = {param_path(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(g_sub)}
    assert set(sub_grads) == {k for k in full_grads if "self_attn" in k or "norm" in k}
    for k, g in sub_grads.items():
        # two compiled programs (other outputs, other fusions): equal up to float32 summation
        # order, where a gradient summed over every token cancels to ~1e-6 relative (measured in
        # a full-suite run: 3.4e-7 on an entry of 0.05, its tensor's largest 0.55)
        want = full_grads[k]
        np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6 * np.abs(want).max(), err_msg=k)
    trained, total = sub.parameter_counts()
    assert trained == sum(g.size for g in sub_grads.values()) and total == full.parameter_counts()[0]
    assert len(jax.tree.leaves(sub.state.opt_state)) < len(jax.tree.leaves(full.state.opt_state))

    before = {param_path(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(sub.model(), nnx.Param))}
    hist = run(sub, data, 3)
    assert np.isfinite([m["loss"] for m in hist]).all()
    after = {param_path(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(sub.model(), nnx.Param))}
    changed = {k for k in after if not np.array_equal(after[k], before[k])}
    assert changed == set(sub_grads)

    for bad, needle in (("(", "not a regular expression"), ("no_such_param", "matches no parameter"),
                        ("", "non-empty")):
        with pytest.raises(DeepSeekError, match=needle):
            Trainer(fresh_model(init_dir), TrainConfig(**{**TCFG.__dict__, "trainable": bad}))


def test_train_cli_trainable(init_dir, tmp_path, capsys):
    from deepseek_jax.cli import main

    out = tmp_path / "run"
    args = ["train", "--init", init_dir, "--data", "synthetic:addition", "--batch", "16", "--out", str(out),
            "--steps", "2", "--eval-batches", "0", "--trainable", "moe_layers/mlp/(gate|shared_experts)"]
    assert main(args) == 0
    stdout = capsys.readouterr().out
    assert "training " in stdout and "parameters" in stdout and "moe_layers/mlp/(gate|shared_experts)" in stdout
    assert json.load(open(out / "run.json"))["train_config"]["trainable"] == "moe_layers/mlp/(gate|shared_experts)"
    assert main(args[:-1] + ["self_attn", "--resume"]) == 2
    assert "different --trainable" in capsys.readouterr().err
    # the frozen parameters are not in the checkpoints: they come from --init, which a resume needs
    i = args.index("--init")
    assert main(args[:i] + ["--config", init_dir] + args[i + 2:] + ["--resume"]) == 2
    assert "frozen weights come from its --init checkpoint: give it again" in capsys.readouterr().err
    assert main(args + ["--resume", "--steps", "3"]) == 0   # resumed: one more step over the same frozen weights
    capsys.readouterr()
    assert main(args[:-1] + ["(", "--out", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert "--trainable: '(' is not a regular expression" in err and len(err.strip().splitlines()) == 1
    assert main(args[:-1] + ["no_such_param", "--out", str(tmp_path / "other")]) == 2   # found after loading
    assert "matches no parameter" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()          # no empty OUT left behind


def test_mtp_copies_of_frozen_sources_start_equal_to_them():
    """The MTP layer's embedding and head are kept equal to the model's: from a random init with
    the sources frozen (``--trainable self_attn``), they kept their own random values, trained the
    MTP loss through them, and were exported so."""
    from deepseek_jax.api import init_random
    from deepseek_jax.config import DeepSeekConfig

    model = init_random(DeepSeekConfig.from_hub_dict(CFG), seed=5)
    assert not np.array_equal(np.asarray(model.mtp.embed_tokens.weight[...]), np.asarray(model.embed_tokens.weight[...]))
    m = Trainer(model, TrainConfig(**{**TCFG.__dict__, "trainable": "self_attn"})).model()
    np.testing.assert_array_equal(np.asarray(m.mtp.embed_tokens.weight[...]), np.asarray(m.embed_tokens.weight[...]))
    np.testing.assert_array_equal(np.asarray(m.mtp.shared_head.head.weight[...]), np.asarray(m.lm_head.weight[...]))
    # (the caller's model is left as it was)
    assert not np.array_equal(np.asarray(model.mtp.embed_tokens.weight[...]), np.asarray(model.embed_tokens.weight[...]))


def test_subset_leaves_frozen_routers_and_bf16_params(init_dir, data):
    """With a subset trained, a router whose gate is frozen keeps its balancing bias (the rest of
    the model stays as loaded); bfloat16 parameters train with gradient clipping; the MTP copies
    are trainable when untied, and a pattern matching only tied copies says so."""
    from flax import nnx

    from deepseek_jax.errors import DeepSeekError

    def biases(trainer):
        return {str(p[0]): np.asarray(v[...]) for p, v in nnx.to_flat_state(trainer.state.biases)}

    for pattern, moved in (("self_attn", set()), ("moe_layers/mlp/gate", {"moe_layers"}), (None, {"moe_layers", "mtp"})):
        t = Trainer(fresh_model(init_dir), TrainConfig(**{**TCFG.__dict__, "trainable": pattern, "bias_gamma": 0.01}))
        before = biases(t)
        run(t, data, 2)
        after = biases(t)
        assert {k for k in after if not np.array_equal(after[k], before[k])} == moved, pattern

    t = Trainer(cast_params(fresh_model(init_dir), jnp.bfloat16),
                TrainConfig(**{**TCFG.__dict__, "trainable": "self_attn", "clip_norm": 1e-3}))
    hist = run(t, data, 2)
    assert np.isfinite([m["loss"] for m in hist]).all() and hist[0]["grad_norm"] > 1e-3
    assert {x.dtype for x in jax.tree.leaves(t.state.params)} == {jnp.dtype(jnp.bfloat16)}
    # AdamW's moments stay bfloat16 (the first came out float32: the state's types changed after
    # a step, so both programs compiled again and the moment was not updated in place)
    assert {x.dtype for x in jax.tree.leaves(t.state.opt_state)
            if jnp.issubdtype(x.dtype, jnp.floating)} == {jnp.dtype(jnp.bfloat16)}

    untied = Trainer(fresh_model(init_dir), TrainConfig(**{**TCFG.__dict__, "tie_mtp": False,
                                                          "trainable": "mtp/embed_tokens"}))
    assert untied.parameter_counts()[0] == CFG["vocab_size"] * CFG["hidden_size"]
    with pytest.raises(DeepSeekError, match="matches only the MTP copies"):
        Trainer(fresh_model(init_dir), TrainConfig(**{**TCFG.__dict__, "trainable": "mtp/embed_tokens"}))


def test_mesh_training_equals_one_device(init_dir, data):
    """On a data=2, expert=2, model=2 mesh of 8 devices the parameters are split by the inference
    rules (experts over ``expert``, heads and expert hidden over ``model``), each AdamW moment
    exactly as its parameter, the batch over ``data``; the losses and the trained parameters equal
    one device's, the step compiles once (its output state keeps the input's shardings), and
    ``--data-parallel``'s one-axis mesh replicates every parameter."""
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from deepseek_jax import sharding
    from deepseek_jax import train as T
    from deepseek_jax.errors import DeepSeekError

    one = Trainer(fresh_model(init_dir), TCFG)
    mesh = sharding.make_mesh({"data": 2, "expert": 2, "model": 2})
    loaded = load_float_model(init_dir, mesh=mesh)     # made in its shards, as `train --init --mesh` does
    expert_w = loaded.moe_layers.mlp.experts.gate_proj.weight[...]
    assert expert_w.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "expert", "model")), 4)
    multi = Trainer(loaded, TCFG, mesh=mesh)
    experts = ("moe_layers", "mlp", "experts", "gate_proj", "weight")
    flat = {T._key_parts(p): x for p, x in jax.tree_util.tree_flatten_with_path(multi.state)[0]}
    assert flat[("params",) + experts].sharding.spec == P(None, "expert", "model")
    moments = [k for k in flat if k[0] == "opt_state" and k[-5:] == experts]
    assert len(moments) == 2 and all(flat[k].sharding.spec == P(None, "expert", "model") for k in moments)
    assert flat[("params", "moe_layers", "self_attn", "q_b_proj", "weight")].sharding.spec == P(None, "model")
    before = T._apply._cache_size()
    a = run(one, data, 3)
    b = run(multi, data, 3)
    assert T._apply._cache_size() - before <= 2       # one program per trainer, not one per step
    for x, y in zip(a, b):
        np.testing.assert_allclose(y["loss"], x["loss"], rtol=1e-5)
        np.testing.assert_allclose(y["grad_norm"], x["grad_norm"], rtol=1e-4)
    # Adam moves an entry by ~lr x g / (|g| + eps) per step: where g is near 0 the sums' last bits
    # (the mesh adds in another order) decide it (one MTP expert entry of 4,096 landed 1.1e-4 apart
    # with XLA's CPU compiler at optimization level 0). All but 0.1% (or one) of each tensor's
    # entries within 1e-4, and every entry within twice the 3 warmup steps' lr sum (each run moves it <= 2 lr).
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(one.state.params)[0], jax.tree.leaves(multi.state.params)):
        diff = np.abs(np.asarray(y, np.float64) - np.asarray(x, np.float64))
        assert (diff > 1e-4).sum() <= max(1, diff.size // 1000) and diff.max() <= 4 * TCFG.lr, (jax.tree_util.keystr(path), diff.max())
    after = {T._key_parts(p): x.sharding for p, x in jax.tree_util.tree_flatten_with_path(multi.state)[0]}
    assert after == {k: x.sharding for k, x in flat.items()}
    # a random model made in its shards has the one-device model's values
    cfg = fresh_model(init_dir).cfg
    whole, split = api.init_random(cfg, seed=2), api.init_random(cfg, seed=2, mesh=mesh)
    assert split.moe_layers.mlp.experts.up_proj.weight[...].sharding.is_equivalent_to(
        NamedSharding(mesh, P(None, "expert", "model")), 4)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(nnx.state(whole))[0], jax.tree.leaves(nnx.state(split))):
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x), err_msg=jax.tree_util.keystr(path))
    dp = Trainer(fresh_model(init_dir), TCFG, mesh=jax.make_mesh((4,), ("data",), devices=jax.devices()[:4]))
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(dp.state.params))
    with pytest.raises(DeepSeekError, match="mesh has no axis 'data'"):
        Trainer(fresh_model(init_dir), TCFG, mesh=jax.make_mesh((2,), ("batch",), devices=jax.devices()[:2]))


def test_trainable_single_layers_and_experts(tmp_path, data):
    """``trainable`` matched against Hub names picks slices of stacked parameters: layer 2's
    attention and router, and experts 0 and 1 of every MoE layer (the MTP layer's too). Exactly
    those slices change (weight decay included), the rest stays bit-identical, the gradient norm
    is that of the trained slices, only layer 2's routing bias moves, and the trained-parameter
    count counts slices."""
    from flax import nnx

    from deepseek_jax.train import param_path

    init = random_hub_checkpoint(tmp_path, dict(CFG, num_hidden_layers=3), seed=5, fp8=False, bias_range=(0.0, 0.0))
    pattern = r"layers\.2\.(self_attn|mlp\.gate\.)|experts\.[01]\."
    tcfg = TrainConfig(**{**TCFG.__dict__, "trainable": pattern, "weight_decay": 0.1, "bias_gamma": 0.01})
    trainer = Trainer(load_float_model(str(init)), tcfg)
    full = Trainer(load_float_model(str(init)), TrainConfig(**{**tcfg.__dict__, "trainable": None}))
    batch = data.batch_at(0)
    grads = {param_path(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(full.loss_and_grads(batch)[2])}
    params = lambda t: {param_path(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(t.state.params)}  # noqa: E731
    before, biases0 = params(trainer), jax.device_get(trainer.state.biases)
    metrics = run(trainer, data, 2)
    after = params(trainer)

    def want(name: str, shape) -> np.ndarray:   # which slices should train (MoE stack: layers 1 and 2)
        if "/experts/" in name:
            m = np.arange(8) < 2
            return m if name.startswith("mtp") else np.broadcast_to(m, (shape[0], 8))
        if name.startswith("moe_layers") and ("self_attn" in name or "/gate/" in name):
            return np.array([False, True])
        return np.zeros(shape[:1] if name.startswith(("moe_layers", "dense_layers")) else (), bool)

    masked_norm = 0.0
    for name, x in before.items():
        if name not in after:
            continue
        m = want(name, x.shape)
        changed = (after[name] != x).reshape(m.shape + (-1,)).any(-1)
        np.testing.assert_array_equal(changed, m, err_msg=name)
        masked_norm += float((grads[name].reshape(m.shape + (-1,))[m] ** 2).sum())
    assert set(after) == {k for k in grads if "/experts/" in k or k.startswith("moe_layers")
                          and ("self_attn" in k or "/gate/" in k)}
    np.testing.assert_allclose(metrics[0]["grad_norm"], np.sqrt(masked_norm), rtol=1e-5)
    b0 = np.asarray(biases0["moe_layers"]["mlp"]["gate"]["e_score_correction_bias"][...])
    b1 = np.asarray(trainer.state.biases["moe_layers"]["mlp"]["gate"]["e_score_correction_bias"][...])
    assert (b0[0] == b1[0]).all() and (b0[1] != b1[1]).any()
    assert trainer.parameter_counts()[0] == sum(int(x.size * want(k, x.shape).mean()) for k, x in after.items())


def test_gradient_accumulation_equals_the_whole_batch(runs, data, tmp_path, capsys):
    """``grad_accum=4``: a trained model's step on 4 microbatches of 4 rows gives the whole
    batch's loss terms, accuracies, expert loads and gradient norm (each microbatch weighted by its
    share of the targets / rows), and the same parameters after the update; the CLI flag runs and
    a batch that does not split is a one-line error."""
    from flax import nnx

    from deepseek_jax.cli import main
    from deepseek_jax.train import param_path

    trained = runs[TCFG.lr, GAMMA][0].model()
    one = Trainer(trained, TCFG)
    four = Trainer(trained, TrainConfig(**{**TCFG.__dict__, "grad_accum": 4}))
    batch = data.batch_at(STEPS + 1)
    # every other row keeps one target the model predicts right: exact match > 0, so the rows'
    # shares of it are exercised too
    right = model_logits(trained, batch.ids)[0][:, :-1].argmax(-1) == batch.ids[:, 1:]
    mask = np.array(batch.loss_mask)
    for r in range(0, len(mask), 2):
        hits = np.flatnonzero(right[r] & batch.valid[r, 1:])
        if hits.size:
            mask[r] = 0
            mask[r, hits[0] + 1] = 1
    batch = batch._replace(loss_mask=mask)
    g_one = {param_path(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(one.loss_and_grads(batch)[2])}
    g_four = four._accumulated(batch, four.tcfg._hyper(), 4)[2]
    for p, v in nnx.to_flat_state(g_four):
        np.testing.assert_allclose(np.asarray(v[...]), g_one[param_path(p)], rtol=1e-4, atol=1e-6,
                                   err_msg=param_path(p))
    a, b = (jax.device_get(t.train_step(batch)) for t in (one, four))
    assert a["acc"] > 0.2 and a["exact"] > 0.2
    for k in ("loss", "ce", "mtp_ce", "balance", "acc", "exact", "imbalance", "grad_norm", "tokens", "targets"):
        np.testing.assert_allclose(b[k], a[k], rtol=2e-5, atol=1e-6, err_msg=k)
    pa = {param_path(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(one.state.params)}
    for p, v in nnx.to_flat_state(four.state.params):
        # Adam's first step moves an entry by ~lr x g / (|g| + eps): lr x sign(g) for both, except
        # where g is near 0 and the two sums' last bits decide it (one layernorm entry landed
        # 1.1e-4 apart on one CPU, within 1e-4 on another); those entries only within 2 lr
        path = param_path(p)
        got, want = np.asarray(v[...]), pa[path]
        steady = np.abs(g_one[path]) > 1e-6
        np.testing.assert_allclose(got[steady], want[steady], atol=1e-4, err_msg=path)
        assert np.abs(got - want).max() <= 2 * TCFG.lr, path
    args = ["train", "--config", "tiny", "--data", "synthetic:addition", "--steps", "1", "--eval-batches", "0",
            "--batch", "6", "--grad-accum", "4", "--out", str(tmp_path / "r")]
    assert main(args) == 2
    assert "--batch 6 must be a multiple of --grad-accum 4" in capsys.readouterr().err


def test_train_cli_hand_offs(init_dir, tmp_path, capsys):
    """Across commands: updates below bfloat16's resolution are said to be lost in OUT/hub (it was
    byte-identical to --init, saved without a word); a training run's OUT is a further
    fine-tune's --init (its hub/); a conversion of --init to Orbax trains the same (it was refused:
    "export it first"), with frozen weights from it on --resume; --eval-batches 0 leaves no empty
    eval.jsonl."""
    from deepseek_jax.cli import main
    from deepseek_jax.orbax_ckpt import convert

    out = tmp_path / "run"
    args = ["train", "--init", init_dir, "--data", "synthetic:addition", "--batch", "4", "--steps", "2",
            "--eval-batches", "0", "--trainable", "layernorm", "--lr", "1e-6", "--bias-gamma", "0"]
    assert main(args + ["--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "round to their step-0 values in bfloat16" in err and str(out / "hub") in err, err
    assert not (out / "eval.jsonl").exists()
    # bfloat16 parameters lose such updates in training itself: no warning about the export
    assert main(args + ["--param-dtype", "bfloat16", "--out", str(tmp_path / "bf16")]) == 0
    assert "round to their" not in capsys.readouterr().err
    i = args.index(init_dir)
    assert main(args[:i] + [str(out)] + args[i + 1:-6] + ["--out", str(tmp_path / "again")]) == 0
    assert f"using its trained model, {out / 'hub'}" in capsys.readouterr().err
    orb = tmp_path / "orbax"
    convert(init_dir, str(orb))
    capsys.readouterr()
    o_args = args[:i] + [str(orb)] + args[i + 1:] + ["--out", str(tmp_path / "o")]
    first = list(o_args)
    first[first.index("--steps") + 1] = "1"   # (then --resume to step 2)
    assert main(first) == 0
    assert main(o_args + ["--resume"]) == 0

    def losses(run):
        return [(m["step"], m["loss"], m["grad_norm"]) for m in map(json.loads, open(run / "metrics.jsonl"))]
    assert losses(tmp_path / "o") == losses(out) and len(losses(out)) == 2
