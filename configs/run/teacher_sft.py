"""Teacher SFT warm-up with the seed's hyper-parameters (seed: ``configs/run/teacher_sft.yaml``).

    python -m launch.train --config=configs/run/teacher_sft.py \
        --config.model.teacher=/path/to/Qwen3-8B --config.data.sft_path=/path/to/arc_atlas_teach_sft.jsonl

The trained teacher lands in ``runs/teacher_sft/checkpoints`` (what ``teacher_rcl.py`` starts from);
``--config.checkpoint.export_hf_dir=DIR`` also writes an HF folder.
"""

import ml_collections

from configs.trainer.base_sft import get_config as trainer_config


def get_config() -> ml_collections.ConfigDict:
    c = trainer_config()
    c.output_dir = "runs/teacher_sft"
    c.model.teacher = ""  # required: an HF folder of the base teacher (seed: Qwen3-8B)
    c.data.sft_path = ""  # required: Arc-ATLAS-Teach SFT rows (problem_text, student_approach, ...)
    c.data.eval_fraction = 0.02  # held-out rows for the eval loss
    c.checkpoint.every_steps = 200  # seed saves every epoch; a step interval survives pre-emption better
    c.checkpoint.keep = 2
    return c
