"""Would it fit? Compile (never run) our SFT step, GRPO update or sampler for an accelerator slice we do not have.

    pip install -e ".[aot]"   # libtpu + the CUDA plugin: compile for TPU / GPU on a CPU-only machine
    python -m bench.aot_plan --preset qwen3_8b --topology v5p-32 --job sft
    python -m bench.aot_plan --preset qwen3_8b --topology h100x8 --job grpo --mesh 1,8,1 --remat full

Jobs (each is *our* program, built by the same functions training uses, on abstract inputs):
  - sft:    ``train_step.make_train_step`` with ``sft_loss_fn`` at ``configs/run/teacher_sft.py``'s batch
            (``sft.batch_size`` rows of ``sft.max_length`` tokens, ``sft.micro_batch_size`` per micro-batch).
  - grpo:   the GRPO update of ``configs/run/teacher_rcl.py``: ``problems_per_step × num_generations`` rows of
            ``max_prompt_tokens + max_teaching_tokens``, plus the reference-log-prob scoring pass (beta > 0);
            the reference parameters (an fp32 copy) are counted as resident memory.
  - sample: what ``JaxSampler.generate`` runs in the GRPO loop: the rollout copy (``engine.jax_rollout_copy``:
            compute-dtype matrices, one array per layer, laid out by ``DECODE_RULES``, built from the fp32 FSDP
            master), then the prefill of ``problems_per_step`` prompts (× G samples, rows padded to the mesh)
            and the decode loop from that copy (``jax_sampler.compiled_programs``), cache sized for the prompt +
            teaching buckets.
Per program it prints per-device bytes (arguments, outputs, aliased, temporaries, peak = args + out - alias +
temp, and *resident*: what the run holds meanwhile that is not an argument, e.g. the reference params during the
GRPO update, the train state during reference scoring and sampling), XLA's FLOP count (a scan/while body is counted once), the model FLOPs per step (6·N·tokens for training,
2·N·tokens forward), compile seconds (wall, and CPU seconds of all threads: the comparable number when the
machine is shared), and whether peak (+ resident extras) fits ``margin × HBM`` of the chip.
TPU compiles fail when HBM is exceeded (reported as not fitting); GPU compile-only builds succeed at any size.

``--topology cpu-N`` compiles for the local CPU devices (tests; set XLA_FLAGS for N fake devices) with
``--hbm_gib`` as the per-device bound.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only: never initialise an accelerator client
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
# libtpu takes /tmp/libtpu_lockfile for the process that loads it; any other process with libtpu importable (a
# training run, a test) then makes TPU compiles fail with "Internal error when accessing libtpu multi-process
# lockfile". Compile-only use touches no chip, so several processes may load it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Topology:
    """An accelerator slice: how to get abstract devices for it and the memory of one chip."""

    platform: str  # "tpu" | "gpu" | "cpu"
    name: str  # get_topology_desc name (TPU), GPU count (gpu), device count (cpu)
    hbm_gib: float
    chip_config: str | None = None
    chips_per_host: tuple[int, int, int] | None = None


TOPOLOGIES: dict[str, Topology] = {
    "v4-8": Topology("tpu", "v4:2x2x1", 32, "megacore"),
    "v4-32": Topology("tpu", "v4:2x2x4", 32, "megacore", (2, 2, 1)),
    "v5p-8": Topology("tpu", "v5:2x2x1", 95, "megacore"),
    "v5p-32": Topology("tpu", "v5:2x2x4", 95, "megacore", (2, 2, 1)),
    "v5p-64": Topology("tpu", "v5:2x4x4", 95, "megacore", (2, 2, 1)),
    "v5e-4": Topology("tpu", "v5e:2x2", 16),
    "v5e-16": Topology("tpu", "v5e:4x4", 16, None, (2, 2, 1)),
    "v6e-4": Topology("tpu", "v6e:2x2", 32),
    "v6e-16": Topology("tpu", "v6e:4x4", 32, None, (2, 2, 1)),
    "h100x8": Topology("gpu", "8", 80),
    "h100x1": Topology("gpu", "1", 80),
}

# A public H100 SXM description for compile-only CUDA builds (GpuTargetConfigProto text).
_H100_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84929347584 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
runtime_version { major: 12 minor: 8 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""

DEFAULT_RUN_CONFIG = {"sft": "configs/run/teacher_sft.py", "grpo": "configs/run/teacher_rcl.py"}
DEFAULT_RUN_CONFIG["sample"] = DEFAULT_RUN_CONFIG["grpo"]


def load_run_config(path: str):
    """``get_config()`` of a run config file (relative paths: from the repository root)."""
    import importlib.util
    from pathlib import Path

    file = Path(path)
    if not file.is_file():
        file = Path(__file__).resolve().parents[1] / path
    if not file.is_file():
        raise FileNotFoundError(f"--config={path}: no such run config")
    spec = importlib.util.spec_from_file_location(f"_aot_run_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def topology(name: str, hbm_gib: float | None = None) -> tuple[list[Any], Topology]:
    """Abstract devices of topology ``name`` (see `TOPOLOGIES`; ``cpu-N``: the first N local devices)."""
    import jax

    if name.startswith("cpu-"):
        n = int(name.split("-", 1)[1])
        devices = jax.devices("cpu")
        if len(devices) < n:
            raise ValueError(
                f"--topology={name}: only {len(devices)} CPU devices (set XLA_FLAGS device count)"
            )
        return devices[:n], Topology("cpu", str(n), 1.0 if hbm_gib is None else hbm_gib)
    if name not in TOPOLOGIES:
        raise ValueError(f"--topology={name!r}: expected one of {sorted(TOPOLOGIES)} or cpu-N")
    topo = TOPOLOGIES[name]
    if hbm_gib is not None:
        topo = dataclasses.replace(topo, hbm_gib=hbm_gib)
    from jax.experimental import topologies

    if topo.platform == "gpu":
        desc = topologies.get_topology_desc(
            platform="cuda", target_config=_H100_TARGET, topology=f"1x1x{topo.name}"
        )
        return list(desc.devices), topo
    kwargs: dict[str, Any] = {}
    if topo.chip_config:
        kwargs["chip_config_name"] = topo.chip_config
    if topo.chips_per_host:
        kwargs["chips_per_host_bounds"] = topo.chips_per_host
    desc = topologies.get_topology_desc(topology_name=topo.name, platform="tpu", **kwargs)
    return list(desc.devices), topo


@dataclasses.dataclass
class Program:
    """Per-device memory and cost of one compiled program."""

    name: str
    args: int
    out: int
    alias: int
    temp: int
    code: int
    xla_flops: float | None
    model_flops: float
    compile_s: float
    error: str = ""
    kernels: dict[str, int] = dataclasses.field(
        default_factory=dict
    )  # custom-call target -> count in the HLO
    resident: int = 0  # bytes per device held by the run while this program runs, not among its arguments
    compile_cpu_s: float = 0.0  # CPU seconds of the compile (all threads): comparable on a loaded machine

    @property
    def peak(self) -> int:
        return self.args + self.out - self.alias + self.temp


def _program(name: str, lowered, model_flops: float) -> Program:
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        compiled = lowered.compile()
    except Exception as e:  # TPU: RESOURCE_EXHAUSTED when the program does not fit the HBM
        msg = str(e).splitlines()[0][:300]
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        return Program(name, 0, 0, 0, 0, 0, None, model_flops, dt, error=msg, compile_cpu_s=cpu)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    mem = compiled.memory_analysis()
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        flops = float(cost["flops"]) if cost and "flops" in cost else None
    except Exception:  # GPU compile-only builds have no cost model
        flops = None
    kernels: dict[str, int] = {}
    for target in re.findall(r'custom_call_target="([^"]+)"', compiled.as_text() or ""):
        kernels[target] = kernels.get(target, 0) + 1
    return Program(
        name,
        int(mem.argument_size_in_bytes),
        int(mem.output_size_in_bytes),
        int(mem.alias_size_in_bytes),
        int(mem.temp_size_in_bytes),
        int(mem.generated_code_size_in_bytes),
        flops,
        model_flops,
        dt,
        kernels=kernels,
        compile_cpu_s=cpu,
    )


def _sds(x, sharding):
    import jax

    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _per_device_bytes(tree) -> int:
    import jax

    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape)
        total += math.prod(shard) * x.dtype.itemsize
    return total


def _abstract_policy(cfg, mesh):
    """(graphdef, rest, abstract flat params with their shardings) without materialising anything."""
    import jax
    from flax import nnx

    from atlas_jax.models import params as params_lib
    from atlas_jax.models.decoder import Decoder
    from atlas_jax.models.sharding import state_shardings

    with jax.set_mesh(mesh):
        abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    shardings = params_lib.flatten(state_shardings(params, mesh))
    flat = {k: _sds(v, shardings[k]) for k, v in params_lib.flatten(params).items()}
    return graphdef, rest, flat


def _batch(arrays: dict, rows: int, mesh) -> dict:
    """Abstract ``[rows, ...]`` batch with the dtypes/trailing shapes of a one-row host batch."""
    import jax

    from atlas_jax.training.train_step import batch_sharding

    sh = batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct((rows, *v.shape[1:]), v.dtype, sharding=sh) for k, v in arrays.items()}


def _train_programs(config, cfg, mesh, job: str, micro_batch: int | None) -> tuple[list[Program], int, dict]:
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from atlas_jax.training import batching, train_step
    from atlas_jax.training.optimizer import make_optimizer, spec_from_config

    graphdef, rest, params = _abstract_policy(cfg, mesh)
    n_params = sum(math.prod(v.shape) for v in params.values())
    tx, _ = make_optimizer(spec_from_config(config.optim, 1e-5, 100))
    shardings = train_step.state_shardings(tx, params, mesh)
    opt_abs = jax.eval_shape(tx.init, params)
    opt = jax.tree.map(_sds, opt_abs, shardings.opt_state)
    rep = NamedSharding(mesh, PartitionSpec())
    state = train_step.TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep), params=params, opt_state=opt
    )
    programs = []
    if job == "sft":
        from atlas_jax.training.sft import sft_loss_fn

        sc = config.sft
        rows, length = int(sc.batch_size), int(sc.max_length)
        micro = int(micro_batch or sc.micro_batch_size)
        host = batching.sft_arrays([[1, 2, 3]], [[0, 1, 1]], max_length=length, length_bucket=length)
        batch = _batch(host, rows, mesh)
        loss_fn = sft_loss_fn(int(config.grpo.logprob_chunk))
        tokens = rows * length
    else:
        from atlas_jax.training.grpo import GRPOSpec, grpo_loss_fn

        spec = GRPOSpec.from_config(config)
        if micro_batch:
            spec = dataclasses.replace(spec, micro_batch_size=int(micro_batch))
        micro = spec.micro_batch_size
        rows = int(config.grpo.problems_per_step) * int(config.grpo.num_generations)
        prompt = int(config.protocol.max_prompt_tokens)
        host = batching.grpo_arrays(
            [[1] * prompt],
            [[2]],
            [[-1.0]],
            [0.5],
            completion_len=spec.completion_len,
            prompt_bucket=spec.prompt_bucket,
        )
        if spec.beta > 0:
            host["ref_logprobs"] = host["completion_mask"].astype("float32")
        if spec.num_iterations > 1:
            host["old_logprobs"] = host["completion_mask"].astype("float32")
        batch = _batch(host, rows, mesh)
        loss_fn = grpo_loss_fn(spec)
        length = host["tokens"].shape[1]
        tokens = rows * length
        if spec.beta > 0:
            from atlas_jax.training.logprobs import completion_logprobs

            def logprobs(model, mb):
                prompt_len = mb["tokens"].shape[1] - mb["completion_mask"].shape[1]
                return completion_logprobs(
                    model, mb["tokens"], mb["attention_mask"], mb["positions"], prompt_len,
                    temperature=spec.temperature, chunk=spec.logprob_chunk,
                )[0]  # fmt: skip

            score = train_step.make_score_fn(
                graphdef, rest, logprobs, num_micro=rows // micro, mesh=mesh, param_shardings=shardings.params
            )
            ref = _program("grpo_ref_logprobs", score.lower(params, batch), 2.0 * n_params * tokens)
            ref.resident = _per_device_bytes(
                state
            )  # the policy's train state (the reference is the argument)
            programs.append(ref)
    if rows % micro:
        raise ValueError(f"{rows} rows do not split into micro-batches of {micro} (--micro_batch)")
    step = train_step.make_train_step(
        graphdef, rest, tx, loss_fn, num_micro=rows // micro, mesh=mesh, shardings=shardings
    )
    main = _program(f"{job}_step", step.lower(state, batch), 6.0 * n_params * tokens)
    if job == "grpo" and spec.beta > 0:
        main.resident = _per_device_bytes(params)  # the reference parameters (fp32, laid out like the policy)
    programs.insert(0, main)
    info = {"rows": rows, "length": length, "micro_batch": micro, "params": n_params}
    return programs, info


def _sample_programs(config, cfg, mesh) -> tuple[list[Program], dict]:
    """The sampler as the GRPO run drives it: the rollout copy (``engine.jax_rollout_copy``: floating matrices in
    ``cfg.dtype``, one array per layer, laid out by ``jax_sampler.DECODE_RULES``) built from the fp32 FSDP master
    by one program, then prefill + decode from that copy, with the row padding and prompt/length buckets of
    ``JaxSampler.generate``.
    Resident meanwhile: the train state (master params + optimiser state) and the reference params (beta > 0)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from atlas_jax.engines import jax_sampler
    from atlas_jax.engines.sampling import Strategy
    from atlas_jax.models import params as params_lib
    from atlas_jax.models.decoder import Decoder
    from atlas_jax.models.sharding import state_shardings
    from atlas_jax.training import train_step
    from atlas_jax.training.optimizer import make_optimizer, spec_from_config

    with jax.set_mesh(mesh):
        abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    graphdef, params_state = nnx.split(abstract)
    master_sh = state_shardings(params_state, mesh)
    master = jax.tree.map(_sds, params_state, master_sh)
    copy_from_master = bool(config.engine.get("jax_rollout_copy", True))
    flat_master = {k: v for k, v in params_lib.flatten(master).items() if hasattr(v, "shape")}
    n_params = sum(math.prod(v.shape) for k, v in flat_master.items() if k in _param_keys(abstract))
    programs: list[Program] = []
    if copy_from_master:
        transpose = jax_sampler.transposes_table(cfg, jax_sampler._platform(mesh))
        copy_sh = jax_sampler.rollout_shardings(params_state, mesh, transpose_table=transpose)
        layout = functools.partial(
            jax_sampler.decode_layout, dtype=jnp.dtype(cfg.dtype), transpose_table=transpose
        )
        copy_fn = jax.jit(layout, out_shardings=copy_sh)
        with jax.set_mesh(mesh):
            programs.append(_program("rollout_copy", copy_fn.lower(master), 0.0))
            weights = jax.tree.map(_sds, jax.eval_shape(copy_fn, master), copy_sh)
    else:
        weights = master
    prompts, g = int(config.grpo.problems_per_step), int(config.grpo.num_generations)
    bp = jax_sampler.bucket(prompts, 1)
    tp = jax_sampler.bucket(int(config.protocol.max_prompt_tokens), int(config.engine.jax_prompt_bucket))
    m = jax_sampler.bucket(int(config.protocol.max_teaching_tokens), 16)
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape, strict=True))
    row_multiple = sizes["data"] * sizes["fsdp"]
    rows_sh = train_step.batch_sharding(mesh) if bp % row_multiple == 0 else None
    rep = NamedSharding(mesh, PartitionSpec())
    sd = lambda shape, dtype, sh=None: jax.ShapeDtypeStruct(shape, dtype, sharding=sh or rep)  # noqa: E731
    progs = jax_sampler.compiled_programs(graphdef, mesh)
    strategy = Strategy.from_params(float(config.grpo.temperature), 1.0, 0)
    with jax.set_mesh(mesh):
        args = (
            weights, sd((bp, tp), jnp.int32, rows_sh), sd((bp, tp), jnp.int32, rows_sh),
            sd((bp,), jnp.bool_, rows_sh), sd((), jnp.uint32), sd((), jnp.int32), sd((8,), jnp.int32),
            sd((), jnp.uint32),
        )  # fmt: skip
        kw = {"n": g, "cache_len": tp + m, "max_new": m, "strategy": strategy, "row_multiple": row_multiple}
        prefill = progs.prefill.lower(*args, **kw)
        programs.append(_program("sample_prefill", prefill, 2.0 * n_params * bp * tp))
        out_shapes = jax.eval_shape(lambda *a: progs.prefill(*a, **kw), *args)
        compiled = prefill.compile()
        st = jax.tree.map(_sds, out_shapes, compiled.output_shardings)
        decode = progs.decode.lower(
            weights, st, sd((), jnp.int32), sd((), jnp.int32), sd((8,), jnp.int32), strategy=strategy
        )
        rows = st.tokens.shape[0]
        programs.append(_program("sample_decode", decode, 2.0 * n_params * rows * m))
    # Resident during the rollout: the train state (master params + AdamW moments) and the reference params.
    tx, _ = make_optimizer(spec_from_config(config.optim, 1e-5, 100))
    flat_params = {k: v for k, v in flat_master.items() if k in _param_keys(abstract)}
    opt_abs = jax.eval_shape(tx.init, flat_params)
    opt_sh = train_step.state_shardings(tx, flat_params, mesh).opt_state
    master_b = _per_device_bytes(flat_params)
    opt_b = _per_device_bytes(jax.tree.map(_sds, opt_abs, opt_sh))
    ref_b = master_b if float(config.grpo.beta) > 0 else 0
    for p in programs:  # rollout_copy and (without the copy) prefill/decode take the master as an argument
        takes_master = p.name == "rollout_copy" or not copy_from_master
        p.resident = opt_b + ref_b + (0 if takes_master else master_b)
    info = {"rows": rows, "length": tp + m, "micro_batch": rows, "params": n_params}
    return programs, info


