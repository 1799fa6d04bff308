"""Weight push into a running vLLM vs one plain memcpy of the same bytes, split into ours and vLLM's.

    python -m bench.weight_sync [--shape peer|qwen3] [--dtype float32|bfloat16] [--reps 5]

``--shape peer`` (default) is the peer model of DESIGN.md (Qwen2, vocab 1024, hidden 512, MLP 1408,
8 layers, 8/2 heads, tied, qkv bias; 23.1M params); ``qwen3`` the 25M-param untied Qwen3 shape the
README's first number was measured on. Random params in our layout are exported with
``converters.jax_to_hf.export_hf_dir`` and served by ``VLLMEngine`` (CPU, ``--dtype``). Timed, best of
``--reps``:

* memcpy: ``np.copyto`` of one buffer holding all parameter bytes (the floor);
* sync: ``VLLMEngine.update_weights(params)`` from numpy params and from JAX CPU arrays;
* disk: ``export_hf_dir`` + ``load_hf_dir`` (the round trip the in-memory push avoids).

The split of one push (from JAX arrays; wall clock, no profiler): **ours** = ``flat_params`` +
``hf_tensors`` (key/shape validation and building the HF-layout views, measured as the time spent
inside our stream's ``next()`` while vLLM pulls it); **vLLM's** = ``reload_weights`` minus that (its
layer-wise reload: materialise each layer, ``weight_loader`` copies, ``process_weights_after_loading``
= oneDNN re-pack, copy back into the original storage), the tied ``lm_head`` re-pack and
``reset_prefix_cache``. A cProfile of one more push splits vLLM's reload into the oneDNN re-pack and
the rest. Also checks the push took effect (greedy output changes between two param sets and returns
when the first is pushed back).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import numpy as np

from bench import _setup


def _best(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _profile_push(engine, params) -> dict[str, float]:
    """Where one ``update_weights`` spends its time (cProfile, so slower than unprofiled)."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    engine.update_weights(params)
    prof.disable()
    stats = pstats.Stats(prof).stats  # {(file, line, name): (cc, nc, tottime, cumtime, callers)}
    out = {"total": 0.0, "repack": 0.0, "copy": 0.0, "handover": 0.0}
    for (file, _, name), (_, _, tottime, cumtime, _) in stats.items():
        out["total"] += tottime
        if "create_onednn_mm" in name or "convert_weight_packed" in name:
            out["repack"] += tottime
        elif name == "<method 'copy_' of 'torch._C.TensorBase' objects>":
            out["copy"] += tottime
        elif file.endswith("weight_sync.py") and name in ("to_torch", "_hf_layout"):
            out["handover"] += cumtime
    return out


SHAPES = {
    "peer": dict(model_type="qwen2", vocab_size=1024, hidden_size=512, intermediate_size=1408, num_layers=8,
                 num_heads=8, num_kv_heads=2, head_dim=64, qkv_bias=True, tie_word_embeddings=True,
                 rope_theta=1e4, max_position_embeddings=1024),
    "qwen3": dict(model_type="qwen3", vocab_size=8192, hidden_size=512, intermediate_size=1408, num_layers=6,
                  num_heads=8, num_kv_heads=2, head_dim=64, qk_norm=True, tie_word_embeddings=False,
                  max_position_embeddings=1024),
}  # fmt: skip


class _TimedStream:
    """Wraps our tensor stream and sums the seconds spent producing each item (our share of a push)."""

    def __init__(self, inner) -> None:
        self.inner, self.seconds = inner, 0.0

    def __iter__(self):
        return self

    def __next__(self):
        t = time.perf_counter()
        try:
            return next(self.inner)
        finally:
            self.seconds += time.perf_counter() - t


def _repack_lm_head(worker) -> float:
    """Seconds of the tied ``lm_head`` re-pack alone (the step ``push_to_vllm`` adds after reload)."""
    model = worker.model_runner.get_model()
    t = time.perf_counter()
    model.lm_head.quant_method.process_weights_after_loading(model.lm_head)
    return time.perf_counter() - t


