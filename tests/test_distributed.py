"""Multi-host runs for real: 2 local processes joined by jax.distributed (gloo) form one 4-device mesh.

The processes run tests/multihost_worker.py; their forward pass and SFT train step over the global mesh are
compared with a single-process run of the same parameters in this process. Settings resolution and its
error messages are checked in-process (no distributed initialisation happens here).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from atlas_jax import distributed

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "multihost_worker.py"
SCRIPT = ROOT / "launch" / "multihost.sh"
ATLAS_VARS = (
    distributed.ENV_COORDINATOR,
    distributed.ENV_NUM_PROCESSES,
    distributed.ENV_PROCESS_ID,
    distributed.ENV_LOCAL_DEVICE_IDS,
    distributed.ENV_MODE,
)
TIMEOUT_S = 900  # a hang guard only: 2 shared cores at load ~20 compile slowly


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env(devices: int = 2) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ATLAS_VARS}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = str(ROOT)
    env["PYTHON"] = sys.executable
    return env


def _spawn_workers(out_dir: Path, n: int = 2, quick: bool = False) -> list[subprocess.Popen]:
    return _spawn([str(out_dir)] + (["--quick"] if quick else []), n, out_dir / "logs")


def _spawn(
    worker_args: list[str], n: int, log_dir: Path, devices: int = 2, cache_dir: str = ""
) -> list[subprocess.Popen]:
    """``n`` worker processes joined into one run (``n == 1``: a plain single process, no jax.distributed).

    Output goes to ``log_dir/process_<i>.log`` (a pipe could fill and stall a process mid-collective).
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    procs = []
    for i in range(n):
        env = _child_env(devices)
        if cache_dir:
            env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
            env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        if n > 1:
            env.update(
                {
                    distributed.ENV_COORDINATOR: f"127.0.0.1:{port}",
                    distributed.ENV_NUM_PROCESSES: str(n),
                    distributed.ENV_PROCESS_ID: str(i),
                }
            )
        args = [sys.executable, str(WORKER), *worker_args]
        log = log_dir / f"process_{i}.log"
        with log.open("w") as f:
            p = subprocess.Popen(args, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        p.log = log  # type: ignore[attr-defined]
        procs.append(p)
    return procs


def _wait_all(procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    try:
        # Poll all: a failed process stops the wait at once (the others would block in a collective).
        while any(p.poll() is None for p in procs):
            for i, p in enumerate(procs):
                rc = p.poll()
                assert rc in (None, 0), f"process {i} failed (exit {rc}):\n{p.log.read_text()[-4000:]}"
            if time.monotonic() > deadline:
                logs = "\n".join(
                    f"--- process {i}:\n{p.log.read_text()[-2000:]}" for i, p in enumerate(procs)
                )
                pytest.fail(f"processes did not finish in {TIMEOUT_S} s:\n{logs}")
            time.sleep(0.2)
        for i, p in enumerate(procs):
            assert p.returncode == 0, (
                f"process {i} failed (exit {p.returncode}):\n{p.log.read_text()[-4000:]}"
            )
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _check_data(results: list[dict]) -> None:
    x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    for i, r in enumerate(results):
        assert r["mode"] == "explicit"
        assert (int(r["process_index"]), int(r["process_count"])) == (i, 2)
        assert (int(r["device_count"]), int(r["local_device_count"])) == (4, 2)
        assert bool(r["is_main"]) == (i == 0)
        # Σ_r (9r + 3)(r + 1) over r = 0..7, by hand: 9·140 + 12·28 + 3·8 = 1620.
        assert float(r["weighted_sum"]) == 1620.0
        np.testing.assert_array_equal(r["roundtrip"], x)
        np.testing.assert_array_equal(r["interleaved_roundtrip"], x)
        # Different host values are caught on every process (none may go on alone into a collective).
        assert "per-host data differs between process(es) [0] and process(es) [1]" in str(r["differ_error"])
    # make_mesh puts each process's 2 devices in one `data` row: process i feeds rows 4i … 4i+3.
    np.testing.assert_array_equal(results[0]["rows"], [0, 1, 2, 3])
    np.testing.assert_array_equal(results[1]["rows"], [4, 5, 6, 7])
    # Device order p0, p1, p0, p1 along the flattened batch axes: 2-row blocks alternate between processes.
    np.testing.assert_array_equal(results[0]["interleaved_rows"], [0, 1, 4, 5])
    np.testing.assert_array_equal(results[1]["interleaved_rows"], [2, 3, 6, 7])


def _single_process_reference() -> dict:
    """The worker's forward pass and train step on one device of this process."""
    sys.path.insert(0, str(ROOT / "tests"))
    import multihost_worker as w

    from atlas_jax.models.sharding import make_mesh

    c = w.case()
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    state, step, fwd = w.make_step(c["cfg"], c["params"], mesh)
    logits = np.asarray(fwd(state.params, c["batch"]))
    state, metrics = step(state, c["batch"])
    return {
        "logits": logits,
        "loss": float(metrics["loss"]),
        "grad_norm": float(metrics["grad_norm"]),
        "params": {k: np.asarray(v) for k, v in state.params.items()},
        "init": c["params"],
    }


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_match_single_process(tmp_path):
    procs = _spawn_workers(tmp_path)
    try:
        ref = _single_process_reference()  # computed while the workers start up
    finally:
        _wait_all(procs)
    results = [dict(np.load(tmp_path / f"rank{i}.npz")) for i in range(2)]
    _check_data(results)
    # fp32 throughout; sharded matmuls sum in a different order, so allow a few ulps of the values' scale.
    tol = {"rtol": 1e-5, "atol": 1e-5}
    for r in results:
        np.testing.assert_allclose(r["logits"], ref["logits"], **tol)
        np.testing.assert_allclose(float(r["loss"]), ref["loss"], **tol)
        np.testing.assert_allclose(float(r["grad_norm"]), ref["grad_norm"], **tol)
        names = sorted(k.removeprefix("param/") for k in r if k.startswith("param/"))
        assert names == sorted(ref["params"])
        for k in names:
            np.testing.assert_allclose(r["param/" + k], ref["params"][k], err_msg=k, **tol)
    # The step did move every parameter (so equal params are not just equal initial values).
    for k, v in ref["params"].items():
        assert np.abs(v - ref["init"][k]).max() > 1e-6, k


# ------------------------------------------------------------------ real training jobs over 2 processes
@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory) -> dict[str, str]:
    """Tiny random one-layer teacher/student HF folders with a locally trained tokenizer."""
    import torch
    from protocol_helpers import make_tokenizer
    from transformers import AutoModelForCausalLM, Qwen2Config

    root = tmp_path_factory.mktemp("models")
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
    # GRPO problems whose (single-digit) answers the random teacher states in roughly a third of its
    # samples: with a leak penalty, that gives the groups different rewards (a real policy gradient),
    # where the random student alone would score 0 everywhere.
    rows = [
        {"id": f"p{i}", "prompt": f"What is {a} + {b}?", "ground_truth": str(a + b)}
        for i, (a, b) in enumerate([(0, 1), (1, 0), (0, 0), (1, 2), (3, 5), (0, 3), (2, 6), (4, 4),
                                    (1, 7), (0, 8), (3, 0), (2, 1)])
    ]  # fmt: skip
    (root / "rl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out["rl"] = str(root / "rl.jsonl")
    out["jax_cache"] = str(root / "jax_cache")
    return out


def _job(out: Path, folders: dict[str, str], **overrides) -> dict:
    base = {
        "output_dir": str(out / "run"),
        "model.teacher": folders["teacher"],
        "model.student": folders["student"],
        "model.tokenizer": folders["teacher"],
        "model.compute_dtype": "float32",
        "model.remat": False,
        "logging.progress_bar": False,
        "checkpoint.async_save": False,
        "checkpoint.every_steps": 1,
        "checkpoint.export_hf_dir": str(out / "hf"),
    }
    return {**base, **overrides}


def _start_runs(out: Path, runs: list[dict], n: int, devices: int, cache_dir: str) -> list[subprocess.Popen]:
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "spec.json"
    spec.write_text(json.dumps({"runs": runs}))
    return _spawn([str(spec), "--train"], n, out / "logs", devices, cache_dir)


def _run_pair(tmp_path: Path, runs_two: list[dict], runs_one: list[dict], cache_dir: str) -> None:
    """The same jobs in 1 process, then in a 2-process run; every process has 2 CPU devices.

    A persistent compilation cache lets the second run reuse the single-device programs (the student
    sampler) of the first (same XLA flags, so the same cache keys), and a resumed job the programs its
    first job compiled.
    """
    _wait_all(_start_runs(tmp_path / "one", runs_one, 1, 2, cache_dir))
    _wait_all(_start_runs(tmp_path / "two", runs_two, 2, 2, cache_dir))


def _exported(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    assert out, f"no safetensors in {folder}"
    return out


def _check_same_params(two: Path, one: Path, init: Path, tol: float) -> float:
    """Exported HF weights of both runs agree within ``tol``, and training moved them; returns max |Δ|."""
    a, b, start = _exported(two), _exported(one), _exported(init)
    assert sorted(a) == sorted(b)
    worst = 0.0
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=tol, err_msg=k)
        worst = max(worst, float(np.abs(a[k] - b[k]).max()))
    assert max(float(np.abs(a[k] - start[k]).max()) for k in a) > 1e-4, "training did not move the weights"
    return worst


SFT_STEPS = 4


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sft_job_two_processes_equals_one_and_resumes(tmp_path, hf_folders):
    """launch.train SFT over 2 processes = 1 process (params, losses); killed after step 2 and resumed."""
    from protocol_helpers import SAMPLES

    from atlas_jax.training.writers import read_metrics

    def sft(out: Path, **kw) -> dict:
        return _job(
            out, hf_folders, job="sft", **{
                "data.sft_path": str(SAMPLES / "sft_sample.jsonl"), "data.eval_fraction": 0.2,
                "sft.num_steps": SFT_STEPS, "sft.batch_size": 8, "sft.micro_batch_size": 4,
                "sft.max_length": 96, "sft.learning_rate": 1e-3, "sft.eval_every": 2, **kw,
            },
        )  # fmt: skip

    # 2 processes: stop after step 2 (as a kill would), then a second job resumes from the checkpoint.
    _run_pair(
        tmp_path,
        [sft(tmp_path / "two", **{"checkpoint.stop_after_steps": 2}), sft(tmp_path / "two")],
        [sft(tmp_path / "one")],
        hf_folders["jax_cache"],
    )
    two, one = read_metrics(tmp_path / "two/run"), read_metrics(tmp_path / "one/run")
    # metrics.jsonl is written by one process only: every step exactly once, also across the resume.
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, SFT_STEPS + 1))
    first = (tmp_path / "two/run.metrics_after_run0.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in first] == [1, 2]
    # Resumed, not restarted: the records of steps 1-2 (with their wall-clock timings) were kept as written.
    assert (tmp_path / "two/run/metrics.jsonl").read_text().splitlines()[:2] == first
    assert (
        sorted(int(p.name) for p in (tmp_path / "two/run/checkpoints").iterdir() if p.name.isdigit())[-1] == 4
    )
    tol = 1e-5  # fp32; the two runs differ only in where the (same) sums are computed
    for r2, r1 in zip(two, one, strict=True):
        for k in ("loss", "grad_norm", "tokens", "eval/loss"):
            if k in r1:
                np.testing.assert_allclose(r2[k], r1[k], rtol=tol, atol=tol, err_msg=f"step {r1['step']} {k}")
    assert "eval/loss" in two[1] and "eval/loss" in two[3]
    worst = _check_same_params(tmp_path / "two/hf", tmp_path / "one/hf", Path(hf_folders["teacher"]), tol)
    print(f"SFT 2 processes vs 1: max |Δparam| = {worst:.2e}")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_grpo_job_two_processes_equals_one(tmp_path, hf_folders):
    """launch.train GRPO (JAX teacher sampler on the 2-process mesh, JAX student per host) = 1 process.

    Each host rolls out its own half of every step's problems (its student calls seeded by its row
    offsets; the teacher samples the gathered prompts in one global program) and feeds its rows of the
    learner batch; both runs sample the same tokens (compared exactly through the rewards, lengths and
    the saved episodes), and the updates agree within fp32 reduction-order noise. Each host does half
    the single process's student work.
    """
    from atlas_jax.training.writers import read_metrics

    def grpo(out: Path) -> dict:
        return _job(
            out, hf_folders, job="grpo", **{
                "data.rl_path": hf_folders["rl"], "data.eval_fraction": 0.25, "reward.leak_penalty": 1.0,
                "grpo.num_steps": 2, "grpo.problems_per_step": 4, "grpo.num_generations": 4,
                "grpo.micro_batch_size": 8, "grpo.learning_rate": 1e-3, "grpo.beta": 0.0,
                # Probe and baseline share the student's compiled programs (same strategy and shapes).
                "protocol.max_probe_tokens": 8, "protocol.max_teaching_tokens": 48,
                "protocol.max_student_tokens": 8, "protocol.probe_temperature": 0.7,
                "protocol.num_baseline_samples": 1, "protocol.num_student_samples": 1,
                "eval.every_steps": 0, "eval.num_problems": 4,
            },
        )  # fmt: skip

    _run_pair(tmp_path, [grpo(tmp_path / "two")], [grpo(tmp_path / "one")], hf_folders["jax_cache"])
    two, one = read_metrics(tmp_path / "two/run"), read_metrics(tmp_path / "one/run")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2]
    # The set-up gives a real policy gradient: leaks in some samples only, so rewards differ in a group.
    assert all(r["reward_std"] > 0 and 0 < r["leak_rate"] < 1 for r in one), [r["leak_rate"] for r in one]
    tol = 1e-5
    for r2, r1 in zip(two, one, strict=True):
        # Sampling is identical: rewards, leaks and lengths are equal, not just close.
        for k in ("reward_mean", "reward_std", "leak_rate", "teaching_tokens_mean", "completion_tokens"):
            assert r2[k] == r1[k], (r1["step"], k, r2[k], r1[k])
        for k in ("loss", "grad_norm", "entropy", "logprob_mismatch_abs"):
            np.testing.assert_allclose(r2[k], r1[k], rtol=tol, atol=tol, err_msg=f"step {r1['step']} {k}")
    assert "eval/reward_mean" in two[-1] and two[-1]["eval/reward_mean"] == one[-1]["eval/reward_mean"]
    for r2, r1 in zip(two, one, strict=True):  # student work: split between the hosts, not repeated
        for what in ("calls", "prompts", "tokens"):
            print(
                f"step {r1['step']} student {what}: 1 process {r1[f'student_{what}/host0']:.0f}, "
                f"2 processes {r2[f'student_{what}/host0']:.0f} + {r2[f'student_{what}/host1']:.0f}"
            )
        assert r2["student_calls/host0"] == r2["student_calls/host1"] == r1["student_calls/host0"] > 0
        assert r2["student_prompts/host0"] == r2["student_prompts/host1"] == r1["student_prompts/host0"] / 2
        assert r2["student_tokens/host0"] + r2["student_tokens/host1"] == r1["student_tokens/host0"]
        assert "student_tokens/host1" not in r1
    samples = [(p / "run/samples/step_2.jsonl").read_text() for p in (tmp_path / "two", tmp_path / "one")]
    assert samples[0] and samples[0] == samples[1]
    worst = _check_same_params(tmp_path / "two/hf", tmp_path / "one/hf", Path(hf_folders["teacher"]), tol)
    print(f"GRPO 2 processes vs 1: max |Δparam| = {worst:.2e}")


