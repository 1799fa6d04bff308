"""Start-up validation of a run config: every problem found at once, each naming the flag(s) to change.

``validate_config(config)`` raises ``ConfigError`` listing all problems, before any model is built or
any data is read, so a bad batch layout fails in a second rather than after a long compile.
"""

from __future__ import annotations

from typing import Any

import jax

from atlas_jax.training.advantages import ADVANTAGE_MODES
from atlas_jax.training.grpo_options import option_errors
from atlas_jax.training.losses import AGGREGATIONS
from atlas_jax.training.optimizer import SCHEDULES

JOBS = ("sft", "grpo", "pipeline")
TEACHER_ENGINES = ("jax", "vllm", "vllm_server")
STUDENT_ENGINES = ("jax", "vllm", "vllm_server", "openai")
REF_UPDATES = ("frozen", "ema")


class ConfigError(ValueError):
    """One or more config problems; the message has one line per problem."""


def _batch_shards(config: Any, num_devices: int) -> tuple[int, list[str]]:
    from atlas_jax.training.runtime import resolve_mesh_shape

    try:
        data, fsdp, _ = resolve_mesh_shape(tuple(config.mesh.shape), num_devices)
    except ValueError as e:
        return 1, [str(e)]
    return data * fsdp, []


def _check_layout(
    errors: list[str], section: str, rows: int, rows_flag: str, micro: int, shards: int
) -> None:
    if micro < 1:
        errors.append(f"--config.{section}.micro_batch_size must be >= 1, got {micro}")
        return
    if rows % micro:
        errors.append(
            f"{rows_flag} = {rows} rows per step is not a multiple of --config.{section}.micro_batch_size={micro}: "
            f"change one of them so the rows split into whole micro-batches"
        )
    if micro % shards:
        errors.append(
            f"--config.{section}.micro_batch_size={micro} must be a multiple of data x fsdp = {shards} devices "
            f"(--config.mesh.shape) so every micro-batch shards evenly"
        )


def _grpo_errors(config: Any, shards: int) -> list[str]:
    g, p, e = config.grpo, config.protocol, []
    if g.num_generations < 2:
        e.append(f"--config.grpo.num_generations={g.num_generations}: groups need >= 2 samples to compare")
    rows = int(g.problems_per_step) * int(g.num_generations)
    _check_layout(
        e, "grpo", rows, "grpo.problems_per_step x grpo.num_generations", int(g.micro_batch_size), shards
    )
    if g.advantage not in ADVANTAGE_MODES:
        e.append(f"--config.grpo.advantage={g.advantage!r}: choose one of {ADVANTAGE_MODES}")
    if g.loss_aggregation not in AGGREGATIONS:
        e.append(f"--config.grpo.loss_aggregation={g.loss_aggregation!r}: choose one of {AGGREGATIONS}")
    if g.ref_update not in REF_UPDATES:
        e.append(f"--config.grpo.ref_update={g.ref_update!r}: choose one of {REF_UPDATES}")
    if not 0 < g.ref_alpha <= 1 or g.ref_sync_steps < 1:
        e.append("--config.grpo.ref_alpha must be in (0, 1] and --config.grpo.ref_sync_steps >= 1")
    if g.temperature <= 0:
        e.append(f"--config.grpo.temperature={g.temperature}: GRPO needs sampling (> 0), not greedy decoding")
    if not (0 <= g.epsilon_low < 1 and g.epsilon_high >= 0):
        e.append("--config.grpo.epsilon_low must be in [0, 1) and --config.grpo.epsilon_high >= 0")
    if g.beta < 0:
        e.append(f"--config.grpo.beta={g.beta} must be >= 0 (0 disables the reference)")
    e.extend(option_errors(g, int(p.max_teaching_tokens)))
    for name in ("num_iterations", "num_steps", "logprob_chunk", "problems_per_step", "prompt_bucket"):
        if g[name] < 1:
            e.append(f"--config.grpo.{name} must be >= 1, got {g[name]}")
    if config.engine.jax_prompt_bucket < 1:
        e.append(f"--config.engine.jax_prompt_bucket must be >= 1, got {config.engine.jax_prompt_bucket}")
    for name in ("max_probe_tokens", "max_teaching_tokens", "max_student_tokens", "max_prompt_tokens"):
        if p[name] < 1:
            e.append(f"--config.protocol.{name} must be >= 1, got {p[name]}")
    for name in ("num_baseline_samples", "num_student_samples"):
        if p[name] < 1:
            e.append(f"--config.protocol.{name} must be >= 1, got {p[name]}")
    if config.engine.teacher not in TEACHER_ENGINES:
        e.append(f"--config.engine.teacher={config.engine.teacher!r}: choose one of {TEACHER_ENGINES}")
    if config.engine.student not in STUDENT_ENGINES:
        e.append(f"--config.engine.student={config.engine.student!r}: choose one of {STUDENT_ENGINES}")
    elif config.engine.student in ("vllm_server", "openai") and not config.engine.student_url:
        e.append(f"--config.engine.student={config.engine.student} needs --config.engine.student_url")
    e.extend(_server_problems(config.engine))
    from atlas_jax.rewards import REWARDS

    if config.reward.name not in REWARDS:
        e.append(
            f"--config.reward.name={config.reward.name!r} is not a known reward; choose one of {sorted(REWARDS)}"
        )
    from atlas_jax.training.rl_setup import reward_params_from_config, templates_from_config

    for build in (templates_from_config, reward_params_from_config):
        try:
            build(config)
        except ValueError as err:
            e.append(str(err))
    return e


