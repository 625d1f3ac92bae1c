"""The independent reference: HF transformers' ``deepseek_v3`` on CPU in float32.

Weights come from the same Hub-layout directory our loader reads, dequantized here with numpy
(written separately from ``deepseek_jax.quant`` on purpose), and arranged in HF's own parameter
layout (fused ``gate_up_proj`` experts). The MTP layer (which HF ignores) is returned as raw
tensors for the test's own MTP computation.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from deepseek_jax.hub import HubReader


def dequant(wq: np.ndarray, s: np.ndarray) -> np.ndarray:
    out = wq.astype(np.float32).copy()
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            out[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] *= s[i, j]
    return out


def read_float_tensors(ckpt_dir: str) -> dict[str, np.ndarray]:
    """Every tensor as float32, FP8 weights dequantized, scales dropped."""
    out = {}
    with HubReader(ckpt_dir) as r:
        for name in r.names():
            if name.endswith("weight_scale_inv"):
                continue
            a = np.asarray(r.get(name))
            if a.dtype == np.dtype("float8_e4m3fn"):
                a = dequant(a, np.asarray(r.get(name + "_scale_inv")))
            out[name] = a.astype(np.float32)
    return out


def hf_config(ckpt_dir: str):
    from transformers import DeepseekV3Config
    with open(os.path.join(ckpt_dir, "config.json")) as f:
        d = json.load(f)
    d.pop("quantization_config", None)
    cfg = DeepseekV3Config(**d)
    cfg._attn_implementation = "eager"
    # the experts as a loop over experts: HF's grouped-matmul form fails on CPU for hidden sizes
    # whose rows are not 16-byte aligned ("strides should be multiple of 16 bytes")
    cfg._experts_implementation = "eager"
    return cfg


def hf_model(ckpt_dir: str):
    """(HF model in float32 with the checkpoint's weights, the raw float tensors)."""
    from transformers import DeepseekV3ForCausalLM
    cfg = hf_config(ckpt_dir)
    tensors = read_float_tensors(ckpt_dir)
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(cfg).float().eval()
    sd = {}
    n_layers, E = cfg.num_hidden_layers, cfg.n_routed_experts
    for name, a in tensors.items():
        parts = name.split(".")
        if name.startswith("model.layers.") and int(parts[2]) >= n_layers:
            continue  # MTP layer: HF has no such module
        if ".mlp.experts." in name:
            continue
        sd[name] = torch.from_numpy(a)
    for i in range(cfg.first_k_dense_replace, n_layers):
        p = f"model.layers.{i}.mlp.experts"
        gate = np.stack([tensors[f"{p}.{e}.gate_proj.weight"] for e in range(E)])
        up = np.stack([tensors[f"{p}.{e}.up_proj.weight"] for e in range(E)])
        down = np.stack([tensors[f"{p}.{e}.down_proj.weight"] for e in range(E)])
        sd[f"{p}.gate_up_proj"] = torch.from_numpy(np.concatenate([gate, up], axis=1))
        sd[f"{p}.down_proj"] = torch.from_numpy(down)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if "rotary_emb" not in m]
    assert not missing and not unexpected, (missing, unexpected)
    return model, tensors


def hf_logits(model, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits [B, T, V], final hidden state after model.norm [B, T, D])."""
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)
    # HF's last hidden_states entry is after the final norm.
    return out.logits.float().numpy(), out.hidden_states[-1].float().numpy()


def hf_final_hidden(model, ids: np.ndarray) -> np.ndarray:
    """The main model's last hidden state after ``model.norm`` (what MTP consumes)."""
    got = {}
    hook = model.model.norm.register_forward_hook(lambda m, i, o: got.setdefault("h", o))
    try:
        with torch.no_grad():
            model(input_ids=torch.from_numpy(ids.astype(np.int64)))
    finally:
        hook.remove()
    return got["h"].float().numpy()


def _rms(x: torch.Tensor, w: np.ndarray, eps: float) -> torch.Tensor:
    x = x.float()
    return torch.from_numpy(w) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def mtp_reference_logits(model, tensors: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
    """SPEC §6 written out with HF's decoder layer class: ``[B, T-1, V]``."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer
    cfg = model.config
    n = cfg.num_hidden_layers
    p = f"model.layers.{n}."
    layer = DeepseekV3DecoderLayer(cfg, layer_idx=n).float().eval()
    sd = {}
    for name, a in tensors.items():
        if not name.startswith(p):
            continue
        rest = name[len(p):]
        if rest.split(".")[0] in ("embed_tokens", "enorm", "hnorm", "eh_proj", "shared_head") or ".experts." in rest:
            continue
        sd[rest] = torch.from_numpy(a)
    E = cfg.n_routed_experts
    ex = p + "mlp.experts"
    sd["mlp.experts.gate_up_proj"] = torch.from_numpy(np.concatenate([
        np.stack([tensors[f"{ex}.{e}.gate_proj.weight"] for e in range(E)]),
        np.stack([tensors[f"{ex}.{e}.up_proj.weight"] for e in range(E)])], axis=1))
    sd["mlp.experts.down_proj"] = torch.from_numpy(np.stack([tensors[f"{ex}.{e}.down_proj.weight"] for e in range(E)]))
    missing, unexpected = layer.load_state_dict(sd, strict=False)
    assert not missing and not unexpected, (missing, unexpected)

    h = torch.from_numpy(hf_final_hidden(model, ids))[:, :-1]
    nxt = torch.from_numpy(ids[:, 1:].astype(np.int64))
    emb = torch.from_numpy(tensors[p + "embed_tokens.weight"])[nxt]
    eps = cfg.rms_norm_eps
    x = torch.cat([_rms(emb, tensors[p + "enorm.weight"], eps), _rms(h, tensors[p + "hnorm.weight"], eps)], -1)
    x = x @ torch.from_numpy(tensors[p + "eh_proj.weight"]).T
    B, T = nxt.shape
    pos = torch.arange(T)[None].expand(B, T)
    cos, sin = model.model.rotary_emb(x, pos)
    mask = torch.full((T, T), float("-inf")).triu(1)[None, None].expand(B, 1, T, T)
    with torch.no_grad():
        out = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=(cos, sin))
    x = out[0] if isinstance(out, tuple) else out
    x = _rms(x, tensors[p + "shared_head.norm.weight"], eps)
    return (x @ torch.from_numpy(tensors[p + "shared_head.head.weight"]).T).detach().numpy()