@pytest.mark.multiprocess
def test_multihost_script_runs_local_processes(tmp_path):
    env = _child_env()
    proc = subprocess.run(
        ["bash", str(SCRIPT), "-n", "2", "--", sys.executable, str(WORKER), str(tmp_path), "--quick"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _check_data([dict(np.load(tmp_path / f"rank{i}.npz")) for i in range(2)])


def test_multihost_script_sets_each_process_env(tmp_path):
    code = "import os; print(os.environ['ATLAS_PROCESS_ID'], os.environ['ATLAS_NUM_PROCESSES'], os.environ['ATLAS_COORDINATOR'])"
    proc = subprocess.run(
        ["bash", str(SCRIPT), "-n", "3", "-p", "23456", "--", sys.executable, "-c", code],
        env=_child_env(), capture_output=True, text=True, timeout=100,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.splitlines()) == [f"[{i}] {i} 3 127.0.0.1:23456" for i in range(3)]
    proc = subprocess.run(
        ["bash", str(SCRIPT), "-n", "2", "-l", str(tmp_path / "logs"), "--", sys.executable, "-c", code],
        env=_child_env(), capture_output=True, text=True, timeout=100,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for i in range(2):
        assert (tmp_path / "logs" / f"process_{i}.log").read_text().startswith(f"{i} 2 127.0.0.1:")


def test_multihost_script_stops_all_when_one_fails():
    code = "import os, sys, time\nif os.environ['ATLAS_PROCESS_ID'] == '1': sys.exit(3)\ntime.sleep(120)\n"
    t0 = time.monotonic()
    proc = subprocess.run(
        ["bash", str(SCRIPT), "-n", "3", "--", sys.executable, "-c", code],
        env=_child_env(), capture_output=True, text=True, timeout=100,
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert time.monotonic() - t0 < 60, "the sleeping processes were not stopped"
    assert "exited with status 3" in proc.stderr


def test_multihost_script_rejects_bad_options():
    proc = subprocess.run(["bash", str(SCRIPT), "-n", "zero", "--", "true"], capture_output=True, text=True)
    assert proc.returncode == 2 and "-n must be a positive integer" in proc.stderr
    proc = subprocess.run(["bash", str(SCRIPT), "-n", "2"], capture_output=True, text=True)
    assert proc.returncode == 2 and "no command given" in proc.stderr


@pytest.fixture
def clean_env(monkeypatch):
    # Also hide cluster launchers, which would switch initialize() to JAX's auto-detection.
    for var in (*ATLAS_VARS, "SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "TPU_WORKER_HOSTNAMES",
                "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_single_process_is_a_noop(clean_env):
    settings = distributed.initialize()
    assert settings.mode == "single"
    assert not jax.distributed.is_initialized()
    assert (distributed.process_index(), distributed.process_count(), distributed.is_main_process()) == (
        0,
        1,
        True,
    )
    distributed.sync("no-op")  # must not block with one process


@pytest.mark.parametrize(
    ("kwargs", "env", "missing", "present"),
    [
        ({"num_processes": 2}, {}, ["ATLAS_COORDINATOR", "ATLAS_PROCESS_ID"], "num_processes=2"),
        (
            {},
            {"ATLAS_COORDINATOR": "10.0.0.1:1234"},
            ["ATLAS_NUM_PROCESSES", "ATLAS_PROCESS_ID"],
            "environment",
        ),
        ({"process_id": 1}, {"ATLAS_NUM_PROCESSES": "4"}, ["ATLAS_COORDINATOR"], "process_id=1"),
    ],
)
def test_partial_settings_name_what_is_missing(clean_env, kwargs, env, missing, present):
    for k, v in env.items():
        clean_env.setenv(k, v)
    with pytest.raises(ValueError, match="incomplete multi-host settings") as e:
        distributed.initialize(**kwargs)
    msg = str(e.value)
    for var in missing:
        assert var in msg
    assert present in msg
    assert not jax.distributed.is_initialized()


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"ATLAS_NUM_PROCESSES": "two"}, "ATLAS_NUM_PROCESSES.*integer.*'two'"),
        (
            {"ATLAS_COORDINATOR": "nohostport", "ATLAS_NUM_PROCESSES": "2", "ATLAS_PROCESS_ID": "0"},
            "host:port",
        ),
        (
            {"ATLAS_COORDINATOR": "h:1", "ATLAS_NUM_PROCESSES": "2", "ATLAS_PROCESS_ID": "2"},
            "process_id.*= 2",
        ),
        ({"ATLAS_DISTRIBUTED": "yes"}, "ATLAS_DISTRIBUTED='yes'"),
        ({"ATLAS_LOCAL_DEVICE_IDS": "0,x"}, "ATLAS_LOCAL_DEVICE_IDS"),
    ],
)
def test_malformed_settings_are_named(env, match):
    with pytest.raises(ValueError, match=match):
        distributed.resolve_settings(env=env)


def test_settings_resolution():
    full = {"ATLAS_COORDINATOR": "h:9", "ATLAS_NUM_PROCESSES": "2", "ATLAS_PROCESS_ID": "1"}
    s = distributed.resolve_settings(env=full)
    assert (s.mode, s.coordinator_address, s.num_processes, s.process_id) == ("explicit", "h:9", 2, 1)
    # Arguments win over the environment, field by field.
    s = distributed.resolve_settings(process_id=0, env=full)
    assert (s.process_id, s.num_processes) == (0, 2)
    assert distributed.resolve_settings(env={}).mode == "single"
    assert distributed.resolve_settings(env={**full, "ATLAS_DISTRIBUTED": "off"}).mode == "single"
    assert distributed.resolve_settings(num_processes=1, env={}).mode == "single"
    assert distributed.resolve_settings(env={"ATLAS_DISTRIBUTED": "auto"}).mode == "auto"
    ids = distributed.resolve_settings(env={**full, "ATLAS_LOCAL_DEVICE_IDS": "0, 2"}).local_device_ids
    assert ids == (0, 2)
    # Cluster launchers: JAX's detection takes over, and may complete partial settings.
    slurm = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "0"}
    assert distributed.resolve_settings(env=slurm).mode == "auto"
    assert distributed.resolve_settings(num_processes=4, env=slurm).mode == "auto"
    assert distributed.resolve_settings(env={**slurm, "SLURM_NTASKS": "1"}).mode == "single"
    assert distributed.resolve_settings(env={"TPU_WORKER_HOSTNAMES": "a,b"}).mode == "auto"
    assert distributed.resolve_settings(env={"TPU_WORKER_HOSTNAMES": "a"}).mode == "single"


