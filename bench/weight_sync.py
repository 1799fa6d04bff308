"""Weight push into a running vLLM vs one plain memcpy of the same bytes.

    python -m bench.weight_sync [--hidden 512 --layers 6 --vocab 8192 --reps 5]

Builds a ~20M-parameter Qwen3-shape model (random params in our layout), exports it with
``converters.jax_to_hf.export_hf_dir``, starts ``VLLMEngine`` on it (fp32, CPU), then times
(best of ``--reps``):

* memcpy: ``np.copyto`` of one buffer holding all parameter bytes (the floor);
* sync: ``VLLMEngine.update_weights(params)`` from numpy params (zero-copy views into vLLM's reload);
* sync (jax): the same from JAX CPU arrays;
* disk: ``export_hf_dir`` + ``load_hf_dir`` (the round trip the in-memory push avoids).

Prints each time, the ratio sync/memcpy (target <= 2x) and checks the push took effect (greedy
output changes between two param sets and returns when the first is pushed back).
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--tied", action="store_true", help="tie embeddings (default untied)")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()

    import jax.numpy as jnp

    from atlas_jax.engines.base import SamplingParams
    from atlas_jax.engines.vllm_engine import VLLMEngine
    from converters.jax_to_hf import export_hf_dir

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, cfg, params_a = _setup.bench_model(
            Path(tmp) / "hf", 0, model_type="qwen3", vocab_size=args.vocab, hidden_size=args.hidden,
            intermediate_size=args.hidden * 11 // 4, num_layers=args.layers, num_heads=args.hidden // 64,
            num_kv_heads=2, head_dim=64, qk_norm=True, tie_word_embeddings=args.tied,
            max_position_embeddings=1024,
        )  # fmt: skip
        params_b = _setup.random_params(cfg, 1)
        n_params = sum(v.size for v in params_a.values())
        n_bytes = sum(v.nbytes for v in params_a.values())
        print(
            f"model: qwen3 D={cfg.hidden_size} L={cfg.num_layers} V={cfg.vocab_size} "
            f"tied={cfg.tie_word_embeddings}: {n_params / 1e6:.1f}M params, {n_bytes / 2**20:.0f} MiB fp32"
        )
        engine = VLLMEngine(model_dir, max_model_len=256)
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

        breakdown = _profile_push(engine, params_b)

        def disk() -> None:
            d = export_hf_dir(params_b, cfg, Path(tmp) / "round_trip", overwrite=True)
            engine.load_hf_dir(d)

        t_disk = _best(disk, max(1, args.reps // 2))
        engine.close()

    gbps = n_bytes / t_memcpy / 1e9
    print(f"memcpy (np.copyto, {n_bytes / 2**20:.0f} MiB): {t_memcpy * 1e3:8.1f} ms  ({gbps:.1f} GB/s)")
    print(
        f"sync   update_weights(numpy)      : {t_sync * 1e3:8.1f} ms  ratio {t_sync / t_memcpy:5.2f}x memcpy"
    )
    print(
        f"sync   update_weights(jax cpu)    : {t_sync_jax * 1e3:8.1f} ms  ratio {t_sync_jax / t_memcpy:5.2f}x memcpy"
    )
    print(
        f"disk   export_hf_dir + load_hf_dir: {t_disk * 1e3:8.1f} ms  ratio {t_disk / t_memcpy:5.2f}x memcpy"
    )
    total = breakdown["total"]
    print(
        f"one push, profiled ({total * 1e3:.0f} ms under cProfile): vLLM oneDNN re-pack "
        f"{breakdown['repack'] / total:.0%}, tensor copies inside vLLM {breakdown['copy'] / total:.0%}, "
        f"our hand-over (to_torch + layout views) {breakdown['handover'] / total:.0%}, rest (vLLM reload bookkeeping) "
        f"{1 - (breakdown['repack'] + breakdown['copy'] + breakdown['handover']) / total:.0%}"
    )
    print("target: sync <= 2x memcpy")


if __name__ == "__main__":
    main()
