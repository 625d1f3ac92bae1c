"""``deepseek-jax plan``: weights per device equal a hand count; the tiny plan equals XLA's own."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys


from deepseek_jax.config import load_config
from deepseek_jax.hub import hub_tensor_specs


def _plan_json(*args) -> dict:
    env = dict(os.environ)
    env.pop("JAX_NUM_CPU_DEVICES", None)  # plan sets its own device count
    r = subprocess.run([sys.executable, "-m", "deepseek_jax.cli", "plan", *args, "--json"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _hand_count(split, mtp: bool = False) -> float:
    """Per-device bytes from the Hub tensor list: each tensor's bytes / the ways it is split."""
    cfg = json.load(open(os.path.join(os.path.dirname(__file__), "..", "configs", "deepseek-v3-671b.json")))
    total = 0.0
    for name, spec in hub_tensor_specs(cfg, include_mtp=mtp).items():
        total += spec.nbytes / split(name)
    return total


def test_671b_on_16_h200_matches_hand_count():
    """2 nodes x 8 H200, experts over all 16: routed experts / 16, everything else replicated."""
    plan = _plan_json("--config", "deepseek-v3-671b", "--mesh", "expert=16", "--device", "h200", "--no-compile")
    hand = _hand_count(lambda n: 16 if ".mlp.experts." in n else 1)
    assert abs(plan["weights"] - hand) / hand < 0.02
    assert plan["weights"] < 141e9
    # nothing compiled: no temporaries reported as if measured (they were 0)
    assert plan["decode_temp"] is None and plan["prefill_temp"] is None
    assert plan["peak"] == plan["weights"] + plan["cache"]


def test_671b_with_the_mtp_layer_matches_hand_count():
    """``--speculative mtp`` counts the MTP layer (Hub layer 61: a decoder layer with its own
    embedding, head, norms and eh_proj), which generate --speculative mtp loads."""
    plan = _plan_json("--config", "deepseek-v3-671b", "--mesh", "expert=16", "--device", "h200", "--no-compile",
                      "--speculative", "mtp")
    hand = _hand_count(lambda n: 16 if ".mlp.experts." in n else 1, mtp=True)
    assert plan["mtp"] and abs(plan["weights"] - hand) / hand < 0.02
    without = _hand_count(lambda n: 16 if ".mlp.experts." in n else 1)
    assert 4.0 * 2**30 < hand - without < 5.0 * 2**30   # (the README's "4.5 GiB per device")


def test_plan_mtp_counts_its_latent_cache():
    """``generate --speculative mtp`` allocates the MTP layer's own latent cache beside the main
    one: [rows, positions, kv_lora_rank + rope dim] in the compute dtype."""
    cfg = load_config("tiny")
    args = ("--config", "tiny", "--mesh", "expert=1", "--batch", "3", "--max-len", "100", "--compute-dtype",
            "float32", "--no-compile")
    plain, mtp = _plan_json(*args), _plan_json(*args, "--speculative", "mtp")
    assert mtp["cache"] - plain["cache"] == plain["rows"] * plain["positions"] * cfg.latent_dim * 4 == 4 * 128 * 40 * 4


def test_671b_on_v5p_64_matches_hand_count():
    """v5p-64 = 32 chips: experts over expert=8, heads / MLP hidden / expert hidden / vocab over model=4."""
    plan = _plan_json("--config", "deepseek-v3-671b", "--mesh", "expert=8,model=4", "--device", "v5p",
                      "--no-compile")

    def split(n: str) -> int:
        if ".mlp.experts." in n:
            return 8 * 4                      # experts over expert, hidden over model
        if any(k in n for k in ("q_b_proj", "kv_b_proj", "o_proj", "mlp.gate_proj", "mlp.up_proj",
                                "mlp.down_proj", "shared_experts", "embed_tokens", "lm_head")):
            return 4                          # heads / hidden / vocab over model
        return 1                              # q_a, kv_a, norms, router
    hand = _hand_count(split)
    assert abs(plan["weights"] - hand) / hand < 0.02


