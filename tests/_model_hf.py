"""Test helpers: tiny random HF models of each family and a left-padded batch (shared by tests/test_model_*.py)."""

from __future__ import annotations

import numpy as np
import torch
import transformers

from atlas_jax.models.config import ModelConfig
from converters.mapping import hf_to_flat

VOCAB = 257  # prime, so no dimension coincides with another
_COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 256,
}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
FAMILIES = ("qwen3_tied", "qwen3_untied", "qwen2", "llama3")


def hf_config(family: str) -> transformers.PretrainedConfig:
    """A tiny transformers config for ``family`` (one of FAMILIES)."""
    if family in ("qwen3_tied", "qwen3_untied"):
        return transformers.Qwen3Config(
            **_COMMON, head_dim=32, rope_theta=1e6, tie_word_embeddings=family == "qwen3_tied"
        )
    if family == "qwen2":
        return transformers.Qwen2Config(**_COMMON, rope_theta=1e6, tie_word_embeddings=False)
    if family == "llama3":
        return transformers.LlamaConfig(
            **_COMMON, head_dim=32, rope_parameters=dict(LLAMA3_ROPE), tie_word_embeddings=False
        )
    raise ValueError(family)


def hf_model(family: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A random fp32 HF model; norm scales and biases are perturbed so that a dropped one changes the logits."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.2 * torch.randn_like(p))
    return model


def ours_from_hf(model: transformers.PreTrainedModel, tmp_path, **cfg_overrides) -> tuple[ModelConfig, dict]:
    """(ModelConfig read from the saved config.json, flat params converted from the HF state dict)."""
    model.config.save_pretrained(tmp_path)
    cfg = ModelConfig.from_hf(tmp_path).replace(**cfg_overrides)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return cfg, hf_to_flat(state, cfg)


def left_padded_batch(seed: int = 0, lengths=(11, 7, 3, 9), width: int = 11):
    """(input_ids, positions, attention_mask) int32 numpy arrays of a left-padded batch; pads hold token 0."""
    rng = np.random.default_rng(seed)
    b = len(lengths)
    ids = np.zeros((b, width), np.int32)
    mask = np.zeros((b, width), np.int32)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = rng.integers(1, VOCAB, n)
        mask[row, width - n :] = 1
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return ids, positions, mask


def hf_logits(model: transformers.PreTrainedModel, ids, positions, mask) -> np.ndarray:
    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(ids, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),
            position_ids=torch.as_tensor(positions, dtype=torch.long),
        )
    return out.logits.float().numpy()
