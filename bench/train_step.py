"""Train-step throughput: our jitted SFT step vs a torch/transformers step on the same model and batch.

    python bench/train_step.py [--dtype bf16|fp32] [--batch 8] [--seq 256] [--steps 5] [--size small|tiny]

Both sides do forward + backward + AdamW (global-norm clip 1.0) with fp32 master weights; "bf16" means
bf16 compute (our ``ModelConfig.dtype``; torch ``autocast``). The loss is completion-only cross-entropy
on every token. Prints tokens/s for each and the ratio ours / torch. A benchmark, not a test: the
numbers depend on the machine and on whatever else runs on it.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

SIZES = {
    # ~23M params, the Qwen2 shape DESIGN.md's peer numbers were measured on.
    "small": dict(vocab_size=8192, hidden_size=384, intermediate_size=1024, num_layers=6, num_heads=6,
                  num_kv_heads=2, head_dim=64),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
                 num_kv_heads=1, head_dim=32),
}  # fmt: skip


def bench_ours(size: dict, dtype: str, batch: int, seq: int, steps: int) -> tuple[float, float]:
    import jax

    from atlas_jax.models.config import ModelConfig
    from atlas_jax.models.params import build_model
    from atlas_jax.models.sharding import make_mesh
    from atlas_jax.training import train_step
    from atlas_jax.training.optimizer import OptimSpec, make_optimizer
    from atlas_jax.training.sft import sft_loss_fn

    cfg = ModelConfig(model_type="qwen2", qkv_bias=True, tie_word_embeddings=True, dtype=dtype, **size)
    mesh = make_mesh((1, jax.device_count(), 1))
    graphdef, params, rest = train_step.split_model(build_model(cfg, mesh=mesh, seed=0))
    tx, _ = make_optimizer(OptimSpec(learning_rate=1e-4, total_steps=1000, max_grad_norm=1.0))
    state = train_step.init_state(tx, params, mesh)
    sh = train_step.state_shardings(tx, params, mesh)
    step = train_step.make_train_step(
        graphdef, rest, tx, sft_loss_fn(256), num_micro=1, mesh=mesh, shardings=sh
    )
    rng = np.random.default_rng(0)
    b = {
        "tokens": rng.integers(0, size["vocab_size"], (batch, seq)).astype(np.int32),
        "attention_mask": np.ones((batch, seq), np.int32),
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
        "loss_mask": np.ones((batch, seq), np.float32),
    }
    t = time.perf_counter()
    state, m = step(state, b)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, b)
    jax.block_until_ready(m)
    return batch * seq * steps / (time.perf_counter() - t), compile_s


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
    t = time.perf_counter()
    for _ in range(steps):
        one()
    return batch * seq * steps / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--skip_torch", action="store_true")
    a = p.parse_args()
    dtype = {"bf16": "bfloat16", "fp32": "float32"}[a.dtype]
    size = SIZES[a.size]
    ours, compile_s = bench_ours(size, dtype, a.batch, a.seq, a.steps)
    print(
        f"atlas-jax train step ({a.size}, {a.dtype}, {a.batch}x{a.seq}): {ours:,.0f} tok/s (compile {compile_s:.1f} s)"
    )
    if not a.skip_torch:
        theirs = bench_torch(size, dtype, a.batch, a.seq, a.steps)
        print(f"torch/transformers train step: {theirs:,.0f} tok/s")
        print(f"ratio ours / torch: {ours / theirs:.2f}")


if __name__ == "__main__":
    main()
