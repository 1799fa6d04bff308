"""Peak host memory of HF -> JAX -> HF conversion on a mid-size random model (not a test).

    python bench/convert_memory.py [--hidden 1024 --layers 12 --vocab 32000] [--workdir /tmp/x]

Writes a random fp32 Llama-shape checkpoint straight from the mapping table's shapes, then runs
``hf_to_jax`` and ``jax_to_hf`` each in a fresh interpreter and prints the peak RSS increase over
the post-import baseline as a multiple of the weights' size (goal: <= ~2x).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def phase(name: str, work: Path) -> None:
    from converters import hf_to_jax, jax_to_hf  # Imports first: they are the baseline, not the conversion.

    base = _rss_mb()
    if name == "hf_to_jax":
        hf_to_jax.convert(work / "hf", work / "ckpt")
    else:
        jax_to_hf.convert(work / "ckpt", work / "back")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"phase": name, "baseline_mb": base, "peak_mb": peak}))


def make_model(work: Path, hidden: int, layers: int, vocab: int) -> float:
    from atlas_jax.models.config import ModelConfig
    from converters import mapping
    from converters.safetensors_io import write_safetensors

    cfg = ModelConfig(
        model_type="llama",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_layers=layers,
        num_heads=hidden // 64,
        num_kv_heads=max(1, hidden // 256),
        head_dim=64,
        rope_theta=10000.0,
    )
    (work / "hf").mkdir(parents=True)
    rng = np.random.default_rng(0)
    shapes = mapping.hf_shapes(cfg)
    write_safetensors(
        ((k, rng.standard_normal(s, dtype=np.float32)) for k, s in shapes.items()),
        work / "hf",
        max_shard_bytes=200 * 1000**2,  # sharded input, like real checkpoints
    )
    (work / "hf" / "config.json").write_text(json.dumps(cfg.to_hf()))
    return sum(int(np.prod(s)) for s in shapes.values()) * 4 / 1024**2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        phase(args.phase, Path(args.workdir))
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="convert_memory_"))
    try:
        weights_mb = make_model(work, args.hidden, args.layers, args.vocab)
        print(f"weights: {weights_mb:.0f} MB fp32")
        for name in ("hf_to_jax", "jax_to_hf"):
            out = (
                subprocess.run(
                    [sys.executable, __file__, "--phase", name, "--workdir", str(work)],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                .stdout.strip()
                .splitlines()[-1]
            )
            r = json.loads(out)
            extra = r["peak_mb"] - r["baseline_mb"]
            print(f"{name}: peak RSS +{extra:.0f} MB over baseline = {extra / weights_mb:.2f}x the weights")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