def _sft_errors(config: Any, shards: int) -> list[str]:
    s, e = config.sft, []
    _check_layout(e, "sft", int(s.batch_size), "--config.sft.batch_size", int(s.micro_batch_size), shards)
    if s.max_length < 2:
        e.append(f"--config.sft.max_length={s.max_length} must be >= 2")
    if s.num_steps < 0 or (s.num_steps == 0 and s.num_epochs <= 0):
        e.append("set --config.sft.num_steps > 0 or --config.sft.num_epochs > 0")
    # Packing needs no check of its own: packed rows are exactly max_length tokens, which _model_errors
    # holds to the teacher's context, and the decoder masks attention by segment (Decoder.hidden_states).
    return e


def _model_errors(config: Any) -> list[str]:
    """The teacher must exist, and its context must hold the longest sequence the job builds."""
    from pathlib import Path

    from atlas_jax.training.runtime import model_config

    path, preset = str(config.model.teacher), str(config.model.teacher_preset)
    if path and not Path(path).exists():
        return [f"--config.model.teacher={path}: no such folder"]
    try:
        cfg = model_config(path, preset, model_section=config.model)
    except (ValueError, FileNotFoundError) as e:
        return [f"--config.model.teacher / teacher_preset: {e}"]
    ctx, e = cfg.max_position_embeddings, []
    p = config.protocol
    teacher_len = p.max_prompt_tokens + p.max_teaching_tokens
    if config.job == "grpo" and teacher_len > ctx:
        e.append(
            f"--config.protocol.max_prompt_tokens + max_teaching_tokens = {teacher_len} "
            f"exceeds the teacher's context ({ctx} positions): lower them"
        )
    max_len = config.engine.max_model_len
    if config.job == "grpo" and config.engine.teacher == "vllm" and 0 < max_len < teacher_len:
        e.append(
            f"--config.protocol.max_prompt_tokens + max_teaching_tokens = {teacher_len} "
            f"exceeds --config.engine.max_model_len={max_len} (the vLLM teacher's context)"
        )
    if config.job == "sft" and config.sft.max_length > ctx:
        e.append(
            f"--config.sft.max_length={config.sft.max_length} exceeds the teacher's context ({ctx} positions)"
        )
    return e


VLLM_DTYPES = ("auto", "bfloat16", "float16", "float32")
STUDENT_APIS = ("completions", "chat")


def _engine_errors(config: Any) -> list[str]:
    """``config.engine``: values in range, and JAX's memory share beside in-process vLLM engines."""
    from atlas_jax.engines.memory import jax_memory_env

    e, errs = config.engine, []
    if e.dtype not in VLLM_DTYPES:
        errs.append(f"--config.engine.dtype={e.dtype!r}: choose one of {VLLM_DTYPES}")
    if not 0 < e.gpu_memory_utilization <= 1:
        errs.append(f"--config.engine.gpu_memory_utilization={e.gpu_memory_utilization} must be in (0, 1]")
    for name, low in (("tensor_parallel_size", 1), ("jax_max_rows", 1), ("concurrency", 1), ("retries", 0),
                      ("max_model_len", 0)):  # fmt: skip
        if e[name] < low:
            errs.append(f"--config.engine.{name} must be >= {low}, got {e[name]}")
    if e.timeout_s <= 0:
        errs.append(f"--config.engine.timeout_s={e.timeout_s} must be > 0")
    if e.student_api not in STUDENT_APIS:
        errs.append(f"--config.engine.student_api={e.student_api!r}: choose one of {STUDENT_APIS}")
    if e.student == "openai" and len([u for u in str(e.student_url).split(",") if u.strip()]) > 1:
        errs.append("--config.engine.student=openai takes one URL in --config.engine.student_url")
    shares = [float(e.gpu_memory_utilization) for kind in (e.student, e.teacher) if kind == "vllm"]
    try:
        jax_memory_env(float(e.jax_memory_fraction), bool(e.jax_preallocate), shares)
    except ValueError as err:
        errs.append(str(err))
    return errs


