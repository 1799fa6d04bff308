"""The vLLM column of the rollout benchmark: ``VLLMEngine`` generation throughput.

    python -m bench.rollout_peers [--prompts 8 --n 8 --max_tokens 128 --dtype float32]

Prints vLLM's tokens/s on a ~25M-parameter Qwen2-shape model (the DESIGN.md peer: 64 completions x
128 tokens); the model, tokenizer and prompts come from ``bench/_setup.py`` like ``bench/rollout.py``'s.
Completions ignore EOS so every engine generates exactly ``max_tokens`` per completion.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import numpy as np

from bench import _setup


def peer_model(out_dir: str | os.PathLike[str], *, seed: int = 0) -> tuple[Path, Any, dict[str, np.ndarray]]:
    """Writes the ~25M-param Qwen2-shape peer model (random weights, local tokenizer) to ``out_dir``.

    Returns:
      ``(hf_dir, ModelConfig, flat_params)``.
    """
    return _setup.bench_model(
        out_dir, seed, model_type="qwen2", vocab_size=8192, hidden_size=512, intermediate_size=1408,
        num_layers=6, num_heads=8, num_kv_heads=2, head_dim=64, qkv_bias=True, tie_word_embeddings=True,
        max_position_embeddings=2048,
    )  # fmt: skip


def vllm_rollout(
    hf_dir: str | os.PathLike[str],
    prompts: list[list[int]],
    *,
    n: int,
    max_tokens: int,
    dtype: str = "float32",
    temperature: float = 1.0,
    reps: int = 2,
) -> dict[str, float]:
    """Times ``VLLMEngine.generate`` (best of ``reps`` after one warm-up call).

    Returns:
      ``{"tok_s", "seconds", "tokens", "startup_s"}`` (generated tokens only).
    """
    from atlas_jax.engines.base import SamplingParams
    from atlas_jax.engines.vllm_engine import VLLMEngine

    t0 = time.perf_counter()
    engine = VLLMEngine(
        hf_dir, dtype=dtype, max_model_len=max(len(p) for p in prompts) + max_tokens + 8, ignore_eos=True
    )
    startup = time.perf_counter() - t0
    params = SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=0)
    try:
        engine.generate(prompts[:1], SamplingParams(temperature=temperature, max_tokens=4))
        best, tokens = float("inf"), 0
        for _ in range(reps):
            t = time.perf_counter()
            outs = engine.generate(prompts, params, n=n)
            dt = time.perf_counter() - t
            tokens = sum(len(c.token_ids) for g in outs for c in g)
            best = min(best, dt)
    finally:
        engine.close()
    return {"tok_s": tokens / best, "seconds": best, "tokens": float(tokens), "startup_s": startup}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--prompt_len", type=int, default=32)
    ap.add_argument("--max_tokens", type=int, default=128)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir, cfg, flat = peer_model(Path(tmp) / "peer")
        n_params = sum(v.size for v in flat.values())
        prompts = _setup.random_prompts(args.prompts, args.prompt_len, cfg.vocab_size)
        r = vllm_rollout(
            hf_dir, prompts, n=args.n, max_tokens=args.max_tokens, dtype=args.dtype, reps=args.reps
        )
    print(
        f"vLLM ({args.dtype}, {n_params / 1e6:.1f}M params, {args.prompts}x{args.n} completions x "
        f"{args.max_tokens} tokens): {r['tok_s']:.0f} tok/s ({r['seconds']:.2f} s, start-up {r['startup_s']:.1f} s)"
    )


if __name__ == "__main__":
    main()
