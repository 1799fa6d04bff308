"""Trainer defaults for teacher SFT (mirrors the seed's ``configs/trainer/base_sft`` + ``teacher_sft`` values)."""

import ml_collections

from configs.base import get_config as base_config


def get_config() -> ml_collections.ConfigDict:
    c = base_config()
    c.job = "sft"
    c.sft.learning_rate = 1e-5  # seed: learning_rate 1.0e-05
    c.sft.num_epochs = 10  # seed: num_train_epochs 10
    c.sft.batch_size = 16  # seed: train_batch_size 16 (per-device 1 x accumulation)
    c.sft.micro_batch_size = 8  # rows per forward/backward; lower it if activations do not fit
    c.sft.max_length = 16384  # seed: max_seq_length 16384
    c.sft.packing = False  # seed: packing false
    c.sft.eval_every = 100  # seed: eval_steps 100
    c.optim.schedule = "cosine"  # seed: lr_scheduler_type cosine
    c.optim.warmup_ratio = 0.05  # seed: warmup_ratio 0.05
    c.optim.weight_decay = 1e-4  # seed: weight_decay 1e-4
    c.optim.b1 = 0.9  # seed: adam_beta1
    c.optim.b2 = 0.95  # seed: adam_beta2
    c.optim.eps = 1e-8  # seed: adam_epsilon
    c.optim.max_grad_norm = 1.0  # seed: max_grad_norm
    c.model.param_dtype = "float32"  # fp32 master weights ...
    c.model.compute_dtype = "bfloat16"  # ... with bf16 compute (seed: bf16 true)
    c.model.remat = True  # seed: gradient_checkpointing true
    return c