def test_host_local_batch_single_process():
    from atlas_jax.models.sharding import make_mesh

    mesh = make_mesh((2, 2, 2))  # 8 fake devices, all local
    np.testing.assert_array_equal(distributed.host_local_batch(8, mesh), np.arange(8))
    with pytest.raises(ValueError, match="multiple of 4"):
        distributed.host_local_batch(6, mesh)
    batch = {"a": np.arange(16).reshape(8, 2), "b": np.arange(8.0)}
    out = distributed.shard_global_batch(batch, mesh)
    assert out["a"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
    back = distributed.gather_to_host(out)
    np.testing.assert_array_equal(back["a"], batch["a"])
    np.testing.assert_array_equal(back["b"], batch["b"])
    with pytest.raises(ValueError, match="different row counts"):
        distributed.shard_global_batch({"a": np.zeros((8, 1)), "b": np.zeros((4,))}, mesh)


def test_metrics_writer_off_the_main_process_touches_no_file(tmp_path):
    from atlas_jax.training.writers import MetricsWriter

    w = MetricsWriter(tmp_path / "run", enabled=False)
    assert w.write(3, {"loss": np.float32(0.5)}) == {"step": 3, "loss": 0.5}
    assert w.write_samples(3, [{"a": 1}]) == tmp_path / "run/samples/step_3.jsonl"
    w.close()
    assert not (tmp_path / "run").exists()
    w = MetricsWriter(tmp_path / "run", tensorboard=False)  # single process: the main one writes
    w.write(1, {"loss": 1.0})
    w.close()
    assert (tmp_path / "run/metrics.jsonl").read_text().count("\n") == 1


def test_initialize_after_jax_work_says_to_call_it_first(clean_env):
    jax.devices()  # the backend exists now, as after any computation
    with pytest.raises(RuntimeError, match="must run before any JAX computation"):
        distributed.initialize(coordinator_address=f"127.0.0.1:{_free_port()}", num_processes=2, process_id=0)
    assert not jax.distributed.is_initialized()
