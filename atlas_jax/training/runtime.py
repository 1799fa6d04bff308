"""What every learner needs before its first step: mesh, policy model, optimiser, state, checkpoints, logs.

``Policy`` holds the (sharded) trainable state and the static pieces to rebuild the model from it;
``make_policy`` builds it from the config, resuming from ``<output_dir>/checkpoints`` when a checkpoint
exists (params, optimiser state, step, RNG key, data position and any extra trees such as an EMA
reference).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from atlas_jax import distributed
from atlas_jax.models.config import ModelConfig
from atlas_jax.models.params import build_model
from atlas_jax.models.sharding import make_mesh
from atlas_jax.training import optimizer as optim_lib
from atlas_jax.training.checkpointing import TrainCheckpointer
from atlas_jax.training.train_step import TrainState, init_state, split_model


def resolve_mesh_shape(shape: tuple[int, ...], num_devices: int) -> tuple[int, int, int]:
    """Replaces one ``-1`` in ``(data, fsdp, tensor)`` by the remaining device count.

    Raises:
      ValueError: not 3 entries, several -1, or sizes that do not multiply to the device count.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"--config.mesh.shape={shape}: expected (data, fsdp, tensor) with at most one -1")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if num_devices % known:
            raise ValueError(
                f"--config.mesh.shape={shape}: {num_devices} devices are not divisible by {known}"
            )
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if int(np.prod(shape)) != num_devices:
        raise ValueError(
            f"--config.mesh.shape={shape} needs {int(np.prod(shape))} devices, have {num_devices}"
        )
    return shape  # type: ignore[return-value]


def mesh_from_config(config: Any) -> Mesh:
    return make_mesh(resolve_mesh_shape(tuple(config.mesh.shape), jax.device_count()))


def _preset(name: str) -> ModelConfig:
    """A named architecture from ``configs/model/<name>.py`` (random init)."""
    try:
        module = importlib.import_module(f"configs.model.{name}")
    except ModuleNotFoundError as e:
        raise ValueError(
            f"unknown model preset {name!r}: no configs/model/{name}.py (--config.model.*_preset)"
        ) from e
    cfg = module.get_config()
    return cfg if isinstance(cfg, ModelConfig) else ModelConfig.from_dict(dict(cfg))


def model_config(path: str, preset: str, *, model_section: Any) -> ModelConfig:
    """The ModelConfig of an HF folder, an atlas-jax checkpoint folder or a preset, with our dtypes/remat."""
    if path:
        p = Path(path)
        if (p / "config.json").is_file():
            cfg = ModelConfig.from_hf(p / "config.json")
        elif (p / "model_config.json").is_file():
            from converters.hf_to_jax import read_model_config

            cfg = read_model_config(p)
        else:
            raise FileNotFoundError(f"{p}: neither an HF folder (config.json) nor an atlas-jax checkpoint")
    elif preset:
        cfg = _preset(preset)
    else:
        raise ValueError(
            "no model given: set --config.model.teacher (a folder) or --config.model.teacher_preset"
        )
    return cfg.replace(
        param_dtype=str(model_section.param_dtype),
        dtype=str(model_section.compute_dtype),
        remat=bool(model_section.remat),
        remat_policy=str(model_section.get("remat_policy", "full")),
        attention=str(model_section.get("attention", "auto")),
        scan_layers=bool(model_section.get("scan_layers", True)),
    )


def load_flat_params(path: str, cfg: ModelConfig) -> dict[str, np.ndarray] | None:
    """Flat params of an HF folder or an atlas-jax checkpoint (params-only or a train state); None if no path."""
    if not path:
        return None
    p = Path(path)
    if (p / "config.json").is_file():
        from converters import mapping
        from converters.safetensors_io import SafetensorsFolder

        tensors = SafetensorsFolder(p)
        try:
            return mapping.hf_to_flat(tensors, cfg)
        finally:
            tensors.close()
    from atlas_jax.checkpoint import Checkpointer
    from converters.jax_to_hf import params_from_state

    with Checkpointer(p) as ckpt:
        return params_from_state(ckpt.restore())


@dataclasses.dataclass
class Policy:
    """The trainable policy and everything needed to step it."""

    mesh: Mesh
    model_cfg: ModelConfig
    graphdef: nnx.GraphDef
    rest: nnx.State
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    state: TrainState
    rng: jax.Array
    ckpt: TrainCheckpointer
    start_step: int
    data_position: dict[str, Any]
    extra: dict[str, Any]
    output_dir: Path
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)  # restored checkpoint meta (not step/data)

    @property
    def params(self) -> dict[str, jax.Array]:
        return self.state.params

    def save(
        self,
        step: int,
        *,
        data_position: Mapping[str, Any],
        extra: Mapping[str, Any] | None = None,
        meta: Mapping[str, Any] | None = None,
        force=False,
    ) -> bool:
        """Checkpoints the state as ``step`` (when due under ``checkpoint.every_steps``, or ``force``).

        ``meta`` (JSON-able, e.g. the baseline cache) is restored into ``Policy.meta`` on resume.
        """
        return self.ckpt.save(
            step, self.state, self.rng, data_position=data_position, extra=extra, meta=meta, force=force
        )