def test_tiny_plan_equals_compiled_executable():
    """Weights + cache + token inputs counted from the rules == XLA's argument bytes per device."""
    plan = _plan_json("--config", "tiny", "--mesh", "data=2,expert=2,model=2", "--batch", "4", "--max-len", "64")
    cfg = load_config("tiny")
    tokens = 2 * (4 // 2) * 4                 # ids + positions, int32, batch split over data
    assert plan["decode_args"] == plan["weights"] + plan["cache"] + tokens
    # the latent cache: layers x batch/data x max_len x (kv_lora_rank + rope dim) x bf16
    assert plan["cache"] == cfg.num_hidden_layers * 2 * 64 * cfg.latent_dim * 2
    assert plan["decode_temp"] > 0 and plan["prefill_temp"] > 0


def test_plan_bad_input(capsys):
    from deepseek_jax import cli
    assert cli.main(["plan", "--config", "nope", "--mesh", "expert=2"]) == 2
    assert "nope" in capsys.readouterr().err
    assert cli.main(["plan", "--config", "tiny", "--mesh", "expert=2", "--device", "abacus", "--no-compile"]) == 2
    for extra, needle in ((["--max-len", "1"], "--max-len must be >= 2"),
                          (["--max-len", "64", "--prompt-len", "64"], "leaves no room"),
                          (["--train", "full", "--compute-dtype", "float32"], "--compute-dtype applies to inference"),
                          # accepted and ignored, or (seq-len) accepted where train refuses it
                          (["--train", "full", "--lora-rank", "8"], "--lora-rank applies to --train lora"),
                          (["--train", "lora", "--param-dtype", "bfloat16"], "--param-dtype applies to --train full"),
                          (["--train", "full", "--seq-len", "2"], "--seq-len must be >= 4"),
                          (["--train", "full", "--speculative", "mtp"], "--speculative applies to inference")):
        assert cli.main(["plan", "--config", "tiny", "--mesh", "expert=2", "--no-compile", *extra]) == 2
        assert needle in capsys.readouterr().err
    # an empty mesh read as every device, 2^30 of them
    assert cli.main(["plan", "--config", "tiny", "--mesh", "", "--no-compile"]) == 2
    assert "--mesh is empty" in capsys.readouterr().err


def test_train_plan_counts_the_trained_slices():
    """``--trainable`` naming some experts or layers by their Hub names trains slices of stacked
    arrays: plan counted the whole arrays (294,912 for experts 1 and 5 of the tiny config, where
    train trains 36,864). It now counts as Trainer.parameter_counts does."""
    import jax.numpy as jnp
    from flax import nnx

    from deepseek_jax.model import DeepSeekV3
    from deepseek_jax.quant import Precision
    from deepseek_jax.train import TrainConfig, Trainer

    cfg = load_config("tiny").replace(fp8=False)
    for pattern in (r"experts\.(1|5)\.", r"layers\.2\."):
        plan = _plan_json("--config", "tiny", "--mesh", "expert=1", "--train", "full", "--trainable", pattern,
                          "--no-compile")
        model = DeepSeekV3(cfg, prec=Precision(dtype=jnp.float32), rngs=nnx.Rngs(0), with_mtp=True)
        trained, total = Trainer(model, TrainConfig(trainable=pattern)).parameter_counts()
        assert plan["trained_params"] == trained < total, (pattern, plan["trained_params"], trained)


def test_plan_cache_is_the_generators():
    """The cache a Generator allocates: a batch of 5 holds 8 rows, a length of 200 its 256-position
    bucket, in the compute dtype (float32 here: generate's default). The plan counted 5 x 200
    positions in bfloat16, a quarter of it."""
    import jax
    import numpy as np

    import deepseek_jax as dj
    from deepseek_jax.cache import LatentCache
    from deepseek_jax.generate import Generator
    from deepseek_jax.plan import make_plan

    cfg = load_config("tiny")
    gen = Generator(dj.init_random(cfg, dtype="float32", with_mtp=False))
    gen.generate([[1, 2, 3, 4, 5, 6, 7, 8]] * 5, max_new_tokens=192, stop_at_eos=False)
    rows, _, positions = gen.last_stats.buckets
    allocated = sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(jax.eval_shape(
        lambda: LatentCache.zeros(cfg, rows, positions, np.float32))))
    plan = make_plan(cfg, {"data": 1, "expert": 1, "model": 1}, batch=5, max_len=200, dtype="float32",
                     compile_steps=False)
    assert (plan.rows, plan.positions) == (rows, positions) == (8, 256)
    assert plan.cache == allocated and plan.decode_args is None and not plan.compiled


