"""Train-step throughput and efficiency: our jitted SFT step vs a torch/transformers step, and both
as a fraction of this machine's matmul peak measured in the same run.

    python bench/train_step.py [--dtype bf16|fp32] [--batch 8] [--seq 256] [--steps 5]
                               [--size peer|small|tiny] [--remat] [--skip_torch]

Both sides do forward + backward + AdamW (global-norm clip 1.0) with fp32 master weights; "bf16" means
bf16 compute (our ``ModelConfig.dtype``; torch ``autocast``). The loss is completion-only cross-entropy
on every token. Prints tokens/s for each and the ratio ours / torch. A benchmark, not a test: the
numbers depend on the machine and on whatever else runs on it.

Efficiency. The step's FLOPs F come from XLA: ``step.lower(...).compile().cost_analysis()["flops"]``
of the program we time, with the layers unrolled (``scan_layers=False``: XLA counts a scan body
once). Achieved rate R = F / t_step. The peak P is the best of a few square matmuls
``[n, n] @ [n, n]`` (2n³ FLOPs each) timed here, in the compute dtype (bf16 operands with fp32
accumulation, ``preferred_element_type=float32``, the way our model multiplies; or fp32). Printed:
R / P for us, and for torch with the same F (the same model math), plus the analytic
``6·N·tokens + 12·L·T²·d·B`` (dense matmuls + causal attention scores, both directions) for comparison.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

SIZES = {
    # ~23M params, the Qwen2 shape DESIGN.md's peer numbers were measured on.
    "small": dict(vocab_size=8192, hidden_size=384, intermediate_size=1024, num_layers=6, num_heads=6,
                  num_kv_heads=2, head_dim=64),
    # the peer model of DESIGN.md (Qwen2 shape, vocab 1024): what the benchmarks report first.
    "peer": dict(vocab_size=1024, hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8,
                 num_kv_heads=2, head_dim=64),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
                 num_kv_heads=1, head_dim=32),
}  # fmt: skip


def matmul_peak(dtype: str, sizes: tuple[int, ...] = (1024, 2048), reps: int = 8) -> float:
    """Best FLOP/s of ``[n, n] @ [n, n]`` in ``dtype`` with fp32 accumulation (the model's matmul)."""
    import jax
    import jax.numpy as jnp

    best = 0.0
    for n in sizes:
        a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
        b = jnp.asarray(np.random.default_rng(1).standard_normal((n, n)), dtype)
        mm = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
        jax.block_until_ready(mm(a, b))
        for _ in range(reps):
            t = time.perf_counter()
            jax.block_until_ready(mm(a, b))
            best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def analytic_flops(size: dict, batch: int, seq: int) -> float:
    """``6·N·tokens`` (every weight matmul, forward + backward; tied unembedding counted once) plus
    the attention scores and values, ``3 · 2·2·B·L·T²·N·H`` (forward ×1, backward ×2), no causal saving."""
    d, f, v, n_l = size["hidden_size"], size["intermediate_size"], size["vocab_size"], size["num_layers"]
    q, kv = size["num_heads"] * size["head_dim"], size["num_kv_heads"] * size["head_dim"]
    n_matmul = n_l * (d * (q + 2 * kv) + q * d + 3 * d * f) + v * d
    attn = 3 * 4 * batch * n_l * seq * seq * q
    return 6 * n_matmul * batch * seq + attn


def gemm_ceiling(size: dict, rows: int, dtype: str, reps: int = 3) -> float:
    """FLOP/s of the step's weight matmuls alone at their own shapes (forward ``X·W``, backward ``dY·Wᵀ``
    and ``Xᵀ·dY``; ``rows`` = B·T), each timed alone; total FLOPs / total time."""
    import jax
    import jax.numpy as jnp

    d, f, v = size["hidden_size"], size["intermediate_size"], size["vocab_size"]
    q, kv = size["num_heads"] * size["head_dim"], size["num_kv_heads"] * size["head_dim"]
    weights = [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]  # one layer
    shapes = []  # (m, k, n, count)
    for k_in, n_out in weights:
        shapes += [(rows, k_in, n_out, size["num_layers"]), (rows, n_out, k_in, size["num_layers"])]
        shapes += [(k_in, rows, n_out, size["num_layers"])]
    shapes += [(rows, d, v, 1), (rows, v, d, 1), (d, rows, v, 1)]  # the (tied) unembedding
    mm = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    total_flops = total_s = 0.0
    for m, k, n, count in shapes:
        a, b = jnp.ones((m, k), dtype), jnp.ones((k, n), dtype)
        jax.block_until_ready(mm(a, b))
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            jax.block_until_ready(mm(a, b))
            best = min(best, time.perf_counter() - t)
        total_flops += 2 * m * k * n * count
        total_s += best * count
    return total_flops / total_s


def bench_ours(
    size: dict,
    dtype: str,
    batch: int,
    seq: int,
    steps: int,
    *,
    remat: bool = False,
    scan: bool = False,
    forward_only: bool = False,
) -> dict[str, float]:
    """Times our SFT step (or, ``forward_only``, its loss alone); returns ``tok_s``, ``step_s``, ``compile_s``
    and XLA's ``flops`` of that program."""
    import jax

    from atlas_jax.models.config import ModelConfig
    from atlas_jax.models.params import build_model
    from atlas_jax.models.sharding import make_mesh
    from atlas_jax.training import train_step
    from atlas_jax.training.optimizer import OptimSpec, make_optimizer
    from atlas_jax.training.sft import sft_loss_fn

    cfg = ModelConfig(
        model_type="qwen2", qkv_bias=True, tie_word_embeddings=True, dtype=dtype, remat=remat,
        scan_layers=scan, **size,
    )  # fmt: skip
    mesh = make_mesh((1, jax.device_count(), 1))
    graphdef, params, rest = train_step.split_model(build_model(cfg, mesh=mesh, seed=0))
    tx, _ = make_optimizer(OptimSpec(learning_rate=1e-4, total_steps=1000, max_grad_norm=1.0))
    state = train_step.init_state(tx, params, mesh)
    sh = train_step.state_shardings(tx, params, mesh)
    step = train_step.make_train_step(
        graphdef, rest, tx, sft_loss_fn(256), num_micro=1, mesh=mesh, shardings=sh
    )
    if forward_only:
        fwd = train_step.make_eval_fn(
            graphdef, rest, sft_loss_fn(256), num_micro=1, mesh=mesh, param_shardings=sh.params
        )
        params = state.params

        def step(_, batch):  # same call shape as the train step; the state is never changed
            return state, fwd(params, batch)

        step.lower = lambda _, batch: fwd.lower(params, batch)
    rng = np.random.default_rng(0)
    b = {
        "tokens": rng.integers(0, size["vocab_size"], (batch, seq)).astype(np.int32),
        "attention_mask": np.ones((batch, seq), np.int32),
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
        "loss_mask": np.ones((batch, seq), np.float32),
    }
    cost = step.lower(state, b).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    t = time.perf_counter()
    state, m = step(state, b)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, m = step(state, b)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    best = min(times)
    return {
        "tok_s": batch * seq / best,
        "step_s": best,
        "compile_s": compile_s,
        "flops": float(cost["flops"]),
    }


def bench_torch(size: dict, dtype: str, batch: int, seq: int, steps: int) -> float:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=size["vocab_size"], hidden_size=size["hidden_size"], intermediate_size=size["intermediate_size"],
        num_hidden_layers=size["num_layers"], num_attention_heads=size["num_heads"],
        num_key_value_heads=size["num_kv_heads"], tie_word_embeddings=True, attn_implementation="sdpa",
    )  # fmt: skip
    model = Qwen2ForCausalLM(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    ids = torch.randint(0, size["vocab_size"], (batch, seq))

    def one():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    one()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        one()
        times.append(time.perf_counter() - t)
    return batch * seq / min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps (the best one counts)")
    p.add_argument("--size", choices=sorted(SIZES), default="peer")
    p.add_argument("--remat", action="store_true", help="rematerialise each layer (ModelConfig.remat)")
    p.add_argument(
        "--scan", action="store_true", help="also time the scanned-layer program (the default layout)"
    )
    p.add_argument("--skip_torch", action="store_true")
    p.add_argument(
        "--explain",
        action="store_true",
        help="also: the forward pass alone, and the step's matmuls at their shapes",
    )
    a = p.parse_args()
    dtype = {"bf16": "bfloat16", "fp32": "float32"}[a.dtype]
    size = SIZES[a.size]
    peak_before = matmul_peak(dtype)
    ours = bench_ours(size, dtype, a.batch, a.seq, a.steps, remat=a.remat)
    flops, model_flops = ours["flops"], analytic_flops(size, a.batch, a.seq)
    if flops < 0.5 * model_flops:  # XLA does not count custom calls (the AMX kernel's products): use the math
        print(f"XLA counts {flops / 1e9:.2f} GFLOP (custom calls uncounted): using the analytic count")
        flops = model_flops
    rows = [("atlas-jax (layers unrolled)", ours["tok_s"], ours["step_s"])]
    if a.scan:
        sc = bench_ours(size, dtype, a.batch, a.seq, a.steps, remat=a.remat, scan=True)
        rows.append(("atlas-jax (layers scanned)", sc["tok_s"], sc["step_s"]))
    explain = {}
    if a.explain:
        fwd = bench_ours(size, dtype, a.batch, a.seq, a.steps, remat=a.remat, forward_only=True)
        explain["forward"] = fwd
        explain["gemm"] = gemm_ceiling(size, a.batch * a.seq, dtype)
    if not a.skip_torch:
        theirs = bench_torch(size, dtype, a.batch, a.seq, a.steps)
        rows.append(
            (
                "torch/transformers" + (" autocast" if a.dtype == "bf16" else ""),
                theirs,
                a.batch * a.seq / theirs,
            )
        )
    peak_after = matmul_peak(dtype)
    peak = max(peak_before, peak_after)  # the machine is shared: the better of the two is the peak
    print(
        f"train step {a.size} {a.dtype} {a.batch}x{a.seq}, remat={a.remat}: XLA cost_analysis {flops / 1e9:.2f} GFLOP/step "
        f"(analytic 6NT + attention {model_flops / 1e9:.2f}); compile {ours['compile_s']:.1f} s"
    )
    print(
        f"matmul peak ({a.dtype} operands, fp32 accumulation, measured in this run): {peak / 1e9:.0f} GFLOP/s "
        f"(before {peak_before / 1e9:.0f}, after {peak_after / 1e9:.0f})"
    )
    print(f"{'':30} {'tok/s':>8} {'step ms':>8} {'GFLOP/s':>8} {'of peak':>8}")
    for name, tok_s, step_s in rows:
        rate = flops / step_s
        print(f"{name:30} {tok_s:8,.0f} {step_s * 1e3:8.0f} {rate / 1e9:8.1f} {rate / peak:8.1%}")
    if explain:
        fwd = explain["forward"]
        rate = fwd["flops"] / fwd["step_s"]
        print(
            f"{'forward (loss) alone':30} {fwd['tok_s']:8,.0f} {fwd['step_s'] * 1e3:8.0f} {rate / 1e9:8.1f} "
            f"{rate / peak:8.1%}   ({fwd['flops'] / 1e9:.1f} GFLOP)"
        )
        g = explain["gemm"]
        print(
            f"{'its matmuls, each alone':30} {'':8} {flops / g * 1e3:8.0f} {g / 1e9:8.1f} {g / peak:8.1%}   "
            "(their shapes, each timed alone: the ceiling for this model)"
        )
    if not a.skip_torch:
        print(f"ratio ours / torch: {ours['tok_s'] / theirs:.2f}")


if __name__ == "__main__":
    main()