def _tokenizer_or_none(path: str) -> Any:
    """The folder's tokenizer; None when it has none (template sizes are then bounded by their bytes)."""
    from atlas_jax.training.engine_setup import load_tokenizer

    try:
        return load_tokenizer(path)
    except (OSError, ValueError):
        return None


def _student_errors(config: Any) -> list[str]:
    """The student's longest protocol sequence must fit its model and ``engine.max_model_len``."""
    from pathlib import Path

    from atlas_jax.training import engine_setup
    from atlas_jax.training.runtime import model_config

    path, preset, kind = str(config.model.student), str(config.model.student_preset), config.engine.student
    local = bool(path) and Path(path).is_dir()
    if kind in ("jax", "vllm") and path and not local:
        return [f"--config.model.student={path}: no such folder (engine.student={kind} loads it locally)"]
    if not (local or (preset and kind == "jax")):
        return []  # a served model: the server holds the limits
    try:
        cfg = model_config(path if local else "", preset, model_section=config.model)
        tok = _tokenizer_or_none(path) if local else None
        need = engine_setup.required_context(config, "student", tok)
    except (ValueError, FileNotFoundError, OSError) as err:
        return [f"--config.model.student / student_preset: {err}"]
    p, errs = config.protocol, []
    what = (
        f"the student's longest prompt + answer (max_prompt_tokens={p.max_prompt_tokens} + max_teaching_tokens="
        f"{p.max_teaching_tokens} + max_student_tokens={p.max_student_tokens} + its templates) = {need} tokens"
    )
    if need > cfg.max_position_embeddings:
        errs.append(
            f"{what} exceeds the student's context ({cfg.max_position_embeddings} positions): lower "
            "--config.protocol.max_prompt_tokens / max_teaching_tokens / max_student_tokens"
        )
    if kind == "vllm" and 0 < config.engine.max_model_len < need:
        errs.append(f"{what} exceeds --config.engine.max_model_len={config.engine.max_model_len}")
    return errs


def validate_config(config: Any, num_devices: int | None = None) -> None:
    """Checks the config for ``config.job``; raises ``ConfigError`` listing every problem found."""
    errors: list[str] = []
    if config.job not in JOBS:
        raise ConfigError(f"--config.job={config.job!r}: choose one of {JOBS}")
    shards, mesh_errors = _batch_shards(config, num_devices or jax.device_count())
    errors += mesh_errors
    if config.optim.schedule not in SCHEDULES:
        errors.append(f"--config.optim.schedule={config.optim.schedule!r}: choose one of {SCHEDULES}")
    if config.checkpoint.keep < 1 or config.checkpoint.every_steps < 0:
        errors.append("--config.checkpoint.keep must be >= 1 and --config.checkpoint.every_steps >= 0")
    if config.job in ("sft", "pipeline"):
        errors += _sft_errors(config, shards)
    if config.job in ("grpo", "pipeline"):
        errors += _grpo_errors(config, shards)
    if config.job == "sft" and not config.data.sft_path:
        errors.append("--config.job=sft needs --config.data.sft_path")
    if config.job == "grpo" and not config.data.rl_path:
        errors.append("--config.job=grpo needs --config.data.rl_path")
    if config.job == "grpo" and not (config.model.student or config.model.student_preset):
        errors.append(
            "--config.job=grpo needs the frozen student: set --config.model.student (or student_preset)"
        )
    elif config.job == "grpo":
        errors += _student_errors(config)
    if config.job in ("grpo", "pipeline"):
        errors += _engine_errors(config)
    if config.job != "pipeline" and not (config.model.teacher or config.model.teacher_preset):
        errors.append("set --config.model.teacher (HF or checkpoint folder) or --config.model.teacher_preset")
    elif config.job != "pipeline":
        errors += _model_errors(config)
    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))


def _server_problems(engine) -> list[str]:
    """Teacher-server settings (``engine.teacher="vllm_server"``)."""
    e = []
    if engine.teacher == "vllm_server" and not engine.get("teacher_url", ""):
        e.append(
            "--config.engine.teacher=vllm_server needs --config.engine.teacher_url (atlas-serve --role=teacher)"
        )
    transfer = engine.get("weight_transfer", "http")
    if transfer not in ("http", "nccl"):
        e.append(f"--config.engine.weight_transfer={transfer!r}: choose 'http' or 'nccl'")
    elif transfer == "nccl" and not engine.get("nccl_address", ""):
        e.append(
            "--config.engine.weight_transfer=nccl needs --config.engine.nccl_address (host:port of rank 0)"
        )
    if engine.get("server_wait_s", 1.0) <= 0:
        e.append(f"--config.engine.server_wait_s must be > 0, got {engine.server_wait_s}")
    return e