def make_policy(
    config: Any,
    *,
    learning_rate: float,
    total_steps: int,
    extra_init: Any = None,
    init_path: str | None = None,
    model_cfg: ModelConfig | None = None,
) -> Policy:
    """Builds (or resumes) the policy for a learner.

    Args:
      config: the run ConfigDict.
      learning_rate: the learner's peak rate.
      total_steps: optimiser updates in the run.
      extra_init: ``fn(params) -> {name: tree}`` of extra trees to checkpoint (e.g. a reference copy).
      init_path: override of ``config.model.teacher`` (e.g. the SFT output inside a pipeline).
      model_cfg: use this architecture instead of the one named by the config (random init unless a
        path is given); dtypes and remat still come from ``config.model``.
    """
    check_writable(config.output_dir)
    mesh = mesh_from_config(config)
    path = config.model.teacher if init_path is None else init_path
    if model_cfg is not None:
        cfg = model_cfg.replace(
            param_dtype=str(config.model.param_dtype),
            dtype=str(config.model.compute_dtype),
            remat=bool(config.model.remat),
            remat_policy=str(config.model.get("remat_policy", "full")),
            attention=str(config.model.get("attention", "auto")),
            scan_layers=bool(config.model.get("scan_layers", True)),
        )
    else:
        cfg = model_config(path, config.model.teacher_preset, model_section=config.model)
    flat = load_flat_params(path, cfg)
    model = build_model(cfg, flat, mesh=mesh, seed=int(config.seed))
    graphdef, params, rest = split_model(model)
    del model, flat
    spec = optim_lib.spec_from_config(config.optim, learning_rate, total_steps)
    tx, schedule = optim_lib.make_optimizer(spec)
    state = init_state(tx, params, mesh)
    rng = jax.random.key(int(config.seed))
    extra = extra_init(params) if extra_init is not None else {}
    out = Path(config.output_dir)
    ck = config.checkpoint
    ckpt = TrainCheckpointer(
        out / "checkpoints",
        every_steps=int(ck.every_steps),
        keep=int(ck.keep),
        async_save=bool(ck.async_save),
    )
    _write_model_files(out / "checkpoints", cfg, path)
    start, position, restored = 0, {}, {}
    if ck.resume and ckpt.latest_step() is not None:
        state, rng, extra, meta = ckpt.restore(state, rng, extra=extra)
        start, position = int(meta["step"]), dict(meta.get("data", {}))
        restored = {k: v for k, v in meta.items() if k not in ("step", "data")}
    return Policy(
        mesh, cfg, graphdef, rest, tx, schedule, state, rng, ckpt, start, position, extra, out, restored
    )


def check_writable(output_dir: str) -> None:
    """Creates ``output_dir`` and writes a probe file, before any model is built.

    Raises:
      PermissionError: naming ``--config.output_dir`` when the folder cannot be created or written.
    """
    out = Path(output_dir)
    probe = out / f".write_probe_{distributed.process_index()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"--config.output_dir={output_dir}: cannot write there ({e})") from e


def export_policy_hf(
    policy: Policy,
    folder: str | Path,
    tokenizer_src: Any = None,
    *,
    cfg: ModelConfig | None = None,
    dtype: str | None = None,
) -> Path:
    """Writes the policy's params as an HF folder (overwriting it) and returns the folder.

    The params are gathered on every process (a collective), written by the main one; the others wait.
    """
    from converters.jax_to_hf import export_hf_dir

    params = distributed.gather_to_host(policy.params)
    folder = Path(folder)
    if distributed.is_main_process():
        export_hf_dir(params, cfg or policy.model_cfg, folder, tokenizer_src=tokenizer_src, dtype=dtype,
                      overwrite=True)  # fmt: skip
    distributed.sync("atlas_jax.export_hf")
    return folder


def _write_model_files(ckpt_dir: Path, cfg: ModelConfig, source: str) -> None:
    """model_config.json + tokenizer assets beside the steps, so converters.jax_to_hf can export any step.

    Written by the main process only (the folder is shared by every host); the others wait for it.
    """
    from converters.hf_to_jax import ASSETS_DIR, copy_assets, write_model_config

    if distributed.is_main_process():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        write_model_config(ckpt_dir, cfg)
        if source:
            src = Path(source)
            copy_assets(src / ASSETS_DIR if (src / ASSETS_DIR).is_dir() else src, ckpt_dir / ASSETS_DIR)
    distributed.sync("atlas_jax.model_files")
