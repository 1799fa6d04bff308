"""Flags shared by ``atlas-teach`` and ``atlas-teach-serve``: which teacher, which student, which settings.

Defaults come from the run config (``--config``, default ``configs/base.py``): its ``protocol`` / ``reward`` /
``grpo`` sections give the templates, budgets and temperatures (``protocol.settings``). With a pipeline
config (``job == "pipeline"``, e.g. ``configs/run/quickstart.py``) the teacher is
``<output_dir>/teacher_rl/hf`` and the student ``<output_dir>/student/hf``; otherwise ``model.teacher`` and
``model.student`` (served on ``engine.student``, at ``engine.student_url`` for the HTTP kinds). Flags override.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from absl import flags
from ml_collections import config_flags

CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Run config whose protocol settings to use (default: configs/base.py).", lock_config=True
)
TEACHER = flags.DEFINE_string(
    "teacher",
    None,
    "Teacher: HF folder, atlas-jax checkpoint or URL of a teacher server (default: from --config).",
)
TEACHER_KIND = flags.DEFINE_enum(
    "teacher_kind", "auto", ["auto", "jax", "vllm", "server", "openai"],
    "Engine of the teacher: auto = jax for folders, server (atlas-serve /generate) for URLs.",
)  # fmt: skip
TEACHER_TOKENIZER = flags.DEFINE_string(
    "teacher_tokenizer", None, "Tokenizer folder of a remote teacher (default: --config's model.tokenizer)."
)
STUDENT = flags.DEFINE_string(
    "student", None, "Student: HF folder, atlas-jax checkpoint or OpenAI-compatible base URL (.../v1)."
)
STUDENT_KIND = flags.DEFINE_enum(
    "student_kind", "auto", ["auto", "jax", "vllm", "server", "openai"],
    "Engine of the student: auto = jax for folders, openai for URLs.",
)  # fmt: skip
STUDENT_MODEL = flags.DEFINE_string(
    "student_model", None, "Model name sent to an OpenAI-compatible student (default: first of /v1/models)."
)
STUDENT_MODE = flags.DEFINE_enum(
    "student_mode", "completions", ["completions", "chat"], "OpenAI route of a remote student."
)
STUDENT_TOKENIZER = flags.DEFINE_string(
    "student_tokenizer", None, "Tokenizer folder of a remote student (token counts; optional)."
)
STUDENT_API_KEY_ENV = flags.DEFINE_string(
    "student_api_key_env", "OPENAI_API_KEY", "Environment variable holding a remote student's API key."
)
CONCURRENCY = flags.DEFINE_integer("concurrency", 8, "Requests in flight to a remote student.")
TIMEOUT = flags.DEFINE_float("timeout", 300.0, "Seconds per request to a remote student.")
RETRIES = flags.DEFINE_integer(
    "retries", 3, "Extra attempts per failed remote request (connection, 429, 5xx)."
)
BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Problems per engine call.")
TEMPERATURE = flags.DEFINE_float(
    "temperature", None, "Teacher temperature (default: --config's grpo.temperature)."
)


def config() -> Any:
    """The run config (``--config``, or ``configs/base.py``'s defaults)."""
    if CONFIG.value is not None:
        return CONFIG.value
    from configs.base import get_config

    return get_config()


def _run_folder(c: Any) -> Path | None:
    return Path(c.output_dir) if str(c.job) == "pipeline" else None


def teacher_source(c: Any) -> str:
    """``--teacher`` or the config's teacher (see the module docstring).

    Raises:
      ValueError: no teacher anywhere, or a pipeline run folder without a trained RL teacher.
    """
    if TEACHER.value:
        return TEACHER.value
    run = _run_folder(c)
    if run is not None:
        hf = run / "teacher_rl" / "hf"
        if not (hf / "config.json").is_file():
            raise ValueError(f"{hf} has no trained teacher: run the pipeline first or pass --teacher")
        return str(hf)
    if not c.model.teacher:
        raise ValueError("no teacher: pass --teacher (folder or URL) or --config.model.teacher")
    return str(c.model.teacher)


def student_source(c: Any) -> tuple[str, str]:
    """(student source, kind) from ``--student`` or the config."""
    if STUDENT.value:
        return STUDENT.value, STUDENT_KIND.value
    run = _run_folder(c)
    if run is not None:
        return str(run / "student" / "hf"), STUDENT_KIND.value
    kind = str(c.engine.student)
    if kind in ("vllm_server", "openai") and c.engine.student_url:
        return str(c.engine.student_url), ("server" if kind == "vllm_server" else "openai")
    if not c.model.student:
        raise ValueError("no student: pass --student (folder or URL) or --config.model.student")
    return str(c.model.student), STUDENT_KIND.value if STUDENT_KIND.value != "auto" else kind


def build() -> tuple[Any, Any, Any]:
    """(config, AdaptiveTeacher, student Engine) from the flags."""
    from atlas_jax.inference import AdaptiveTeacher, as_engine
    from atlas_jax.protocol.settings import rollout_settings_from_config

    c = config()
    settings = rollout_settings_from_config(c)
    tok = TEACHER_TOKENIZER.value or (c.model.tokenizer or None)
    src = teacher_source(c)
    if tok is None and src.startswith(("http://", "https://")) and _run_folder(c) is not None:
        tok = str(_run_folder(c) / "data" / "tokenizer")
    teacher = AdaptiveTeacher.load(src, settings, kind=TEACHER_KIND.value, tokenizer=tok, config=c,
                                   temperature=TEMPERATURE.value, batch_size=BATCH_SIZE.value)  # fmt: skip
    source, kind = student_source(c)
    student = as_engine(
        source, role="student", kind=kind, model=STUDENT_MODEL.value, mode=STUDENT_MODE.value,
        tokenizer=STUDENT_TOKENIZER.value, api_key=os.environ.get(STUDENT_API_KEY_ENV.value) or None,
        concurrency=CONCURRENCY.value, timeout=TIMEOUT.value, retries=RETRIES.value, seed=int(c.seed), config=c,
    )  # fmt: skip
    return c, teacher, student
