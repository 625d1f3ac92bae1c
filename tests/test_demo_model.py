"""The shipped demo model (``deepseek_jax/assets/demo_model``, built by ``tools/make_demo_model.sh``):
its shape, its files, and its skill through the whole path Hub layout -> ``convert`` -> Orbax ->
``Generator`` (greedy, held-out additions, one batch), plain and speculative."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import deepseek_jax as dj
from deepseek_jax.commands.demo import DEFAULT_PROMPTS, DEMO_TASK, SHIPPED_DIR, demo_checkpoint, expected_answer
from deepseek_jax.generate import Generator
from deepseek_jax.hub import HubReader
from deepseek_jax.tasks import SyntheticDataset, _heldout
from deepseek_jax.tokenizer import Tokenizer

N_PROMPTS = 128


def test_shipped_files_and_shape():
    d = demo_checkpoint()
    assert d == str(SHIPPED_DIR)
    names = set(os.listdir(d))
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"} <= names
    total = sum(os.path.getsize(os.path.join(d, n)) for n in names)
    assert total < 4 * 2**20, total                                   # a few MB at most
    cfg = dj.load_config(d)
    # DeepSeek-V3's architecture: MLA with q-LoRA, MoE with group-limited routing and a shared
    # expert, an MTP layer, FP8 block weights.
    assert cfg.q_lora_rank and cfg.kv_lora_rank and cfg.num_moe_layers >= 1 and cfg.num_dense_layers >= 1
    assert cfg.n_group > 1 and cfg.topk_group < cfg.n_group and cfg.n_shared_experts >= 1
    assert cfg.num_nextn_predict_layers == 1 and cfg.fp8
    with open(os.path.join(d, "config.json"), encoding="utf-8") as f:
        assert json.load(f)["quantization_config"]["weight_block_size"] == [128, 128]
    reader = HubReader(d)
    try:
        dtypes = {reader.get(n).dtype.name for n in reader.names() if n.endswith("self_attn.q_a_proj.weight")}
        assert dtypes == {"float8_e4m3fn"}
        assert f"model.layers.{cfg.num_hidden_layers}.eh_proj.weight" in reader   # the MTP layer
    finally:
        reader.close()
    tok = Tokenizer.from_dir(d)
    assert tok.chat_template and tok.vocab_size <= cfg.vocab_size
    assert all(_heldout(p) for p in DEFAULT_PROMPTS)
    assert expected_answer("846+483") == "1329" and expected_answer("hi") is None


@pytest.fixture(scope="module")
def orbax_gen(tmp_path_factory):
    from deepseek_jax import orbax_ckpt
    out = tmp_path_factory.mktemp("demo_orbax") / "ckpt"
    orbax_ckpt.convert(demo_checkpoint(), out, progress=False)
    model = dj.load(str(out), mtp=True)
    assert model.cfg.fp8 and model.mtp is not None        # the Orbax checkpoint keeps the FP8 weights
    return Generator(model, Tokenizer.from_dir(str(out)))


@pytest.fixture(scope="module")
def heldout(orbax_gen):
    ds = SyntheticDataset(DEMO_TASK, orbax_gen.tokenizer, batch_size=N_PROMPTS, seed=2024, split="eval")
    examples = ds.examples(0)
    assert all(_heldout(p) for p, _ in examples)
    return examples, [ds.encode(p)[0] for p, _ in examples]


def test_exact_match_through_convert(orbax_gen, heldout):
    examples, prompts = heldout
    results = orbax_gen.generate(prompts, max_new_tokens=8)
    answers = [orbax_gen.tokenizer.decode(r.output_ids) for r in results]
    right = np.mean([a == want for a, (_, want) in zip(answers, examples)])
    assert right >= 0.95, [(p, want, a) for a, (p, want) in zip(answers, examples) if a != want]
    assert all(r.finish_reason == "eos" for r in results)
    # Speculative decoding on the same batch: the same answers, most drafts accepted.
    spec = orbax_gen.generate(prompts, max_new_tokens=8, speculative="mtp")
    assert [r.output_ids for r in spec] == [r.output_ids for r in results]
    assert orbax_gen.last_stats.acceptance_rate >= 0.8


def test_fine_tuning_the_shipped_model_uses_its_tokenizer(tmp_path, capsys):
    """``train --init DEMO --lora-rank 2`` on chat data: the demo model's own tokenizer (its
    vocabulary of 264 is smaller than the package's tiny one) is the default; the run's directory
    then generates through its exported model."""
    from deepseek_jax.cli import main

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+{i}", "completion": str(2 * i)}) + "\n" for i in range(8)))
    out = tmp_path / "run"
    assert main(["train", "--init", demo_checkpoint(), "--lora-rank", "2", "--data", str(data), "--steps", "1",
                 "--batch", "4", "--eval-batches", "0", "--out", str(out)]) == 0
    assert Tokenizer.from_dir(out / "hub").vocab_size == Tokenizer.from_dir(demo_checkpoint()).vocab_size
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "12+30", "--chat", "--max-new-tokens", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["text"]