def _param_keys(abstract) -> set[str]:
    from flax import nnx

    from atlas_jax.models import params as params_lib

    return set(params_lib.flatten(nnx.state(abstract, nnx.Param)))


def plan(
    preset: str,
    topology_name: str,
    job: str,
    *,
    mesh_shape: Sequence[int] = (1, -1, 1),
    remat: str = "full",
    micro_batch: int | None = None,
    attention: str | None = None,
    scan_layers: bool = True,
    run_config: str | None = None,
    overrides: Sequence[str] = (),
    hbm_gib: float | None = None,
    margin: float = 0.9,
) -> dict[str, Any]:
    """Compiles ``job`` for ``preset`` on ``topology_name``; returns the report (see the module docstring).

    Args:
      remat: "none" or a `config.REMAT_POLICIES` name.
      attention: kernel; None = splash on TPU, XLA elsewhere (cuDNN needs the cudnn wheel at compile time).
      overrides: ``key=value`` config overrides (e.g. ``sft.max_length=4096``), parsed as Python literals.
      margin: the fraction of HBM a program may use (the rest is runtime / fragmentation headroom).
    """
    import ast

    import jax

    if job not in ("sft", "grpo", "sample"):
        raise ValueError(f"--job={job!r}: expected sft, grpo or sample")

    from atlas_jax.models.presets import get_preset
    from atlas_jax.models.sharding import make_mesh

    devices, topo = topology(topology_name, hbm_gib)
    shape = [int(s) for s in mesh_shape]
    if shape.count(-1) == 1:
        known = math.prod(s for s in shape if s != -1)
        shape[shape.index(-1)] = len(devices) // known
    mesh = make_mesh(shape, devices=devices)
    config = load_run_config(run_config or DEFAULT_RUN_CONFIG[job])
    for item in overrides:
        key, _, value = item.partition("=")
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = ast.literal_eval(value) if value[:1] in "-0123456789[(\"'TF" else value
    cfg = get_preset(preset).replace(
        param_dtype=str(config.model.param_dtype),
        dtype=str(config.model.compute_dtype),
        remat=remat != "none",
        remat_policy=remat if remat != "none" else "full",
        attention=attention or ("splash" if topo.platform == "tpu" else "xla"),
        scan_layers=scan_layers,
    )
    if job in ("sft", "grpo"):
        programs, info = _train_programs(config, cfg, mesh, job, micro_batch)
    else:
        programs, info = _sample_programs(config, cfg, mesh)
    worst = max(p.peak + p.resident for p in programs)
    report = {
        "preset": preset,
        "topology": topology_name,
        "platform": topo.platform,
        "devices": len(devices),
        "job": job,
        "mesh": shape,
        "remat": remat,
        "attention": cfg.attention,
        "scan_layers": scan_layers,
        "jax": jax.__version__,
        **info,
        "programs": [dataclasses.asdict(p) | {"peak": p.peak} for p in programs],
        "resident_extra_bytes": max(p.resident for p in programs),
        "peak_bytes": worst,
        "hbm_gib": topo.hbm_gib,
        "margin": margin,
    }
    return with_verdict(report, topo.hbm_gib, margin)


