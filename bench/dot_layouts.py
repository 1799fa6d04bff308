"""The three matmuls of a linear layer's training step, at one shape, in bf16 and fp32 (XLA:CPU).

    python -m bench.dot_layouts [--rows 2048 --d_in 512 --d_out 1408]

Forward ``X·W``, input gradient ``dY·Wᵀ`` and weight gradient ``Xᵀ·dY`` (contracting the rows), each as
``lax.dot_general`` with fp32 accumulation (``preferred_element_type=float32``, the way the model multiplies),
best of 7; prints GFLOP/s (2·rows·d_in·d_out per call). Found with ``bench/train_step.py --explain``: on this
machine the bf16 weight-gradient dot runs at about half the rate of the other two, slower than fp32.
"""

from __future__ import annotations

import argparse
import time


def best(f, *args, reps: int = 7) -> float:
    import jax

    jax.block_until_ready(f(*args))
    out = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        out = min(out, time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2048, help="B·T")
    ap.add_argument("--d_in", type=int, default=512)
    ap.add_argument("--d_out", type=int, default=1408)
    a = ap.parse_args()

    import jax
    import jax.numpy as jnp

    r, k, n = a.rows, a.d_in, a.d_out
    f32 = jnp.float32
    dots = {
        "X·W (forward)": (lambda x, w: jnp.dot(x, w, preferred_element_type=f32), (r, k), (k, n)),
        "dY·Wᵀ (input grad)": (
            lambda dy, w: jax.lax.dot_general(dy, w, (((1,), (1,)), ((), ())), preferred_element_type=f32),
            (r, n),
            (k, n),
        ),
        "Xᵀ·dY (weight grad)": (
            lambda x, dy: jax.lax.dot_general(x, dy, (((0,), (0,)), ((), ())), preferred_element_type=f32),
            (r, k),
            (r, n),
        ),
    }
    flops = 2 * r * k * n
    print(f"GFLOP/s of [{r}x{k}] and [{k}x{n}] dots, fp32 accumulation")
    print(f"{'':22} {'bfloat16':>9} {'float32':>9}")
    for name, (fn, sa, sb) in dots.items():
        f = jax.jit(fn)
        rates = [
            flops / best(f, jnp.ones(sa, dt), jnp.ones(sb, dt)) / 1e9 for dt in (jnp.bfloat16, jnp.float32)
        ]
        print(f"{name:22} {rates[0]:9.1f} {rates[1]:9.1f}")


if __name__ == "__main__":
    main()
