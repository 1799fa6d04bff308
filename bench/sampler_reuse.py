"""Time to first ``generate`` of a second `JaxSampler` of the same architecture (shared compilation).

    python -m bench.sampler_reuse [--engines 3 --prompts 8 --n 4 --max_tokens 32]

Builds ``--engines`` tiny models of one architecture (hidden 64, 2 heads of 32, 1 kv head, 2 layers,
vocab 320: the quickstart's scale) with different random parameters, and for each one times engine
construction + its first ``generate`` (temperature 1, then greedy), then a second (warm) call. Engines
of one architecture share compiled programs, so every engine after the first should cost about as much
as a warm call; before sharing (``--per_engine``), each engine recompiled everything.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--prompt_len", type=int, default=12)
    ap.add_argument("--max_tokens", type=int, default=32)
    ap.add_argument(
        "--per_engine", action="store_true", help="compile per engine (the behaviour before sharing)"
    )
    args = ap.parse_args()

    import numpy as np

    from atlas_jax.engines import jax_sampler
    from atlas_jax.engines.base import SamplingParams
    from atlas_jax.engines.jax_sampler import JaxSampler
    from atlas_jax.models.config import ModelConfig
    from atlas_jax.models.params import build_model

    cfg = ModelConfig(
        model_type="qwen3", vocab_size=320, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=2,
        num_kv_heads=1, head_dim=32, qk_norm=True, tie_word_embeddings=True, max_position_embeddings=256,
    )  # fmt: skip
    if args.per_engine:
        jax_sampler._cached_programs = jax_sampler._build_programs  # no cache: fresh programs per engine
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, cfg.vocab_size, args.prompt_len).tolist() for _ in range(args.prompts)]
    calls = [
        (SamplingParams(temperature=1.0, max_tokens=args.max_tokens, seed=0), args.n),
        (SamplingParams(temperature=0.0, max_tokens=args.max_tokens), 1),
    ]

    def run(engine: JaxSampler) -> None:
        for params, n in calls:
            engine.generate(prompts, params, n=n)

    print(f"{args.engines} engines; per engine: {args.prompts} prompts, sampled (n={args.n}) + greedy, "
          f"{args.max_tokens} tokens")  # fmt: skip
    for i in range(args.engines):
        t = time.perf_counter()
        engine = JaxSampler(build_model(cfg, seed=i), None, ignore_eos=True)
        run(engine)
        first = time.perf_counter() - t
        t = time.perf_counter()
        run(engine)
        warm = time.perf_counter() - t
        print(f"engine {i}: build + first calls {first:6.2f} s, warm calls {warm:5.2f} s", flush=True)


if __name__ == "__main__":
    main()
