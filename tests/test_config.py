"""Config files load, every base field is documented, and validation names the flags to change."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from atlas_jax.models.presets import get_preset
from atlas_jax.training.validate import ConfigError, validate_config
from configs.base import get_config
from configs.run import teacher_rcl, teacher_sft

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _teacher_folder(tmp_path, monkeypatch):
    """An HF-style folder with the 8B config.json (no weights: validation reads only the config)."""
    folder = tmp_path / "qwen3_8b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(get_preset("qwen3_8b").to_hf()))
    monkeypatch.setattr(sys.modules[__name__], "TEACHER", str(folder))
    student = tmp_path / "qwen3_4b"
    student.mkdir()
    (student / "config.json").write_text(json.dumps(get_preset("qwen3_4b").to_hf()))
    monkeypatch.setattr(sys.modules[__name__], "STUDENT", str(student))


TEACHER = ""
STUDENT = ""


def _grpo():
    c = teacher_rcl.get_config()
    c.model.teacher = TEACHER
    c.model.student = STUDENT
    c.data.rl_path = "/data/rl.jsonl"
    return c


def test_every_base_field_has_a_comment():
    lines = (ROOT / "configs/base.py").read_text().splitlines()
    fields = [
        i for i, ln in enumerate(lines) if re.match(r"\s+c\.\w+(\.\w+)? = ", ln) and "ConfigDict()" not in ln
    ]
    assert len(fields) > 60
    # ruff may wrap a long assignment as "x = (" + value-and-comment on the next line.
    undocumented = [lines[i] for i in fields if "#" not in lines[i] and "#" not in lines[i + 1]]
    assert not undocumented, undocumented


def test_shipped_run_configs_validate_with_their_required_paths():
    validate_config(_grpo(), num_devices=8)
    c = teacher_sft.get_config()
    c.model.teacher, c.data.sft_path = TEACHER, "/data/sft.jsonl"
    validate_config(c, num_devices=8)
    assert c.sft.learning_rate == 1e-5 and c.optim.schedule == "cosine"
    r = teacher_rcl.get_config()
    assert (r.grpo.learning_rate, r.grpo.beta, r.protocol.max_probe_tokens) == (2e-6, 0.04, 50)
    assert (
        r.model.teacher
        == "runs/teacher_sft/checkpoints"
        == teacher_sft.get_config().output_dir + "/checkpoints"
    )


def test_required_paths_are_named():
    with pytest.raises(ConfigError) as e:
        validate_config(teacher_rcl.get_config(), num_devices=8)
    assert "--config.model.student" in str(e.value) and "--config.data.rl_path" in str(e.value)


def test_budgets_against_the_teacher_context():
    c = _grpo()
    c.protocol.max_prompt_tokens, c.protocol.max_teaching_tokens = 40000, 4096
    with pytest.raises(ConfigError, match=r"max_prompt_tokens \+ max_teaching_tokens = 44096 exceeds"):
        validate_config(c, num_devices=8)
    c = _grpo()
    c.model.teacher = "/no/such/teacher"
    with pytest.raises(ConfigError, match=r"--config\.model\.teacher=/no/such/teacher: no such folder"):
        validate_config(c, num_devices=8)


def test_impossible_batch_layout():
    c = _grpo()
    c.grpo.problems_per_step, c.grpo.num_generations, c.grpo.micro_batch_size = 3, 5, 4
    with pytest.raises(ConfigError) as e:
        validate_config(c, num_devices=8)
    msg = str(e.value)
    assert (
        "problems_per_step x grpo.num_generations = 15" in msg and "--config.grpo.micro_batch_size=4" in msg
    )
    assert "data x fsdp = 8" in msg and "--config.mesh.shape" in msg  # 4 rows cannot shard over 8 devices
    c = _grpo()
    c.mesh.shape = (3, -1, 1)
    with pytest.raises(ConfigError, match=r"mesh\.shape"):
        validate_config(c, num_devices=8)


def test_unknown_reward_name():
    c = _grpo()
    c.reward.name = "symmetric"
    with pytest.raises(ConfigError) as e:
        validate_config(c, num_devices=8)
    assert "--config.reward.name='symmetric'" in str(e.value) and "asymmetric" in str(e.value)


def test_missing_template_field():
    c = _grpo()
    c.protocol.teacher_template = "Question: {question}\nTeach:"  # lacks {approach}
    with pytest.raises(ConfigError) as e:
        validate_config(c, num_devices=8)
    assert "{approach}" in str(e.value) and "--config.protocol.teacher_template" in str(e.value)


def test_all_problems_reported_at_once_and_bad_enums():
    c = _grpo()
    c.grpo.advantage, c.grpo.loss_aggregation, c.grpo.temperature = "ppo", "mean", 0.0
    with pytest.raises(ConfigError) as e:
        validate_config(c, num_devices=8)
    msg = str(e.value)
    for flag in ("grpo.advantage", "grpo.loss_aggregation", "grpo.temperature"):
        assert flag in msg
    c = get_config()
    c.job = "distill"
    with pytest.raises(ConfigError, match=r"config\.job"):
        validate_config(c, num_devices=8)


def test_sft_layout():
    c = teacher_sft.get_config()
    c.model.teacher, c.data.sft_path = TEACHER, "/d"
    c.sft.batch_size, c.sft.micro_batch_size = 16, 6
    with pytest.raises(ConfigError, match=r"--config\.sft\.batch_size = 16 rows per step"):
        validate_config(c, num_devices=8)


def test_launcher_reports_config_errors_and_rejects_unknown_keys():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    base = [sys.executable, "-m", "launch.train", "--config=configs/run/teacher_rcl.py"]
    out = subprocess.run(
        [*base, "--config.reward.name=nope", "--config.model.student=/s", "--config.data.rl_path=/d"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode != 0 and "--config.reward.name='nope'" in out.stderr
    out = subprocess.run(
        [*base, "--config.grpo.not_a_field=1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode != 0 and "not_a_field" in out.stderr
