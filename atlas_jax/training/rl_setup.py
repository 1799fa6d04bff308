"""Config → protocol objects and engines for the GRPO loop (templates, rollout settings, student/teacher).

Kept apart from the loop so the loop only sees ``Engine``s and ``RolloutSettings``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from atlas_jax.engines.base import Engine
from atlas_jax.protocol.batch import RolloutSettings
from atlas_jax.protocol.templates import Templates
from atlas_jax.rewards import RewardParams
from atlas_jax.training.input_checks import check_teacher_tokenizer

# config.protocol field -> Templates field (empty config value = the built-in template).
_TEMPLATE_FIELDS = {
    "probe_template": "student_probe",
    "teacher_template": "teacher",
    "taught_template": "student_taught",
    "baseline_template": "student_baseline",
}


def templates_from_config(config: Any) -> Templates:
    """The protocol templates; raises ``ValueError`` naming the flag when a placeholder is missing."""
    p = config.protocol
    values = {field: getattr(p, key) for key, field in _TEMPLATE_FIELDS.items() if getattr(p, key, "")}
    for flag in ("student_chat", "teacher_chat", "student_system", "teacher_system"):
        if flag in p:
            values[flag] = p[flag]
    try:
        return Templates(**values)
    except ValueError as e:
        flags = ", ".join(f"--config.protocol.{k}" for k in _TEMPLATE_FIELDS)
        raise ValueError(f"{e} (templates are set by {flags})") from e


def reward_params_from_config(config: Any) -> RewardParams:
    r = config.reward
    kwargs = {
        "degradation_penalty_multiplier": float(r.degradation_penalty_multiplier),
        "efficiency_weight": float(r.efficiency_weight),
    }
    for name in ("leak_penalty", "efficiency"):
        if name in r:
            kwargs[name] = r[name]
    return RewardParams(**kwargs)


def rollout_settings(config: Any) -> RolloutSettings:
    """``RolloutSettings`` from ``config.protocol`` / ``config.grpo`` / ``config.reward`` (the protocol's builder)."""
    from atlas_jax.protocol.settings import rollout_settings_from_config

    return rollout_settings_from_config(config)


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    p = Path(path)
    if (p / "hf").is_dir() and not (p / "tokenizer.json").is_file():
        p = p / "hf"  # an atlas-jax checkpoint keeps its tokenizer under hf/
    return AutoTokenizer.from_pretrained(str(p))


def student_engine(config: Any, mesh: Any = None) -> Engine:
    """The frozen student named by ``config.model.student`` on ``config.engine.student``."""
    kind, path = str(config.engine.student), str(config.model.student)
    if kind == "jax":
        from atlas_jax.engines.jax_sampler import JaxSampler
        from atlas_jax.models.params import build_model
        from atlas_jax.training.runtime import load_flat_params, model_config

        cfg = model_config(path, str(config.model.student_preset), model_section=config.model).replace(
            remat=False
        )
        model = build_model(cfg, load_flat_params(path, cfg), mesh=mesh, seed=int(config.seed) + 1)
        return JaxSampler(model, load_tokenizer(path) if path else None)
    if kind == "vllm":
        from atlas_jax.engines.vllm_engine import VLLMEngine

        return VLLMEngine(path, seed=int(config.seed))
    if kind in ("vllm_server", "openai"):
        from atlas_jax import distributed
        from atlas_jax.engines.server_client import ServerEngine
        from atlas_jax.engines.teacher_servers import host_urls, wait_healthy

        # Per-host rollouts: with one server (or more) per host each host asks only its own.
        urls, _ = host_urls(
            str(config.engine.student_url).split(","),
            distributed.process_index(),
            distributed.process_count(),
        )
        engine = ServerEngine(urls, tokenizer=path or None)
        if kind == "vllm_server":
            wait_healthy(engine, float(config.engine.server_wait_s), role="student")
        return engine
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
        from atlas_jax.engines.jax_sampler import JaxSampler
        from atlas_jax.training.train_step import merge_model

        return JaxSampler(
            merge_model(policy.graphdef, policy.params, policy.rest), tokenizer, mesh=policy.mesh
        )
    if kind == "vllm":
        from atlas_jax.engines.vllm_engine import VLLMEngine
        from atlas_jax.training.runtime import export_policy_hf

        folder = export_policy_hf(
            policy, Path(config.output_dir) / "vllm_policy", tokenizer_src=tok_path or None
        )
        return VLLMEngine(folder, seed=int(config.seed))
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