def test_decode_step_on_a_mesh_updates_the_cache_in_place():
    """A batch-256 decode step whose cache (15 MiB) dwarfs everything else: its temporaries were
    the cache again and more (20.0 MiB on expert=8, 10.0 on data=2,expert=4, against 1.7 now):
    XLA split the cache carried through the layer scan over the experts' axis, and gathered it
    whole again (for 671B on 16 H200s: decode temporaries 11.61 GiB against 5.66)."""
    from deepseek_jax.plan import make_plan

    cfg = load_config("tiny")
    for mesh in ({"data": 1, "expert": 8, "model": 1}, {"data": 2, "expert": 4, "model": 1}):
        plan = make_plan(cfg, mesh, batch=256, max_len=cfg.max_position_embeddings)
        assert plan.decode_temp < plan.cache / 4, (mesh, plan.decode_temp, plan.cache)


def test_plan_compiles_the_prefill_the_generator_runs():
    """``--prefill-chunk``: the prefill is compiled as the generator runs it. In 32-token chunks
    a 256-token prompt's attention scores are [H, 32, 256] instead of [H, 256, 256], and XLA's
    temporaries of the compiled prefill shrink accordingly; "auto" keeps one pass at this size."""
    common = ("--config", "tiny", "--mesh", "data=1,expert=1,model=1", "--max-len", "256", "--prompt-len", "200")
    one = _plan_json(*common, "--prefill-chunk", "none")
    chunked = _plan_json(*common, "--prefill-chunk", "32")
    auto = _plan_json(*common)
    assert one["prefill_tokens"] == chunked["prefill_tokens"] == 256     # 200 pads to its bucket
    assert one["prefill_chunk"] is None and auto["prefill_chunk"] is None and chunked["prefill_chunk"] == 32
    assert chunked["prefill_temp"] < one["prefill_temp"]
    assert chunked["decode_temp"] == one["decode_temp"]