def with_verdict(report: dict[str, Any], hbm_gib: float, margin: float) -> dict[str, Any]:
    """``report`` with ``fits``: every program compiled and peak + resident <= ``margin × hbm_gib`` GiB."""
    ok = all(not p["error"] for p in report["programs"])
    fits = ok and report["peak_bytes"] <= margin * hbm_gib * GIB
    return {**report, "hbm_gib": hbm_gib, "margin": margin, "fits": fits}


def format_report(r: dict[str, Any]) -> str:
    g = lambda b: f"{b / GIB:8.3f}"  # noqa: E731
    lines = [
        f"{r['preset']} {r['job']} on {r['topology']} ({r['devices']} x {r['platform']}, {r['hbm_gib']} GiB each), "
        f"mesh {tuple(r['mesh'])}, remat {r['remat']}, attention {r['attention']}, scan {r['scan_layers']}, "
        f"{r['rows']} rows x {r['length']} tokens, micro-batch {r['micro_batch']}, {r['params'] / 1e9:.2f}B params",
        f"{'program':<20}{'args GiB':>9}{'out':>8}{'alias':>8}{'temp':>8}{'peak':>8}{'+resid.':>8}{'TFLOP/step':>12}"
        f"{'XLA TFLOP':>10}{'compile s':>10}{'(CPU s)':>9}",
    ]
    for p in r["programs"]:
        if p["error"]:
            lines.append(f"{p['name']:<20} does not compile: {p['error']}")
            continue
        xla = "-" if p["xla_flops"] is None else f"{p['xla_flops'] / 1e12:.1f}"
        lines.append(
            f"{p['name']:<20}{g(p['args'])}{g(p['out'])}{g(p['alias'])}{g(p['temp'])}{g(p['peak'])}"
            f"{g(p.get('resident', 0))}{p['model_flops'] / 1e12:12.1f}{xla:>10}{p['compile_s']:10.1f}{p.get('compile_cpu_s', 0):9.1f}"
        )
    verdict = "FITS" if r["fits"] else "DOES NOT FIT"
    lines.append(
        f"peak per device {r['peak_bytes'] / GIB:.2f} GiB (worst program peak + resident); limit {r['margin']:.0%} of {r['hbm_gib']} GiB = "
        f"{r['margin'] * r['hbm_gib']:.1f} GiB -> {verdict}"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--preset", required=True, help="model preset (qwen3_8b, qwen3_4b, qwen3_0_6b, tiny_qwen3, ...)"
    )
    ap.add_argument("--topology", required=True, help=f"{', '.join(sorted(TOPOLOGIES))} or cpu-N")
    ap.add_argument("--job", required=True, choices=["sft", "grpo", "sample"])
    ap.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor (one -1 takes the remaining devices)")
    ap.add_argument("--remat", default="full", help="none | full | save_dots | offload")
    ap.add_argument(
        "--micro_batch", type=int, default=None, help="rows per micro-batch (default: the config's)"
    )
    ap.add_argument("--attention", default=None, help="dense | xla | cudnn | splash (default: splash on TPU)")
    ap.add_argument("--unrolled", action="store_true", help="unroll the layers (the pre-scan program)")
    ap.add_argument("--config", default=None, help="run config (default: teacher_sft.py / teacher_rcl.py)")
    ap.add_argument("--set", action="append", default=[], help="config override key=value (repeatable)")
    ap.add_argument("--hbm_gib", type=float, default=None, help="override the chip memory (cpu-N: required)")
    ap.add_argument("--margin", type=float, default=0.9, help="usable fraction of HBM")
    ap.add_argument("--json", default=None, help="also write the report as JSON here")
    a = ap.parse_args(argv)
    report = plan(
        a.preset, a.topology, a.job,
        mesh_shape=[int(x) for x in a.mesh.split(",")], remat=a.remat, micro_batch=a.micro_batch,
        attention=a.attention, scan_layers=not a.unrolled, run_config=a.config, overrides=a.set,
        hbm_gib=a.hbm_gib, margin=a.margin,
    )  # fmt: skip
    print(format_report(report))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0 if report["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
