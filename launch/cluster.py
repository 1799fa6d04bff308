"""Run a trainer with its generation servers: ``python -m launch.cluster [flags] -- --config=... [...]``.

On this host it starts ``--teacher_servers`` / ``--student_servers`` ``atlas-serve`` processes, waits until
each answers ``/health``, then starts ``--num_processes`` trainer processes (``python -m launch.train``
with the arguments after ``--``, joined by ``ATLAS_COORDINATOR`` / ``ATLAS_NUM_PROCESSES`` /
``ATLAS_PROCESS_ID``) pointed at the servers (``--config.engine.teacher=vllm_server
--config.engine.teacher_url=…``, ``--config.engine.student=vllm_server --config.engine.student_url=…``).
When the trainers exit (or one fails, or the launcher is interrupted) it stops the processes it started,
and only those. ``--print_commands`` prints the per-host commands of a multi-host run instead
(``--hosts=h0,h1,…``; servers on ``--server_host``) and starts nothing.

    python -m launch.cluster --num_processes=2 --teacher_model=HF_DIR --teacher_servers=1 \
        -- --config=configs/run/teacher_rcl.py --config.model.teacher=HF_DIR
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
from pathlib import Path

from absl import app, flags

from launch import processes

_N = flags.DEFINE_integer("num_processes", 1, "Trainer processes to start on this host.")
_DEVICES = flags.DEFINE_integer(
    "cpu_devices", 0, "Fake CPU devices per trainer process (0: leave XLA_FLAGS)."
)
_TEACHER = flags.DEFINE_string("teacher_model", "", "HF folder the teacher servers start from.")
_N_TEACHER = flags.DEFINE_integer("teacher_servers", 0, "atlas-serve --role=teacher processes to start.")
_STUDENT = flags.DEFINE_string("student_model", "", "HF folder of the student servers.")
_N_STUDENT = flags.DEFINE_integer("student_servers", 0, "atlas-serve --role=student processes to start.")
_SERVER_ARGS = flags.DEFINE_string("server_args", "", "Extra atlas-serve flags, e.g. '--dtype=bfloat16'.")
_SERVER_GPUS = flags.DEFINE_list("server_gpus", [], "CUDA_VISIBLE_DEVICES of each server, in start order.")
_TRAINER_GPUS = flags.DEFINE_string("trainer_gpus", "", "CUDA_VISIBLE_DEVICES of the trainer processes.")
_HOST = flags.DEFINE_string("server_host", "127.0.0.1", "Address the servers bind and trainers use.")
_WAIT = flags.DEFINE_float("wait_s", 300.0, "Seconds to wait for every server's /health.")
_LOGS = flags.DEFINE_string("logs", "", "Folder of one log per process (default: <tmp>/atlas-cluster-<pid>).")
_PRINT = flags.DEFINE_bool("print_commands", False, "Print the per-host commands and exit.")
_HOSTS = flags.DEFINE_list("hosts", [], "--print_commands: trainer hosts (rank 0 first).")
_PORT = flags.DEFINE_integer("coordinator_port", 0, "Coordinator port on rank 0 (0: a free one).")
_BASE_PORT = flags.DEFINE_integer("server_port", 0, "First server port (0: free ports).")


def _server_plan(n_teacher: int, n_student: int) -> list[tuple[str, str, int]]:
    """``(role, model, port)`` of each server to start."""
    plan = [("teacher", _TEACHER.value, 0)] * n_teacher + [("student", _STUDENT.value, 0)] * n_student
    for role, model, _ in plan:
        if not model:
            raise app.UsageError(f"--{role}_servers needs --{role}_model")
    ports = [
        _BASE_PORT.value + i if _BASE_PORT.value else processes.free_port(_HOST.value)
        for i in range(len(plan))
    ]
    return [(role, model, port) for (role, model, _), port in zip(plan, ports, strict=True)]


def _engine_args(plan: list[tuple[str, str, int]]) -> list[str]:
    args = []
    for role in ("teacher", "student"):
        urls = [f"http://{_HOST.value}:{port}" for r, _, port in plan if r == role]
        if urls:
            args += [f"--config.engine.{role}=vllm_server", f"--config.engine.{role}_url={','.join(urls)}"]
    return args


def _print_commands(plan, train_args: list[str]) -> None:
    hosts = _HOSTS.value or ["localhost"]
    port = _PORT.value or 12355
    for role, model, p in plan:
        cmd = processes.server_argv(model, role, p, "0.0.0.0", shlex.split(_SERVER_ARGS.value))
        print(f"# on {_HOST.value} ({role} server):\n{shlex.join(['python', *cmd[1:]])}")
    for rank, host in enumerate(hosts):
        env = f"ATLAS_COORDINATOR={hosts[0]}:{port} ATLAS_NUM_PROCESSES={len(hosts)} ATLAS_PROCESS_ID={rank}"
        print(
            f"# on {host} (trainer rank {rank}):\n{env} {shlex.join(['python', '-m', 'launch.train', *train_args])}"
        )


def main(argv: list[str]) -> None:
    train_args = argv[1:]
    if not any(a.startswith("--config=") for a in train_args):
        raise app.UsageError("give the trainer's flags after --, e.g. -- --config=configs/run/teacher_rcl.py")
    plan = _server_plan(_N_TEACHER.value, _N_STUDENT.value)
    train_args = train_args + _engine_args(plan)
    if _PRINT.value:
        _print_commands(plan, train_args)
        return
    # SIGTERM (e.g. a scheduler's stop) unwinds like Ctrl-C, so the finally below stops what was started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    log_dir = Path(_LOGS.value or Path(os.environ.get("TMPDIR", "/tmp")) / f"atlas-cluster-{os.getpid()}")
    started: list[processes.Started] = []
    try:
        servers = []
        for i, (role, model, port) in enumerate(plan):
            env = dict(os.environ)
            if i < len(_SERVER_GPUS.value):
                env["CUDA_VISIBLE_DEVICES"] = _SERVER_GPUS.value[i]
            argv_i = processes.server_argv(model, role, port, _HOST.value, shlex.split(_SERVER_ARGS.value))
            s = processes.start(f"{role}_server_{i}", argv_i, log_dir, env)
            s.url = f"http://{_HOST.value}:{port}"
            started.append(s)
            servers.append(s)
        processes.wait_healthy(servers, _WAIT.value)
        for s in servers:
            print(f"launch.cluster: {s.name} healthy at {s.url}", flush=True)
        port = _PORT.value or processes.free_port()
        trainers = []
        for rank in range(_N.value):
            env = dict(os.environ)
            if _N.value > 1:
                env.update(ATLAS_COORDINATOR=f"127.0.0.1:{port}", ATLAS_NUM_PROCESSES=str(_N.value),
                           ATLAS_PROCESS_ID=str(rank))  # fmt: skip
            if _DEVICES.value:
                env["XLA_FLAGS"] = (
                    f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={_DEVICES.value}"
                )
            if _TRAINER_GPUS.value:
                env["CUDA_VISIBLE_DEVICES"] = _TRAINER_GPUS.value
            t = processes.start(
                f"trainer_{rank}", [sys.executable, "-m", "launch.train", *train_args], log_dir, env
            )
            started.append(t)
            trainers.append(t)
        print(
            f"launch.cluster: {len(servers)} server(s), {len(trainers)} trainer(s); logs in {log_dir}",
            flush=True,
        )
        rc = processes.wait_all(trainers)
        if rc:
            failed = next(t for t in trainers if t.proc.returncode == rc)
            print(f"--- {failed.name} log tail:\n{failed.tail()}", file=sys.stderr)
            sys.exit(rc)
    finally:
        processes.stop(started)


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
