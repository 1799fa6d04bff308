"""Every rollout engine of a run, built from ``config.engine.*`` and ``config.protocol.*`` (one place).

``student_engine(config, mesh=None)`` and ``teacher_engine(config, policy)`` are the entry points (also
reached as ``rl_setup.student_engine`` / ``rl_setup.teacher_engine``); the kinds are those of
``engines.factory.ENGINES``. What each kind takes from the config:

- ``jax``: the embedded sampler on the training mesh (``config.mesh.shape``; a multi-process run gives each
  host's student its local devices). Student: its weights stored in
  ``model.compute_dtype``, remat off, calls split by ``engine.jax_max_rows`` (``engines.chunked``). Teacher:
  the policy's own (sharded, remat-wrapped, ``model.param_dtype``) parameters, no copy.
- ``vllm``: ``VLLMEngine`` in this process with ``engine.dtype`` ("auto": bfloat16 on an accelerator,
  float32 on CPU), ``max_model_len`` = the role's context from the budgets (``protocol.budgets``) unless
  ``engine.max_model_len`` is set, ``engine.gpu_memory_utilization``, ``engine.tensor_parallel_size``
  (student only), ``engine.enforce_eager`` and ``seed``. The teacher starts from an HF export of the policy.
- ``vllm_server``: student: ``ServerEngine`` on our ``launch.serve`` servers (``engine.student_url``, comma
  list, split over hosts; waits ``engine.server_wait_s`` for their health); teacher: ``TeacherServers`` on
  ``atlas-serve --role=teacher`` (``engine.teacher_url``, ``engine.weight_transfer``).
- ``openai``: ``OpenAIEngine`` on one OpenAI-compatible server (``engine.student_url``; ``/v1`` is added
  when the URL has no path), model ``engine.student_model`` (default ``model.student``), endpoint
  ``engine.student_api``, API key from ``OPENAI_API_KEY``.
HTTP students take ``engine.timeout_s`` and ``engine.retries``; openai also ``engine.concurrency``.

``apply_jax_memory_config(config)`` sets JAX's memory share beside in-process vLLM engines; launchers call it
before JAX initialises (``engines.memory``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from atlas_jax.engines import memory
from atlas_jax.engines.base import Engine
from atlas_jax.engines.factory import engine_class
from atlas_jax.protocol.budgets import Budgets, student_context, teacher_context
from atlas_jax.protocol.settings import templates_from_config
from atlas_jax.training.input_checks import check_teacher_tokenizer


def load_tokenizer(path: str) -> Any:
    """The HF tokenizer of a folder (an atlas-jax checkpoint keeps it under ``hf/``)."""
    from transformers import AutoTokenizer

    p = Path(path)
    if (p / "hf").is_dir() and not (p / "tokenizer.json").is_file():
        p = p / "hf"
    return AutoTokenizer.from_pretrained(str(p))


def budgets(config: Any) -> Budgets:
    p = config.protocol
    return Budgets(
        max_prompt_tokens=int(p.max_prompt_tokens),
        max_probe_tokens=int(p.max_probe_tokens),
        max_teaching_tokens=int(p.max_teaching_tokens),
        max_student_tokens=int(p.max_student_tokens),
    )


def required_context(config: Any, role: str, tokenizer: Any) -> int:
    """Positions a ``role`` ("student" or "teacher") engine must hold (see ``protocol.budgets``)."""
    if role == "teacher":
        return teacher_context(budgets(config))
    return student_context(budgets(config), templates_from_config(config.protocol), tokenizer)


def resolve_vllm_dtype(name: str) -> str:
    """``engine.dtype``; "auto" is bfloat16 on an accelerator and float32 on CPU (vLLM's platform)."""
    if name != "auto":
        return name
    from vllm.platforms import current_platform

    return "float32" if current_platform.is_cpu() else "bfloat16"


def vllm_options(config: Any, role: str, tokenizer: Any, model_positions: int) -> dict[str, Any]:
    """``VLLMEngine`` keyword arguments for ``role``.

    Raises:
      ValueError: the budgets exceed ``engine.max_model_len`` or the model's positions (names the flags).
    """
    e = config.engine
    need = required_context(config, role, tokenizer)
    max_len = int(e.max_model_len) or need
    if need > max_len:
        raise ValueError(f"the {role} needs {need} positions > --config.engine.max_model_len={max_len}")
    if max_len > model_positions:
        raise ValueError(
            f"the {role} needs {max_len} positions but its model has max_position_embeddings="
            f"{model_positions}: lower --config.protocol.max_*_tokens (or --config.engine.max_model_len)"
        )
    return {
        "dtype": resolve_vllm_dtype(str(e.dtype)),
        "max_model_len": max_len,
        "seed": int(config.seed),
        "gpu_memory_utilization": float(e.gpu_memory_utilization),
        "enforce_eager": bool(e.enforce_eager),
        "tensor_parallel_size": int(e.tensor_parallel_size) if role == "student" else 1,
    }


def apply_jax_memory_config(config: Any) -> dict[str, str]:
    """Sets XLA's memory variables from ``config.engine`` (call before JAX starts); returns what was set."""
    e = config.engine
    shares = [float(e.gpu_memory_utilization) for kind in (e.student, e.teacher) if kind == "vllm"]
    fraction = float(e.jax_memory_fraction)
    env = memory.jax_memory_env(fraction, bool(e.jax_preallocate), shares)
    memory.apply_env(env, overwrite=fraction > 0 or not e.jax_preallocate)
    return env


def _model_positions(path: str) -> int:
    from atlas_jax.models.config import ModelConfig

    return ModelConfig.from_hf(Path(path)).max_position_embeddings


def _student_mesh(config: Any) -> Any:
    """The training mesh in one process; with several, this host's devices (per-host rollouts)."""
    from atlas_jax.training.host_rollout import student_mesh
    from atlas_jax.training.runtime import mesh_from_config

    mesh = mesh_from_config(config)
    return student_mesh(mesh) or mesh


def _openai_base_url(url: str) -> str:
    return url.rstrip("/") + "/v1" if urlparse(url).path.strip("/") == "" else url.rstrip("/")


def _http_student(config: Any, kind: str, path: str) -> Engine:
    from atlas_jax import distributed
    from atlas_jax.engines.teacher_servers import host_urls, wait_healthy

    e = config.engine
    urls = [u.strip() for u in str(e.student_url).split(",") if u.strip()]
    if not urls:
        raise ValueError(f"--config.engine.student={kind} needs --config.engine.student_url")
    # Per-host rollouts: with one server (or more) per host each host asks only its own.
    urls, _ = host_urls(urls, distributed.process_index(), distributed.process_count())
    tokenizer = path if path and Path(path).is_dir() else None
    if kind == "vllm_server":
        engine = engine_class(kind)(
            urls, tokenizer=tokenizer, timeout=float(e.timeout_s), retries=int(e.retries)
        )
        wait_healthy(engine, float(e.server_wait_s), role="student")
        return engine
    if len(urls) != 1:
        raise ValueError(
            f"--config.engine.student=openai takes one URL per host, got {len(urls)} in engine.student_url"
        )
    return engine_class(kind)(
        _openai_base_url(urls[0]),
        str(e.student_model) or path,
        mode=str(e.student_api),
        concurrency=int(e.concurrency),
        timeout=float(e.timeout_s),
        retries=int(e.retries),
        tokenizer=tokenizer or path or None,
    )


def student_engine(config: Any, mesh: Any = None) -> Engine:
    """The frozen student ``config.model.student`` on ``config.engine.student`` (see the module docstring).

    Args:
      config: the run config.
      mesh: the mesh of a JAX student (default: the one ``config.mesh.shape`` gives, as the policy's; in a
        multi-process run this host's devices, rows sharded over them, so each host samples its own student).
    """
    kind, path = str(config.engine.student), str(config.model.student)
    if kind == "jax":
        from atlas_jax.engines.chunked import RowChunked
        from atlas_jax.models.params import build_model
        from atlas_jax.training.runtime import load_flat_params, model_config

        mesh = mesh if mesh is not None else _student_mesh(config)
        cfg = model_config(path, str(config.model.student_preset), model_section=config.model)
        # Frozen: no backward pass (remat off) and no fp32 master copy (weights in the compute dtype).
        cfg = cfg.replace(remat=False, param_dtype=cfg.dtype)
        model = build_model(cfg, load_flat_params(path, cfg), mesh=mesh, seed=int(config.seed) + 1)
        # Frozen: the sampler keeps only the decode layout (one model of memory, not source + rollout copy).
        sampler = engine_class(kind).frozen(
            model,
            load_tokenizer(path) if path else None,
            mesh=mesh,
            prompt_bucket=int(config.engine.jax_prompt_bucket),
        )
        del model
        return RowChunked(sampler, int(config.engine.jax_max_rows))
    if kind == "vllm":
        options = vllm_options(config, "student", load_tokenizer(path), _model_positions(path))
        return engine_class(kind)(path, **options)
    if kind in ("vllm_server", "openai"):
        return _http_student(config, kind, path)
    raise ValueError(f"unknown --config.engine.student={kind!r}; choose jax, vllm, vllm_server or openai")


def teacher_engine(config: Any, policy: Any) -> Engine:
    """The engine sampling the policy; it receives new weights before every rollout."""
    kind = str(config.engine.teacher)
    tok_path = config.model.tokenizer or config.model.teacher
    tokenizer = load_tokenizer(tok_path) if tok_path else None
    check_teacher_tokenizer(  # training/input_checks.py
        tokenizer,
        policy.model_cfg.vocab_size,
        source=tok_path,
        teacher=config.model.teacher,
        load=load_tokenizer,
    )
    if kind == "jax":
        from atlas_jax.training.train_step import merge_model

        model = merge_model(policy.graphdef, policy.params, policy.rest)
        return engine_class(kind)(
            model,
            tokenizer,
            mesh=policy.mesh,
            prompt_bucket=int(config.engine.jax_prompt_bucket),
            rollout_copy=bool(config.engine.jax_rollout_copy),
        )
    if kind == "vllm":
        from atlas_jax.training.runtime import export_policy_hf

        folder = export_policy_hf(
            policy, Path(config.output_dir) / "vllm_policy", tokenizer_src=tok_path or None
        )
        options = vllm_options(config, "teacher", tokenizer, policy.model_cfg.max_position_embeddings)
        return engine_class(kind)(folder, **options)
    if kind == "vllm_server":
        return _teacher_servers(config, policy, tokenizer)
    raise ValueError(f"unknown --config.engine.teacher={kind!r}; choose jax, vllm or vllm_server")


def _teacher_servers(config: Any, policy: Any, tokenizer: Any) -> Engine:
    """``atlas-serve --role=teacher`` servers of this host (see ``engines/teacher_servers.py``)."""
    from atlas_jax import distributed
    from atlas_jax.engines.teacher_servers import TeacherServers, host_urls

    e = config.engine
    urls, owner = host_urls(
        str(e.teacher_url).split(","), distributed.process_index(), distributed.process_count()
    )
    transfer: Any = "http"
    if str(e.weight_transfer) == "nccl":
        from atlas_jax.engines.nccl_push import NcclWeightPush

        transfer = NcclWeightPush(urls, str(e.nccl_address), model_config=policy.model_cfg) if owner else None
    return TeacherServers(
        urls, owner=owner, model_config=policy.model_cfg, transfer=transfer, wait_s=float(e.server_wait_s),
        tokenizer=tokenizer,
    )  # fmt: skip
