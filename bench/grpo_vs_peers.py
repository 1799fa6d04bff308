"""A GRPO step (generation + update) of ours vs TRL's ``GRPOTrainer`` on the same model and workload.

    python -m bench.grpo_vs_peers [--steps 3] [--peers trl] [--trl_venv /work/venv-i14-trl]

Workload (issue 14): the DESIGN.md peer model (Qwen2, vocab 1024, hidden 512, MLP 1408, 8 layers, 8 heads,
2 kv heads, tied, qkv bias, θ 1e4; random weights, written once as an HF folder), 8 prompts x 8
generations x exactly 128 completion tokens per step (EOS ignored / ``min_new_tokens``), β = 0, one
optimiser update per step, bf16 compute with fp32 master weights, a random reward. The metric is
completion tokens per second of whole steps (generation + scoring + update), best and worst of
``--steps`` timed steps after one warm-up step (compilation).

Ours: ``JaxSampler`` (the rollout copy, ``n=8``) + ``GRPOLearner.update`` in this process. TRL:
``trl==1.16.0`` ``GRPOTrainer`` with its defaults (transformers ``generate``; torch CPU, bf16) in its own
venv (``--trl_venv``; created with ``pip install torch==2.13.0 trl==1.16.0`` if missing), run as a
subprocess on the same HF folder; it reports its own step times, parsed here. Ratios are printed with
their spread. The machine is shared: both run in the same invocation, one after the other.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

from bench import _setup

PROMPTS, GENERATIONS, TOKENS = 8, 8, 128

TRL_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    hf_dir, out_dir, steps, tokens, gens, prompts = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), json.loads(sys.argv[6])
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    tok.pad_token = tok.pad_token or tok.eos_token
    ds = Dataset.from_dict({"prompt": prompts * (steps + 1)})

    def reward(completions, **kw):
        return [float(torch.rand(())) for _ in completions]

    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    cfg = GRPOConfig(
        output_dir=out_dir, per_device_train_batch_size=len(prompts) * gens, num_generations=gens,
        max_completion_length=tokens, beta=0.0, bf16=True, use_cpu=True, max_steps=steps + 1,
        logging_steps=1, save_strategy="no", report_to=[], temperature=1.0, top_p=1.0,
        generation_kwargs={"min_new_tokens": tokens}, learning_rate=1e-6, dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(model=hf_dir, reward_funcs=reward, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
    trainer.train()
    print("TRL_TIMES " + json.dumps(times))
    """
)


def peer_model(out_dir: Path):
    return _setup.bench_model(
        out_dir, model_type="qwen2", vocab_size=1024, hidden_size=512, intermediate_size=1408, num_layers=8,
        num_heads=8, num_kv_heads=2, head_dim=64, qkv_bias=True, tie_word_embeddings=True,
        max_position_embeddings=2048, rope_theta=1e4,
    )  # fmt: skip


def text_prompts(n: int) -> list[str]:
    return [f"benchmark line {i} says" for i in range(n)]  # 4-6 tokens of the bench tokenizer


def ours(hf_dir: Path, cfg, prompts: list[str], steps: int, out_dir: Path) -> list[float]:
    """Seconds per GRPO step (rollout + batch + update), warm-up step excluded."""
    import jax

    from atlas_jax.engines.base import SamplingParams
    from atlas_jax.engines.jax_sampler import JaxSampler
    from atlas_jax.training import train_step
    from atlas_jax.training.grpo import GRPOLearner, GRPOSpec
    from atlas_jax.training.runtime import make_policy
    from configs import base

    c = base.get_config()
    c.output_dir = str(out_dir)
    c.model.teacher = str(hf_dir)
    c.model.dtype, c.model.param_dtype = "bfloat16", "float32"
    c.mesh.shape = (1, -1, 1)
    c.checkpoint.async_save = False
    c.grpo.update(beta=0.0, num_generations=GENERATIONS, problems_per_step=len(prompts), num_iterations=1,
                  micro_batch_size=len(prompts) * GENERATIONS, temperature=1.0)  # fmt: skip
    c.protocol.max_teaching_tokens = TOKENS
    policy = make_policy(c, learning_rate=1e-6, total_steps=steps + 1)
    learner = GRPOLearner(policy, GRPOSpec.from_config(c))
    tok = _setup.bench_tokenizer()
    engine = JaxSampler(
        train_step.merge_model(policy.graphdef, policy.params, policy.rest),
        tok,
        mesh=policy.mesh,
        ignore_eos=True,
    )
    rng = np.random.default_rng(0)
    times = []
    for step in range(steps + 1):
        t = time.perf_counter()
        engine.update_weights(policy.params)
        out = engine.generate(
            prompts, SamplingParams(temperature=1.0, max_tokens=TOKENS, seed=step), n=GENERATIONS
        )
        comps = [x for group in out for x in group]
        assert all(len(x.token_ids) == TOKENS for x in comps)
        rewards = rng.random((len(prompts), GENERATIONS)).astype(np.float32)
        batch = learner.build_batch(
            [x.prompt_ids for x in comps], [x.token_ids for x in comps], [x.logprobs for x in comps], rewards
        )
        jax.block_until_ready(learner.update(batch, step))
        times.append(time.perf_counter() - t)
    return times[1:]


def ensure_trl(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run(["python3.11", "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "pip"), "install", "-q"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)
        subprocess.run([*pip, "trl==1.16.0", "transformers<5.20", "accelerate", "datasets"], check=True)
    return python


def trl(python: Path, hf_dir: Path, prompts: list[str], steps: int, out_dir: Path) -> list[float]:
    script = out_dir / "trl_grpo.py"
    script.write_text(TRL_SCRIPT)
    env = {
        **os.environ,
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    cmd = [
        str(python),
        str(script),
        str(hf_dir),
        str(out_dir / "trl"),
        str(steps),
        str(TOKENS),
        str(GENERATIONS),
    ]
    proc = subprocess.run([*cmd, json.dumps(prompts)], capture_output=True, text=True, env=env)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("TRL_TIMES ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"TRL run failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1].split(" ", 1)[1])[1:]  # the first step compiles nothing but warms caches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per framework (after one warm-up)")
    ap.add_argument("--peers", default="trl")
    ap.add_argument("--trl_venv", default="/work/venv-i14-trl")
    args = ap.parse_args()
    tokens = PROMPTS * GENERATIONS * TOKENS
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir, cfg, _ = peer_model(Path(tmp) / "model")
        prompts = text_prompts(PROMPTS)
        res = {"ours": ours(hf_dir, cfg, prompts, args.steps, Path(tmp) / "ours")}
        print(f" ours: steps {[round(t, 2) for t in res['ours']]} s", flush=True)
        if "trl" in args.peers:
            res["trl"] = trl(ensure_trl(Path(args.trl_venv)), hf_dir, prompts, args.steps, Path(tmp))
            print(f"  trl: steps {[round(t, 2) for t in res['trl']]} s", flush=True)
    for name, ts in res.items():
        print(f"{name:>5}: {tokens / min(ts):7.0f} completion tok/s best, {tokens / max(ts):7.0f} worst")
    for peer in [p for p in res if p != "ours"]:
        best = min(res[peer]) / min(res["ours"])
        low, high = min(res[peer]) / max(res["ours"]), max(res[peer]) / min(res["ours"])
        print(
            f"ours / {peer}: {best:.2f}x (best/best; spread {low:.2f}-{high:.2f}x; target >= 2x TRL defaults)"
        )


if __name__ == "__main__":
    main()
