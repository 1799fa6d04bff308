"""The CPU matmul kernels (`atlas_jax.kernels.cpu_matmul`) vs XLA:CPU's own dot, one product at a time.

    python -m bench.cpu_kernel [--dtypes bfloat16,float32] [--rows 1,16,64] [--shapes 896x4864,4864x896,...]

For each dtype, row count M and weight shape K x N: ``y[M,N] = x[M,K] · w[K,N]`` with f32 accumulation, XLA's
``einsum(..., preferred_element_type=f32)`` on the row-major weight against the kernel on the packed one. Each
timing chains enough distinct weights in one jitted program to read >= 160 MB (more than L3, as in a decode step
of a real model), median of ``--reps``. Prints ms per product, weight GB/s, the speed-up and both results' max
error relative to a float64 product of the same operands. The defaults are the Qwen2-0.5B decode products
(hidden 896, MLP 4864, vocab 151,936) and the peer model's (hidden 512, MLP 1408, vocab 1024).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import atlas_jax  # noqa: F401  (XLA:CPU flags before the first JAX computation)
from atlas_jax.kernels import cpu_matmul

SHAPES = "896x4864,4864x896,896x896,896x151936,512x1408,1408x512,512x1024"


def _xla(x, w):
    return jnp.einsum("mk,kn->mn", x, w, preferred_element_type=jnp.float32)


def _time(fn, x, ws, reps: int) -> float:
    def chain(x, ws):
        acc = fn(x, ws[0])
        for w in ws[1:]:
            acc = acc + fn(x, w)
        return acc

    f = jax.jit(chain)
    f(x, ws).block_until_ready()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f(x, ws).block_until_ready()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) / len(ws)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated operand dtypes")
    ap.add_argument("--rows", default="1,16,64", help="comma-separated row counts M")
    ap.add_argument("--shapes", default=SHAPES, help="comma-separated KxN weight shapes")
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args(argv)
    if not cpu_matmul.available():
        raise SystemExit(
            f"the kernel is not available here (needs {', '.join(cpu_matmul.CPU_FLAGS)}; see {cpu_matmul.ENV})"
        )
    rng = np.random.default_rng(0)
    shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]
    print(
        f"{'dtype':>8} {'M':>4} {'K x N':>14} {'xla ms':>8} {'GB/s':>6} {'kernel ms':>9} {'GB/s':>6} {'speed-up':>8}  rel. err xla / kernel"
    )
    cases = [
        (d, int(r), k, n) for d in args.dtypes.split(",") for r in args.rows.split(",") for k, n in shapes
    ]
    for dtype, m, k, n in cases:
        size = jnp.dtype(dtype).itemsize
        copies = max(1, min(16, int(160e6 // (k * n * size))))
        x = jnp.asarray(rng.standard_normal((m, k)), dtype)
        ws = [jnp.asarray(0.05 * rng.standard_normal((k, n)), dtype) for _ in range(copies)]
        packed = [cpu_matmul.pack(w, dtype=dtype) for w in ws]
        ref = np.asarray(x, np.float64) @ np.asarray(ws[0], np.float64)
        scale = np.abs(ref).max() + 1e-30
        errs = [
            np.abs(np.asarray(jax.jit(fn)(x, w)) - ref).max() / scale
            for fn, w in ((_xla, ws[0]), (cpu_matmul.matmul, packed[0]))
        ]
        t_xla, t_ker = _time(_xla, x, ws, args.reps), _time(cpu_matmul.matmul, x, packed, args.reps)
        gb = k * n * size / 1e9
        print(
            f"{dtype:>8} {m:4d} {f'{k}x{n}':>14} {1e3 * t_xla:8.3f} {gb / t_xla:6.1f} {1e3 * t_ker:9.3f} {gb / t_ker:6.1f}"
            f" {t_xla / t_ker:7.2f}x  {errs[0]:.1e} / {errs[1]:.1e}",
            flush=True,
        )
        del ws, packed


if __name__ == "__main__":
    main()