def split_push(engine, params, tied: bool) -> dict[str, float]:
    """Wall-clock split of one ``update_weights(params)`` (see the module docstring)."""
    from atlas_jax.engines import weight_sync

    t0 = time.perf_counter()
    flat = weight_sync.flat_params(params)
    stream = weight_sync.hf_tensors(flat, engine.model_config)  # validates keys and shapes now
    t_prepare = time.perf_counter() - t0
    timed = _TimedStream(stream)
    t1 = time.perf_counter()
    engine._llm.collective_rpc(weight_sync.push_to_vllm, args=(timed,))
    t_reload = time.perf_counter() - t1
    t2 = time.perf_counter()
    engine.reset_prefix_cache()
    t_prefix = time.perf_counter() - t2
    t_repack_head = engine._llm.collective_rpc(_repack_lm_head)[0] if tied else 0.0
    return {
        "ours": t_prepare + timed.seconds,
        "vllm_reload": t_reload - timed.seconds - t_repack_head,
        "vllm_head": t_repack_head,
        "vllm_prefix": t_prefix,
        "total": time.perf_counter() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="peer")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="vLLM's dtype")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()

    import jax.numpy as jnp

    from atlas_jax.engines.base import SamplingParams
    from atlas_jax.engines.vllm_engine import VLLMEngine
    from converters.jax_to_hf import export_hf_dir

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, cfg, params_a = _setup.bench_model(Path(tmp) / "hf", 0, **SHAPES[args.shape])
        params_b = _setup.random_params(cfg, 1)
        n_params = sum(v.size for v in params_a.values())
        n_bytes = sum(v.nbytes for v in params_a.values())
        print(
            f"model: {args.shape} ({cfg.model_type}) D={cfg.hidden_size} L={cfg.num_layers} V={cfg.vocab_size} "
            f"tied={cfg.tie_word_embeddings}: {n_params / 1e6:.1f}M params, {n_bytes / 2**20:.0f} MiB fp32; "
            f"vLLM dtype {args.dtype}"
        )
        engine = VLLMEngine(model_dir, dtype=args.dtype, max_model_len=256)
        greedy = SamplingParams(temperature=0.0, max_tokens=8)
        prompt = [[5, 6, 7, 8]]

        def out() -> list[int]:
            return engine.generate(prompt, greedy)[0][0].token_ids

        first = out()
        engine.update_weights(params_b)
        second = out()
        engine.update_weights(params_a)
        back = out()
        print(f"push took effect: {first != second}; pushed back A reproduces A: {first == back}")

        src = np.concatenate([v.ravel() for v in params_a.values()])
        dst = np.empty_like(src)
        t_memcpy = _best(lambda: np.copyto(dst, src), args.reps)
        t_sync = _best(lambda: engine.update_weights(params_b), args.reps)
        jparams = {k: jnp.asarray(v) for k, v in params_b.items()}
        t_sync_jax = _best(lambda: engine.update_weights(jparams), args.reps)
        from atlas_jax.engines import weight_sync

        def ours_alone() -> None:  # our stream consumed without vLLM (no torch threads competing)
            for _ in weight_sync.hf_tensors(weight_sync.flat_params(jparams), cfg):
                pass

        t_ours_alone = _best(ours_alone, args.reps)
        splits = [split_push(engine, jparams, cfg.tie_word_embeddings) for _ in range(args.reps)]
        split = min(splits, key=lambda r: r["total"])

        breakdown = _profile_push(engine, params_b)

        def disk() -> None:
            d = export_hf_dir(params_b, cfg, Path(tmp) / "round_trip", overwrite=True)
            engine.load_hf_dir(d)

        t_disk = _best(disk, max(1, args.reps // 2))
        engine.close()

    gbps = n_bytes / t_memcpy / 1e9
    print(f"{'':38} {'ms':>8} {'x memcpy':>9}")
    for name, t in (
        (f"memcpy (np.copyto, {n_bytes / 2**20:.0f} MiB, {gbps:.1f} GB/s)", t_memcpy),
        ("sync update_weights(numpy)", t_sync),
        ("sync update_weights(jax cpu)", t_sync_jax),
        ("disk export_hf_dir + load_hf_dir", t_disk),
    ):
        print(f"{name:38} {t * 1e3:8.1f} {t / t_memcpy:9.2f}")
    total = split["total"]
    print(f"one push from JAX arrays, split (best of {args.reps}, {total * 1e3:.1f} ms):")
    for name, key in (
        ("ours: flat_params + hf_tensors views", "ours"),
        ("vLLM: reload_weights (layer-wise)", "vllm_reload"),
        ("vLLM: tied lm_head re-pack", "vllm_head"),
        ("vLLM: reset_prefix_cache", "vllm_prefix"),
    ):
        print(
            f"  {name:36} {split[key] * 1e3:8.1f} ms {split[key] / total:6.1%}  {split[key] / t_memcpy:6.2f}x memcpy"
        )
    print(
        f"  ours alone (the same stream consumed without vLLM): {t_ours_alone * 1e3:.1f} ms "
        f"({t_ours_alone / total:.1%} of the push)"
    )
    ptotal = breakdown["total"]
    print(
        f"inside vLLM's reload (cProfile, {ptotal * 1e3:.0f} ms profiled): oneDNN re-pack "
        f"{breakdown['repack'] / ptotal:.0%}, tensor copies {breakdown['copy'] / ptotal:.0%}, "
        f"rest (reload bookkeeping) "
        f"{1 - (breakdown['repack'] + breakdown['copy'] + breakdown['handover']) / ptotal:.0%}; "
        f"our to_torch + layout views {breakdown['handover'] / ptotal:.0%}"
    )
    print("target: sync <= 2x memcpy")


if __name__ == "__main__":
    main()
