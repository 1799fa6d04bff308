"""`ModelConfig`: the typed description of a decoder (Qwen3, Qwen2, Llama), read from / written to HF config.json.

Only the fields our decoder implements are kept. Anything in an HF config that would change the maths and that we do
not implement (sliding windows, MLP/o_proj biases, a non-SiLU activation, YaRN rope, ...) is rejected with a
`ValueError` naming the file and field, instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

MODEL_TYPES = ("qwen3", "qwen2", "llama")
DTYPES = ("float32", "bfloat16")
# What a rematerialised layer saves for the backward pass (see `decoder.remat_policy`).
REMAT_POLICIES = ("full", "save_dots", "offload")
# Attention kernels (see `attention.attend`).
ATTENTION_IMPLS = ("auto", "dense", "xla", "cudnn", "splash")
_ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style RoPE frequency scaling (HF ``rope_type: "llama3"``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int
    rope_type: str = "llama3"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer; see docs/internals.md for the parameter layout.

    Attributes:
      model_type: "qwen3" | "qwen2" | "llama" (selects the HF architecture on export).
      vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, head_dim: sizes (V, D, F, L,
        N, K, H).
      rms_norm_eps: epsilon of every RMSNorm.
      rope_theta: RoPE base.
      rope_scaling: None or a `RopeScaling` (llama3).
      max_position_embeddings: longest position the model was trained for (exported; not enforced).
      tie_word_embeddings: unembed with ``embed/embedding`` instead of ``lm_head/kernel``.
      qkv_bias: q/k/v projections carry a bias (Qwen2).
      qk_norm: RMSNorm over head_dim on q and k before RoPE (Qwen3).
      bos_token_id, eos_token_id, pad_token_id: token ids (eos may be a tuple of ids).
      param_dtype: storage dtype of parameters ("float32" | "bfloat16").
      dtype: compute dtype of activations/matmuls; matmuls always accumulate in float32 and softmax/norms run in
        float32.
      remat: rematerialise each layer in the backward pass (saves activation memory when training).
      remat_policy: what a rematerialised layer keeps (`REMAT_POLICIES`): "full" saves nothing, "save_dots"
        keeps the weight matmul outputs, "offload" moves those to host memory (TPU/GPU).
      attention: attention kernel (`ATTENTION_IMPLS`): "auto" picks splash on TPU, cuDNN on GPU (16-bit compute)
        and XLA elsewhere; "dense" is the reference einsum path.
      scan_layers: run the (stacked) layers under ``lax.scan`` (one layer compiled once); False unrolls a Python
        loop over the same stacked parameters (for compile-time comparisons).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: bool = False
    remat_policy: str = "full"
    attention: str = "auto"
    scan_layers: bool = True

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"ModelConfig.model_type={self.model_type!r}: expected one of {MODEL_TYPES}")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}: expected one of {DTYPES}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"ModelConfig.remat_policy={self.remat_policy!r}: expected one of {REMAT_POLICIES} "
                "(--config.model.remat_policy)"
            )
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(
                f"ModelConfig.attention={self.attention!r}: expected one of {ATTENTION_IMPLS} "
                "(--config.model.attention)"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
        ):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}: must be a positive integer")
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(
                f"ModelConfig.head_dim={self.head_dim}: must be a positive even integer (RoPE pairs)"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if isinstance(self.eos_token_id, list):  # keep the dataclass hashable
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))

    def replace(self, **changes: Any) -> ModelConfig:
        """Returns a copy with ``changes`` applied (e.g. ``cfg.replace(dtype="bfloat16")``)."""
        return dataclasses.replace(self, **changes)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """All end-of-sequence ids as a tuple (empty if unset)."""
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    def to_dict(self) -> dict[str, Any]:
        """Plain-python dict of the fields (rope_scaling as a dict), e.g. for an ml_collections ConfigDict."""
        d = dataclasses.asdict(self)
        if isinstance(d["eos_token_id"], tuple):
            d["eos_token_id"] = list(d["eos_token_id"])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Inverse of `to_dict` (also accepts an ml_collections ConfigDict)."""
        d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"ModelConfig: unknown field(s) {sorted(unknown)}")
        return cls(**d)

    # ---------------------------------------------------------------------------------------------- HF interop
    @classmethod
    def from_hf(
        cls,
        config: Mapping[str, Any] | str | os.PathLike,
        *,
        param_dtype: str = "float32",
        dtype: str = "float32",
    ) -> ModelConfig:
        """Reads an HF ``config.json`` (a dict, a model directory, or the file itself).

        Args:
          config: the parsed config dict, a directory holding ``config.json``, or the path of the json file.
          param_dtype: storage dtype for our parameters (the HF ``dtype`` field is not used for this).
          dtype: compute dtype.

        Raises:
          ValueError: unreadable/corrupt file, unknown model_type, a missing field, or a feature we do not implement;
            the message names the file and the field.
        """
        hf, where = _load_hf(config)
        return _parse_hf(hf, where, param_dtype=param_dtype, dtype=dtype)

    def to_hf(self) -> dict[str, Any]:
        """A ``config.json`` dict that transformers (5.x) and vLLM load for this architecture."""
        rope_parameters: dict[str, Any] = {"rope_theta": float(self.rope_theta), "rope_type": "default"}
        if self.rope_scaling is not None:
            rope_parameters.update(
                rope_type=self.rope_scaling.rope_type,
                factor=float(self.rope_scaling.factor),
                low_freq_factor=float(self.rope_scaling.low_freq_factor),
                high_freq_factor=float(self.rope_scaling.high_freq_factor),
                original_max_position_embeddings=int(self.rope_scaling.original_max_position_embeddings),
            )
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        out: dict[str, Any] = {
            "architectures": [_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope_parameters,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "dtype": self.param_dtype,
            "torch_dtype": self.param_dtype,
            "use_cache": True,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
        }
        if self.model_type in ("qwen3", "llama"):
            out["attention_bias"] = False
        if self.model_type == "llama":
            out["mlp_bias"] = False
        else:
            out.update(use_sliding_window=False, sliding_window=None, max_window_layers=self.num_layers)
        if self.model_type == "qwen2" and self.head_dim * self.num_heads != self.hidden_size:
            raise ValueError(
                f"qwen2 export: HF Qwen2 derives head_dim from hidden_size/num_attention_heads, but head_dim="
                f"{self.head_dim} != {self.hidden_size}/{self.num_heads}"
            )
        return out


def _load_hf(config: Mapping[str, Any] | str | os.PathLike) -> tuple[dict[str, Any], str]:
    if isinstance(config, Mapping):
        return dict(config), "<config dict>"
    path = os.fspath(config)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except OSError as e:
        raise ValueError(f"{path}: cannot read HF config ({e.strerror or e})") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a valid JSON config.json ({e})") from e
    if not isinstance(hf, dict):
        raise ValueError(f"{path}: config.json must hold a JSON object, got {type(hf).__name__}")
    return hf, path


def _parse_hf(hf: dict[str, Any], where: str, *, param_dtype: str, dtype: str) -> ModelConfig:
    def need(key: str, typ: type = int) -> Any:
        if key not in hf or hf[key] is None:
            raise ValueError(f"{where}: missing required field {key!r}")
        try:
            return typ(hf[key])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: field {key!r}={hf[key]!r} is not a valid {typ.__name__}") from e

    def opt(key: str, default: Any) -> Any:
        return default if hf.get(key) is None else hf[key]

    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"{where}: field 'model_type'={model_type!r} is not supported (expected one of {MODEL_TYPES})"
        )
    if opt("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: field 'hidden_act'={hf['hidden_act']!r} is not supported (only 'silu')")
    if model_type in ("qwen3", "llama") and opt("attention_bias", False):
        raise ValueError(
            f"{where}: field 'attention_bias'=true is not supported for {model_type} (o_proj bias)"
        )
    if opt("mlp_bias", False):
        raise ValueError(f"{where}: field 'mlp_bias'=true is not supported")
    if opt("use_sliding_window", False):
        raise ValueError(f"{where}: field 'use_sliding_window'=true is not supported")

    hidden = need("hidden_size")
    heads = need("num_attention_heads")
    # HF Qwen2 has no head_dim field: it is always hidden/heads.
    head_dim = hidden // heads if model_type == "qwen2" else int(opt("head_dim", hidden // heads))

    theta, scaling = _parse_rope(hf, where)
    eos = hf.get("eos_token_id")
    try:
        return ModelConfig(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=int(opt("num_key_value_heads", heads)),
            head_dim=head_dim,
            rms_norm_eps=float(opt("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(opt("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(opt("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2",
            qk_norm=model_type == "qwen3",
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=hf.get("pad_token_id"),
            param_dtype=param_dtype,
            dtype=dtype,
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from e


def _parse_rope(hf: dict[str, Any], where: str) -> tuple[float, RopeScaling | None]:
    """RoPE settings from transformers-5 ``rope_parameters`` or the legacy ``rope_theta``/``rope_scaling`` keys."""
    params = hf.get("rope_parameters") or {}
    legacy = hf.get("rope_scaling") or {}
    field = "rope_parameters" if params else "rope_scaling"
    spec = {**legacy, **params}
    theta = spec.get("rope_theta", hf.get("rope_theta"))
    if theta is None:
        raise ValueError(f"{where}: missing required field 'rope_parameters.rope_theta' (or 'rope_theta')")
    rope_type = spec.get("rope_type", spec.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise ValueError(
            f"{where}: field '{field}.rope_type'={rope_type!r} is not supported ('default' or 'llama3')"
        )
    try:
        scaling = RopeScaling(
            factor=float(spec["factor"]),
            low_freq_factor=float(spec["low_freq_factor"]),
            high_freq_factor=float(spec["high_freq_factor"]),
            original_max_position_embeddings=int(spec["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise ValueError(f"{where}: missing required field '{field}.{e.args[0]}' for llama3 rope") from e
    return float(theta), scaling
