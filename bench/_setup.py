"""What the benchmarks share: a local tokenizer, random parameters, an HF model folder, random prompts.

Nothing downloads: the tokenizer is a byte-level BPE trained here, parameters are random in our
layout (norm scales 1, other weights ``N(0, 0.05²)``), and the folder is written by
``converters.jax_to_hf.export_hf_dir``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np


def bench_tokenizer(corpus: str = "benchmark") -> Any:
    """A 300-token byte-level BPE (``<unk>`` = 0, ``<|endoftext|>`` = 1, the EOS) as an HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([f"{corpus} line {i}" for i in range(200)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<unk>")


def random_params(cfg: Any, seed: int = 0) -> dict[str, np.ndarray]:
    """Flat float32 params of ``cfg`` in our layout: norm scales 1, the rest ``0.05 · N(0, 1)``."""
    from converters import mapping

    rng = np.random.default_rng(seed)
    flat = {}
    for ours, shape in mapping.flat_shapes(cfg).items():
        scale = ours.endswith("scale")
        flat[ours] = np.ones(shape, np.float32) if scale else rng.standard_normal(shape, np.float32) * 0.05
    return flat


def bench_model(
    out_dir: str | os.PathLike[str], seed: int = 0, **config: Any
) -> tuple[Path, Any, dict[str, np.ndarray]]:
    """Writes a random model of ``ModelConfig(**config)`` (EOS from `bench_tokenizer`) as an HF folder.

    Returns:
      ``(hf_dir, ModelConfig, flat_params)``.
    """
    from atlas_jax.models.config import ModelConfig
    from converters.jax_to_hf import export_hf_dir

    tok = bench_tokenizer()
    cfg = ModelConfig(**config, eos_token_id=tok.eos_token_id)
    flat = random_params(cfg, seed)
    return export_hf_dir(flat, cfg, Path(out_dir), tokenizer_src=tok, overwrite=True), cfg, flat


def random_prompts(num_prompts: int, prompt_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Random token-id prompts (ids 10..vocab-1, avoiding the special tokens)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(10, vocab, prompt_len).tolist() for _ in range(num_prompts)]
