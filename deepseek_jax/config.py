"""Typed DeepSeek-V3 config, read from (and written back to) a Hub ``config.json``.

Field names are the Hub's. Both ways the Hub has spelled RoPE settings are read:
``rope_theta`` + ``rope_scaling`` (the original checkpoint) and ``rope_parameters`` (newer
transformers). Validation names the offending field in a one-line :class:`DeepSeekError`.

This module must not import jax: the converter and ``plan`` read configs on hosts that never
touch an accelerator.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from typing import Any

from deepseek_jax.errors import DeepSeekError

# Fields of the Hub config that this port reads, with the 671B values as defaults where the
# field is optional in older/newer configs.
_REQUIRED_INT = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
    "num_hidden_layers", "num_attention_heads", "n_routed_experts", "num_experts_per_tok",
    "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
)


# Optional fields checked by ``validate`` (with the defaults of DeepSeekConfig).
_OPTIONAL_INT = ("first_k_dense_replace", "moe_layer_freq", "n_shared_experts", "n_group", "topk_group",
                 "max_position_embeddings", "num_nextn_predict_layers", "bos_token_id", "eos_token_id")
_INT_LIMIT = 2 ** 31   # sizes and ids: int32 holds them (a vocabulary, a position, a layer count)
_POSITIVE_FLOAT = ("routed_scaling_factor", "rope_theta", "rms_norm_eps")
_BOOL = ("norm_topk_prob", "attention_bias", "tie_word_embeddings")
_STR = ("scoring_func", "topk_method", "hidden_act")


def _is_int(v: Any) -> bool:
    """A JSON integer (``True``/``False`` are not numbers here)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    """A JSON number, integer or float (not a bool, string or null)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """YaRN settings (SPEC §4). ``factor == 1`` means plain RoPE."""

    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0

    @property
    def cos_sin_multiplier(self) -> float:
        """SPEC §4: ``mscale(f, mscale) / mscale(f, mscale_all_dim)``, an unset (0) ``mscale_all_dim``
        leaving ``mscale(f, mscale)``; ``mscale(f, m) = 0.1 m ln f + 1`` (1 when ``f <= 1``)."""
        def m(v: float) -> float:
            return 1.0 if self.factor <= 1.0 else 0.1 * v * math.log(self.factor) + 1.0
        return m(self.mscale) / m(self.mscale_all_dim) if self.mscale_all_dim else m(self.mscale)


@dataclasses.dataclass(frozen=True)
class DeepSeekConfig:
    """The model hyper-parameters (SPEC §1), Hub field names."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    n_routed_experts: int
    num_experts_per_tok: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = 1536
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    n_shared_experts: int = 1
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 163840
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int = 0
    eos_token_id: int = 1
    num_nextn_predict_layers: int = 1
    fp8: bool = False  # the checkpoint's linear weights are 128x128 block-scaled e4m3
    weight_block_size: tuple[int, int] = (128, 128)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Width of one token's latent cache entry: c (kv_lora_rank) + shared k_pe."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def num_dense_layers(self) -> int:
        return min(self.first_k_dense_replace, self.num_hidden_layers)

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.num_dense_layers

    @property
    def shared_intermediate_size(self) -> int:
        return self.moe_intermediate_size * self.n_shared_experts

    @property
    def yarn_mscale(self) -> float:
        """``m`` of SPEC §3: the softmax scale is multiplied by m**2 when factor > 1."""
        rs = self.rope_scaling
        if rs is None or rs.factor <= 1.0 or not rs.mscale_all_dim:
            return 1.0
        return 0.1 * rs.mscale_all_dim * math.log(rs.factor) + 1.0

    @property
    def softmax_scale(self) -> float:
        return self.qk_head_dim ** -0.5 * self.yarn_mscale ** 2

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends generation: the Hub config's ``eos_token_id`` list when it has one
        (its first id is ``eos_token_id``), else ``(eos_token_id,)``."""
        eos = self.extra.get("eos_token_id")
        if isinstance(eos, list) and eos and eos[0] == self.eos_token_id:
            return tuple(dict.fromkeys(int(i) for i in eos))
        return (self.eos_token_id,)

    def replace(self, **kw: Any) -> "DeepSeekConfig":
        return dataclasses.replace(self, **kw)

    # ---- Hub JSON ------------------------------------------------------------------------
    @classmethod
    def from_hub_dict(cls, d: dict[str, Any]) -> "DeepSeekConfig":
        if not isinstance(d, dict):
            raise DeepSeekError("config: expected a JSON object")
        mt = d.get("model_type")
        if mt == "deepseek_v32":   # (its attention has another module: the loader would blame the tensors)
            raise DeepSeekError("config: model_type 'deepseek_v32' (DeepSeek-V3.2's sparse attention, with its "
                                "indexer) is not supported: only DeepSeek-V3's dense MLA")
        if mt is not None and mt not in ("deepseek_v3", "kimi_k2"):
            raise DeepSeekError(f"config: model_type {mt!r} is not DeepSeek-V3-shaped (want 'deepseek_v3')")
        for f in _REQUIRED_INT:
            if f not in d:
                raise DeepSeekError(f"config: missing field {f!r} (not a DeepSeek-V3 config?)")
        kw: dict[str, Any] = {}
        known = {f.name for f in dataclasses.fields(cls)}
        for k, v in d.items():
            if k in known and k not in ("rope_scaling", "fp8", "weight_block_size", "extra"):
                kw[k] = v
        theta, scaling = _read_rope(d)
        kw["rope_theta"] = theta
        kw["rope_scaling"] = scaling
        qc = d.get("quantization_config")
        if qc:
            if not isinstance(qc, dict):
                raise DeepSeekError(f"config: quantization_config = {qc!r}: must be an object or null")
            if qc.get("quant_method") != "fp8":
                raise DeepSeekError(
                    f"config: quantization_config.quant_method {qc.get('quant_method')!r} unsupported (want 'fp8')")
            if qc.get("fmt", "e4m3") != "e4m3":
                raise DeepSeekError(f"config: quantization_config.fmt {qc.get('fmt')!r} unsupported (want 'e4m3')")
            kw["fp8"] = True
            wbs = qc.get("weight_block_size", (128, 128))
            if not isinstance(wbs, (list, tuple)) or not all(_is_int(b) for b in wbs):
                raise DeepSeekError(f"config: quantization_config.weight_block_size = {wbs!r}: "
                                    "must be a list of two integers ([128, 128])")
            kw["weight_block_size"] = tuple(wbs)
        kw["extra"] = {k: v for k, v in d.items() if k not in known}
        eos = kw.get("eos_token_id")
        if isinstance(eos, list):
            # The first id is the one generation stops at; validate() checks its type and range.
            # The list itself goes back into the Hub config (to_hub_dict).
            if not eos:
                raise DeepSeekError("config: eos_token_id = []: give at least one id (generation stops at them)")
            kw["eos_token_id"] = eos[0]
            kw["extra"]["eos_token_id"] = eos
        cfg = cls(**kw)
        cfg.validate()
        return cfg

    def to_hub_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name in ("extra", "fp8", "weight_block_size", "rope_scaling"):
                continue
            d[f.name] = getattr(self, f.name)
        d.pop("rope_parameters", None)
        if self.rope_scaling is not None:
            d["rope_scaling"] = {"type": "yarn", **dataclasses.asdict(self.rope_scaling)}
        else:
            d["rope_scaling"] = None
        eos = self.extra.get("eos_token_id")
        if isinstance(eos, list) and eos and eos[0] == self.eos_token_id:
            d["eos_token_id"] = eos
        if self.fp8:   # (the source's other keys, e.g. modules_to_not_convert, kept)
            qc = self.extra.get("quantization_config")
            d["quantization_config"] = {
                **(qc if isinstance(qc, dict) else {}),
                "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": list(self.weight_block_size)}
        else:
            d.pop("quantization_config", None)
        d.setdefault("model_type", "deepseek_v3")
        d.setdefault("architectures", ["DeepseekV3ForCausalLM"])
        return d

    @classmethod
    def from_json_file(cls, path: str | os.PathLike[str]) -> "DeepSeekConfig":
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise DeepSeekError(f"config: {path} not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DeepSeekError(f"config: {path} is not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
        return cls.from_hub_dict(d)

    # ---- validation ------------------------------------------------------------------------
    def validate(self) -> None:
        def bad(field: str, why: str) -> DeepSeekError:
            return DeepSeekError(f"config: {field} = {getattr(self, field, None)!r}: {why}")

        # Types first (a JSON null, string or bool where a number belongs), so that no later
        # comparison or the model itself meets a wrong type.
        for f in _REQUIRED_INT + _OPTIONAL_INT:
            v = getattr(self, f)
            if not _is_int(v):
                raise bad(f, "must be an integer")
            if v < 0:
                raise bad(f, "must be >= 0")
            if v >= _INT_LIMIT:   # (a size beyond int64 was an OverflowError from deep inside jax)
                raise bad(f, f"too large (at most {_INT_LIMIT - 1})")
            if v == 0 and f in _REQUIRED_INT + ("n_group", "topk_group", "max_position_embeddings"):
                raise bad(f, "must be positive")
        if self.q_lora_rank is not None and (not _is_int(self.q_lora_rank) or not 0 < self.q_lora_rank < _INT_LIMIT):
            raise bad("q_lora_rank", f"must be a positive integer or null (below {_INT_LIMIT})")
        if self.extra.get("rope_interleave", True) is not True:   # (HF's option; the weights say which)
            raise DeepSeekError(f"config: rope_interleave = {self.extra['rope_interleave']!r}: only true "
                                "(DeepSeek-V3's RoPE over interleaved pairs) is supported")
        for f in _POSITIVE_FLOAT:
            v = getattr(self, f)
            if not _is_number(v):
                raise bad(f, "must be a number")
            if not (math.isfinite(v) and v > 0):
                raise bad(f, "must be a positive, finite number")
        for f in _BOOL:
            if not isinstance(getattr(self, f), bool):
                raise bad(f, "must be true or false")
        for f in _STR:
            if not isinstance(getattr(self, f), str):
                raise bad(f, "must be a string")
        if self.qk_rope_head_dim % 2:
            raise bad("qk_rope_head_dim", "must be even (RoPE rotates pairs)")
        if self.scoring_func != "sigmoid":
            raise bad("scoring_func", "only 'sigmoid' (DeepSeek-V3) is supported")
        if self.topk_method != "noaux_tc":
            raise bad("topk_method", "only 'noaux_tc' (DeepSeek-V3) is supported")
        if self.hidden_act != "silu":
            raise bad("hidden_act", "only 'silu' is supported")
        if self.attention_bias:
            raise bad("attention_bias", "DeepSeek-V3 has no attention bias")
        if self.tie_word_embeddings:   # (the loader, the model and export all keep a separate lm_head)
            raise bad("tie_word_embeddings", "DeepSeek-V3 has a separate lm_head; tied embeddings are not supported")
        if self.moe_layer_freq != 1:
            raise bad("moe_layer_freq", "only 1 (every layer after first_k_dense_replace is MoE) is supported")
        if self.n_routed_experts % self.n_group:
            raise bad("n_group", f"must divide n_routed_experts ({self.n_routed_experts})")
        if self.topk_group > self.n_group:
            raise bad("topk_group", f"must be <= n_group ({self.n_group})")
        per_group = self.n_routed_experts // self.n_group
        if per_group < 2:
            raise bad("n_group", "each group needs >= 2 experts (group score is the sum of the top 2)")
        if self.num_experts_per_tok > self.topk_group * per_group:
            raise bad("num_experts_per_tok", "exceeds the experts left after group selection")
        if self.fp8 and tuple(self.weight_block_size) != (128, 128):
            raise DeepSeekError(f"config: quantization_config.weight_block_size = {list(self.weight_block_size)}: "
                                "only [128, 128] blocks are supported")
        if not (0 <= self.bos_token_id < self.vocab_size):
            raise bad("bos_token_id", f"outside vocab [0, {self.vocab_size})")
        if not (0 <= self.eos_token_id < self.vocab_size):
            raise bad("eos_token_id", f"outside vocab [0, {self.vocab_size})")
        eos = self.extra.get("eos_token_id")
        if isinstance(eos, list):
            for i in eos:
                if not _is_int(i) or not 0 <= i < self.vocab_size:
                    raise bad("eos_token_id", f"list entry {i!r} is not a token id in [0, {self.vocab_size})")
        rs = self.rope_scaling
        if rs is not None and not isinstance(rs, RopeScaling):
            raise bad("rope_scaling", "must be a RopeScaling or None")
        if rs is not None:
            for f in dataclasses.fields(RopeScaling):
                v = getattr(rs, f.name)
                if not _is_number(v) or not math.isfinite(v):
                    raise DeepSeekError(f"config: rope_scaling.{f.name} = {v!r}: must be a finite number")
            if rs.factor < 1:
                raise DeepSeekError(f"config: rope_scaling.factor = {rs.factor!r}: must be >= 1 "
                                    "(YaRN stretches the context; 1 is plain RoPE)")
            for key in ("beta_fast", "beta_slow"):
                if getattr(rs, key) <= 0:
                    raise DeepSeekError(f"config: rope_scaling.{key} = {getattr(rs, key)!r}: must be positive "
                                        "(a number of rotations)")
            if rs.original_max_position_embeddings <= 0:
                raise DeepSeekError("config: rope_scaling.original_max_position_embeddings must be positive")
            _check_mscales(rs)


def _check_mscales(rs: RopeScaling) -> None:
    for key in ("mscale", "mscale_all_dim"):   # mscale(f, m) = 0.1 m ln f + 1 divides and multiplies
        if 0.1 * getattr(rs, key) * math.log(max(rs.factor, 1.0)) + 1.0 <= 0:
            raise DeepSeekError(f"config: rope_scaling.{key} = {getattr(rs, key)!r}: gives a scale "
                                f"0.1 * {key} * ln(factor) + 1 <= 0")


def _read_rope(d: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """Reads ``rope_theta``/``rope_scaling`` or the newer ``rope_parameters``."""
    rp = d.get("rope_parameters")
    if isinstance(rp, dict) and rp:
        theta = rp.get("rope_theta", d.get("rope_theta", 10000.0))
        scaling = rp
    else:
        theta = d.get("rope_theta", 10000.0)
        scaling = d.get("rope_scaling")
    if not _is_number(theta) or not math.isfinite(theta) or theta <= 0:
        raise DeepSeekError(f"config: rope_theta = {theta!r}: must be a positive number")
    if not scaling:
        return float(theta), None
    if not isinstance(scaling, dict):
        raise DeepSeekError(f"config: rope_scaling = {scaling!r}: must be an object or null")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind != "yarn":
        raise DeepSeekError(f"config: rope_scaling.type = {kind!r}: only 'yarn' is supported")

    def num(key: str, default: float, null_ok: bool = False) -> float:
        v = scaling.get(key, default)
        if v is None and null_ok:  # the Hub writes mscale / mscale_all_dim as null for "unset"
            return default
        if not _is_number(v) or not math.isfinite(v):
            raise DeepSeekError(f"config: rope_scaling.{key} = {v!r}: must be a number")
        return float(v)

    if "factor" not in scaling:
        raise DeepSeekError("config: rope_scaling.factor is missing (YaRN needs its context factor)")
    if scaling.get("truncate", True) is not True:   # HF's option; DeepSeek's YaRN rounds the ramp's ends
        raise DeepSeekError(f"config: rope_scaling.truncate = {scaling['truncate']!r}: only true "
                            "(DeepSeek's YaRN) is supported")
    # Where DeepSeek's code (SPEC §4) and HF transformers' read a YaRN setting differently, the
    # config must say: a missing original_max_position_embeddings is 4096 in DeepSeek's code and
    # max_position_embeddings in HF's; a missing (null, 0) mscale or mscale_all_dim is 1 or 0 in
    # DeepSeek's code, and HF then takes mscale(f, 1) for the multiplier.
    mpe = d.get("max_position_embeddings")
    if scaling.get("original_max_position_embeddings") is None and mpe not in (None, 4096):
        raise DeepSeekError(f"config: rope_scaling.original_max_position_embeddings is missing: DeepSeek's code "
                            f"reads 4096, HF transformers max_position_embeddings ({mpe!r}); give it")
    opm = num("original_max_position_embeddings", 4096)
    if opm != int(opm):
        raise DeepSeekError(f"config: rope_scaling.original_max_position_embeddings = {opm!r}: must be an integer")
    rs = RopeScaling(
        factor=num("factor", 1.0),
        original_max_position_embeddings=int(opm),
        beta_fast=num("beta_fast", 32.0),
        beta_slow=num("beta_slow", 1.0),
        mscale=num("mscale", 1.0, null_ok=True),   # (0 is a value: mscale(f, 0) = 1, SPEC §4)
        mscale_all_dim=num("mscale_all_dim", 0.0, null_ok=True),
    )
    if rs.factor >= 1:
        _check_mscales(rs)
    ms, msad = scaling.get("mscale"), scaling.get("mscale_all_dim")
    hf = (rs.cos_sin_multiplier if ms and msad else RopeScaling(factor=rs.factor).cos_sin_multiplier)
    if scaling.get("attention_factor") is None and abs(hf - rs.cos_sin_multiplier) > 1e-6 * abs(hf):
        raise DeepSeekError(f"config: rope_scaling.mscale = {ms!r}, mscale_all_dim = {msad!r}: DeepSeek's code "
                            f"and HF transformers read these differently (cos/sin multiplier "
                            f"{rs.cos_sin_multiplier:g} against {hf:g}); give both as non-zero numbers "
                            "(DeepSeek-V3: 1.0 and 1.0)")
    attention_factor = scaling.get("attention_factor")   # HF's override of the multiplier
    if attention_factor is not None and not (_is_number(attention_factor) and
                                             abs(attention_factor - rs.cos_sin_multiplier) <= 1e-6):
        raise DeepSeekError(f"config: rope_scaling.attention_factor = {attention_factor!r}: not supported "
                            f"(mscale / mscale_all_dim give DeepSeek's multiplier, {rs.cos_sin_multiplier:g})")
    return float(theta), rs


def configs_dir() -> str:
    """The presets folder: ``deepseek_jax/configs`` in an installed wheel (``pyproject.toml`` maps
    the repository's top-level ``configs/`` there), else the repository's ``configs/`` (a source
    checkout or an editable install)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for cand in (os.path.join(here, "configs"), os.path.join(os.path.dirname(here), "configs")):
        if os.path.isdir(cand):
            return cand
    raise DeepSeekError("configs/ directory not found next to the package")


def load_config(name_or_path: str) -> DeepSeekConfig:
    """A preset name (``deepseek-v3-671b``), a ``.json`` path, or a checkpoint directory."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise DeepSeekError(f"config: expected a preset name or a path, got {type(name_or_path).__name__}")
    name_or_path = os.fspath(name_or_path)
    cand = os.path.join(configs_dir(), name_or_path if name_or_path.endswith(".json") else name_or_path + ".json")
    is_preset = os.sep not in name_or_path and os.path.isfile(cand)
    # a folder of the working directory named like a preset (`runs/tiny`'s parent, say) holding no
    # config.json does not hide the preset
    if os.path.exists(name_or_path) and not (is_preset and os.path.isdir(name_or_path) and
                                              not os.path.isfile(os.path.join(name_or_path, "config.json"))):
        return DeepSeekConfig.from_json_file(name_or_path)
    if is_preset:
        return DeepSeekConfig.from_json_file(cand)
    if not name_or_path.endswith(".json") and os.path.isfile(name_or_path + ".json"):   # a path, .json left off
        return DeepSeekConfig.from_json_file(name_or_path + ".json")
    presets = sorted(f[:-5] for f in os.listdir(configs_dir()) if f.endswith(".json"))
    raise DeepSeekError(f"config: {name_or_path!r} is neither a file, a directory nor a preset "
                        f"(presets: {', '.join(presets)})")