def test_plan_flash_attention_compiles_the_blocked_form(monkeypatch, capsys):
    """``--prefill-attention flash``: the plan compiles the training step with the blocked
    attention, here in 32-key blocks, whose temporaries are below those of the plain form's
    ``[H, 256, 256]`` float32 scores and their gradients. (The inference plan takes the flag the
    same way; compiling it too would double this test's minute.)"""
    from kernels_pallas import blocked_attention

    from deepseek_jax.plan import make_train_plan
    monkeypatch.setattr(blocked_attention, "BLOCK_K", 32)
    cfg = load_config("tiny")
    mesh = {"data": 1, "expert": 1, "model": 1}
    train = {a: make_train_plan(cfg, mesh, mode="full", seq_len=256, prefill_attention=a) for a in ("plain", "flash")}
    assert train["flash"].step_temp < train["plain"].step_temp
    assert train["flash"].trained == train["plain"].trained
    from deepseek_jax import cli
    capsys.readouterr()
    assert cli.main(["plan", "--config", "tiny", "--mesh", "expert=1", "--no-compile", "--prefill-attention",
                     "flash", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["prefill_attention"] == "flash"


def test_train_plan_equals_the_trainers_placement():
    """``plan --train lora``, compiled: the per-device bytes it counts equal those of a real
    ``Trainer``'s state placed on a 4-device mesh (the adapters and their moments replicated,
    the FP8 weights split by the rules), and XLA reports temporaries for both programs."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from deepseek_jax import lora, sharding
    from deepseek_jax.model import DeepSeekV3
    from deepseek_jax.quant import Precision
    from deepseek_jax.train import TrainConfig, Trainer

    plan = _plan_json("--config", "tiny", "--mesh", "expert=2,model=2", "--train", "lora", "--lora-rank", "4",
                      "--batch", "1", "--seq-len", "64")
    cfg = load_config("tiny")
    model = DeepSeekV3(cfg, prec=Precision(dtype=jnp.bfloat16), rngs=nnx.Rngs(0), with_mtp=cfg.num_nextn_predict_layers > 0)
    lora.add_lora(model, rank=4)
    trainer = Trainer(model, TrainConfig(trainable=lora.LORA_PATTERN),
                      mesh=sharding.make_mesh({"data": 1, "expert": 2, "model": 2}, jax.devices()[:4]))
    st = trainer.state
    per_device = lambda tree: int(sharding.bytes_per_device(tree).max())  # noqa: E731
    assert plan["trained"] == per_device(st.params) and plan["grads"] == plan["trained"]
    assert plan["frozen"] == per_device((st.tied, st.biases, st.rest))
    assert plan["moments"] == per_device([x for x in jax.tree.leaves(st.opt_state) if x.ndim])
    assert plan["trained_params"] == sum(x.size for x in jax.tree.leaves(st.params))
    assert plan["frozen"] < sum(x.nbytes for x in jax.tree.leaves(st.rest))   # the FP8 weights are split
    assert plan["step_temp"] > 0 and plan["apply_temp"] is not None
    assert plan["peak"] == plan["trained"] + plan["frozen"] + plan["moments"] + plan["grads"] + max(
        plan["step_temp"], plan["apply_temp"])


def test_train_plan_671b_matches_hand_count(capsys):
    """Full BF16 training of 671B + MTP on 256 H200s (expert=32, model=8): trained bytes per device
    = the Hub tensors' BF16 bytes / the ways each is split (the MTP layer's embedding and head
    copies excluded: tied), AdamW moments twice that, gradients twice that too with
    ``--grad-accum`` (the running sum and one microbatch's); inference-only flags are refused."""
    plan = _plan_json("--config", "deepseek-v3-671b", "--mesh", "expert=32,model=8", "--train", "full",
                      "--param-dtype", "bfloat16", "--batch", "4", "--grad-accum", "2", "--no-compile")
    cfg = json.load(open(os.path.join(os.path.dirname(__file__), "..", "configs", "deepseek-v3-671b.json")))
    mtp = f"model.layers.{cfg['num_hidden_layers']}."

    def split(n: str) -> int:
        if ".mlp.experts." in n:
            return 32 * 8
        if any(k in n for k in ("q_b_proj", "kv_b_proj", "o_proj", "mlp.gate_proj", "mlp.up_proj",
                                "mlp.down_proj", "shared_experts", "embed_tokens", "lm_head", "shared_head.head")):
            return 8
        return 1

    hand = 0.0
    for name, spec in hub_tensor_specs(dict(cfg, quantization_config=None), include_mtp=True).items():
        if name.endswith("e_score_correction_bias") or name.startswith(mtp) and (
                "embed_tokens" in name or "shared_head.head" in name):
            continue
        hand += 2 * math.prod(spec.shape) / split(name)
    assert abs(plan["trained"] - hand) / hand < 0.01, (plan["trained"], hand)
    assert plan["moments"] == 2 * plan["trained"]
    assert plan["grads"] == 2 * plan["trained"]     # with --grad-accum: the running sum and a microbatch's
    assert plan["trained_params"] > 6.8e11 and plan["fits"]
    from deepseek_jax import cli
    assert cli.main(["plan", "--config", "tiny", "--mesh", "expert=2", "--train", "full", "--max-len", "64"]) == 2
    assert "--max-len applies to inference plans" in capsys.readouterr().err
    assert cli.main(["plan", "--config", "tiny", "--mesh", "expert=2", "--lora-rank", "8"]) == 2
    assert "--lora-rank applies to training" in capsys.readouterr().err
