"""Teacher GRPO with the two-pass protocol, seed-like settings (seed: ``configs/run/teacher_rcl.yaml``).

    python -m launch.train --config=configs/run/teacher_rcl.py \
        --config.model.student=/path/to/Qwen3-4B --config.data.rl_path=/path/to/arc_atlas_teach_rl.jsonl

Starts from the SFT teacher (``runs/teacher_sft/checkpoints``), with a frozen Qwen3-4B-style student.
Seed values kept: lr 2e-6 constant, β 0.04, reference EMA-synced every 2 steps with α 0.9, teacher
temperature 0.7, probe budget 50, 250 steps, checkpoints and evals every 10 steps, 128 teacher samples
per step. Changed on purpose: G = 8 samples per problem × 16 problems (the seed used 32 × 4) so a
step covers more problems; budgets of 1024 prompt / 2048 teaching tokens (seed 4096 / 4096) — raise
them with --config.protocol.max_prompt_tokens / max_teaching_tokens when memory allows.
"""

import ml_collections

from configs.trainer.teacher_grpo import get_config as trainer_config


def get_config() -> ml_collections.ConfigDict:
    c = trainer_config()
    c.output_dir = "runs/teacher_rcl"
    c.model.teacher = "runs/teacher_sft/checkpoints"  # the SFT warm-up output
    c.model.student = ""  # required: HF folder of the frozen student (seed: Qwen/Qwen3-4B)
    c.engine.teacher = "jax"
    c.engine.student = "vllm"  # the student is served by vLLM in-process (frozen weights)
    c.data.rl_path = ""  # required: RL rows with prompt / ground_truth
    c.grpo.num_steps = 250  # seed: max_steps 250
    c.grpo.learning_rate = 2e-6  # seed: learning_rate 0.000002
    c.grpo.beta = 0.04  # seed: beta 0.04
    c.grpo.ref_update = "ema"  # seed: sync_ref_model true
    c.grpo.ref_alpha = 0.9  # seed: ref_model_mixup_alpha 0.9
    c.grpo.ref_sync_steps = 2  # seed: ref_model_sync_steps 2
    c.grpo.temperature = 0.7  # seed: temperature 0.7
    c.grpo.num_generations = 8  # G (seed: 32)
    c.grpo.problems_per_step = 16  # 16 x 8 = 128 teacher samples per step (seed: train_batch_size 128)
    c.grpo.micro_batch_size = 8
    c.grpo.logprob_chunk = 256
    c.protocol.max_probe_tokens = 50  # seed: max_probe_tokens 50
    c.protocol.max_prompt_tokens = 1024
    c.protocol.max_teaching_tokens = 2048
    c.protocol.max_student_tokens = 2048
    c.protocol.num_baseline_samples = 4
    c.protocol.num_student_samples = 4
    c.checkpoint.every_steps = 10  # seed: save_steps 10
    c.checkpoint.keep = 3
    c.checkpoint.export_hf_dir = "runs/teacher_rcl/hf_final"  # seed: save_final_model true
    c.eval.every_steps = 10  # seed: eval_steps 10
    c.logging.num_samples = 8  # seed: save_completions_probability 0.1 -> a fixed sample per eval
    return c
