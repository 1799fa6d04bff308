"""bench/aot_plan.py: compile-only plans, a memory bound that can fail, and the TPU/GPU kernels compiled without a device.

The CPU plan compiles our real SFT step / GRPO update / sampler for a tiny preset on the 8 local CPU devices and
asserts the per-device peak stays under a stated bound: ``BOUND_MIB`` (measured 2-12 MiB per program on jax 0.10.2;
the bound leaves ~4x headroom, so a regression such as unsharded parameters or materialised full-vocab logits per
token fails it). The TPU (splash attention, v5e 2x2) and GPU (8 x H100, CUDA plugin) compiles need the ``aot``
extra (``pip install -e ".[aot]"``: libtpu + jax-cuda12-plugin; ``make test`` installs it); cuDNN attention is
not compiled here (it needs the 716 MB cudnn wheel at compile time) and is exercised on a GPU by
tools/gpu_check.sh.
"""

from __future__ import annotations

import importlib.util

import pytest

from bench import aot_plan

BOUND_MIB = 48
SMALL = {
    "sft": ["sft.max_length=256", "sft.batch_size=8", "sft.micro_batch_size=4"],
    "grpo": ["protocol.max_prompt_tokens=64", "protocol.max_teaching_tokens=64", "grpo.problems_per_step=4"],
    "sample": [
        "protocol.max_prompt_tokens=64",
        "protocol.max_teaching_tokens=64",
        "grpo.problems_per_step=8",
    ],
}


_REPORTS: dict[str, dict] = {}


def _cpu_report(job: str) -> dict:
    if job not in _REPORTS:  # one compile per job for the whole module
        _REPORTS[job] = aot_plan.plan(
            "tiny_qwen3", "cpu-8", job, overrides=SMALL[job], hbm_gib=BOUND_MIB / 1024, margin=1.0
        )
    return _REPORTS[job]


@pytest.mark.slow
@pytest.mark.parametrize("job", ["sft", "grpo", "sample"])
def test_cpu_plan_stays_under_the_memory_bound(job):
    report = _cpu_report(job)
    assert report["devices"] == 8 and report["mesh"] == [1, 8, 1]
    assert report["programs"] and all(not p["error"] for p in report["programs"])
    for p in report["programs"]:
        assert p["peak"] > 0 and (p["model_flops"] > 0 or p["name"] == "rollout_copy")
        assert p["peak"] <= BOUND_MIB * 2**20, f"{p['name']}: {p['peak'] / 2**20:.1f} MiB > {BOUND_MIB} MiB"
    assert report["fits"]
    text = aot_plan.format_report(report)
    assert "FITS" in text and report["programs"][0]["name"] in text


@pytest.mark.slow
def test_sample_plan_decodes_from_the_compute_dtype_rollout_copy():
    """The sampler is lowered as the GRPO run drives it: a copy program (fp32 FSDP master -> bf16 matrices laid out
    by DECODE_RULES, i.e. replicated over fsdp on this (1, 8, 1) mesh), then prefill/decode taking that copy."""
    import math

    from flax import nnx

    from atlas_jax.models import flatten
    from atlas_jax.models.params import abstract_model
    from atlas_jax.models.presets import get_preset

    report = _cpu_report("sample")
    names = [p["name"] for p in report["programs"]]
    assert names == ["rollout_copy", "sample_prefill", "sample_decode"]
    copy, _, decode = report["programs"]
    params = flatten(nnx.state(abstract_model(get_preset("tiny_qwen3")), nnx.Param)).values()
    bf16_replicated = sum(math.prod(x.shape) * (2 if x.ndim >= 2 else 4) for x in params)
    fp32_fsdp = sum(math.prod(x.shape) * 4 for x in params)
    assert bf16_replicated - 4096 <= copy["out"] <= bf16_replicated + 4096  # (+ the RNG state, replicated)
    assert copy["args"] < fp32_fsdp / 2  # the master is FSDP-sharded over 8 devices
    assert decode["args"] >= bf16_replicated  # the copy (+ the decode state) is what decode takes
    assert all(p["resident"] > 0 for p in report["programs"])  # the optimizer state (+ master, ref) meanwhile
    assert report["peak_bytes"] == max(p["peak"] + p["resident"] for p in report["programs"])


@pytest.mark.slow
def test_plan_reports_not_fitting_when_the_bound_is_passed():
    report = _cpu_report("sft")
    assert report["peak_bytes"] > 2**20  # the step needs more than 1 MiB per device
    tight = aot_plan.with_verdict(report, hbm_gib=1 / 1024, margin=1.0)  # a 1 MiB chip
    assert not tight["fits"] and "DOES NOT FIT" in aot_plan.format_report(tight)
    assert aot_plan.with_verdict(report, hbm_gib=BOUND_MIB / 1024, margin=1.0)["fits"]


def test_bad_topology_and_job_are_named():
    with pytest.raises(ValueError, match=r"--topology='v9-1'"):
        aot_plan.topology("v9-1")
    with pytest.raises(ValueError, match=r"--job='train'"):
        aot_plan.plan("tiny_qwen3", "cpu-8", "train")


def _need_aot_extra(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.fail(f"{module} is not installed: pip install -e '.[aot]' (make test installs it)")


@pytest.mark.slow
@pytest.mark.aot
def test_sft_step_with_splash_attention_compiles_for_tpu():
    _need_aot_extra("libtpu")
    report = aot_plan.plan("tiny_qwen3", "v5e-4", "sft", overrides=SMALL["sft"], attention="splash")
    assert report["platform"] == "tpu" and report["devices"] == 4 and report["attention"] == "splash"
    step = report["programs"][0]
    assert not step["error"] and step["peak"] > 0 and report["fits"]
    assert step["kernels"].get("tpu_custom_call", 0) >= 1, step["kernels"]  # the Pallas splash kernel


@pytest.mark.slow
@pytest.mark.aot
def test_train_step_compiles_for_8_h100():
    _need_aot_extra("jax_plugins.xla_cuda12")
    report = aot_plan.plan("tiny_qwen3", "h100x8", "sft", overrides=SMALL["sft"], mesh_shape=(1, 4, 2))
    assert report["platform"] == "gpu" and report["devices"] == 8
    step = report["programs"][0]
    assert not step["error"] and step["peak"] > 0 and report["fits"]
