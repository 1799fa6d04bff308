"""Multi-host runs: ``jax.distributed`` initialisation and host-local data.

One Python process runs per host (per TPU VM, per SLURM task, or several on one machine for tests). All
processes run the same program; the mesh spans every device of every process (``jax.devices()``), and
each process only touches the shards that live on its own devices.

Settings, first match wins for each field::

    argument of initialize()   environment variable       meaning
    coordinator_address        ATLAS_COORDINATOR          "host:port" of process 0's coordinator service
    num_processes              ATLAS_NUM_PROCESSES        how many processes take part
    process_id                 ATLAS_PROCESS_ID           this process, 0 … num_processes − 1
    local_device_ids           ATLAS_LOCAL_DEVICE_IDS     optional, e.g. "0,1": devices this process uses

With none of them set the run is single-process (``initialize`` is a no-op) unless a cluster launcher is
detected (SLURM with more than one task, Open MPI, a TPU pod's worker list) or ``ATLAS_DISTRIBUTED=auto``
asks for it; then JAX's own cluster detection supplies the settings. ``ATLAS_DISTRIBUTED=off`` forces a
single process. Setting some but not all of the three main fields outside a detected cluster is an error
naming what is missing.

Data: every host runs the same data pipeline (same seed), so each knows the global batch; a host feeds
only the rows its devices hold (``host_local_batch``) and ``to_global_array`` assembles the global
``jax.Array`` from every host's rows. ``gather_to_host`` brings sharded results back to every host
(metrics, export); ``all_gather_objects`` exchanges small picklable host values (rollout summaries, cache
entries); ``sync`` is a named barrier; ``assert_same_on_all_hosts`` checks that host-side values every host
(or every host of a group of replicas) computed for itself agree.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import socket
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

ENV_COORDINATOR = "ATLAS_COORDINATOR"
ENV_NUM_PROCESSES = "ATLAS_NUM_PROCESSES"
ENV_PROCESS_ID = "ATLAS_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "ATLAS_LOCAL_DEVICE_IDS"
ENV_MODE = "ATLAS_DISTRIBUTED"
ENV_INIT_TIMEOUT = "ATLAS_INIT_TIMEOUT_S"
BATCH_AXES = ("data", "fsdp")

Mode = Literal["single", "explicit", "auto"]


@dataclasses.dataclass(frozen=True)
class Settings:
    """Resolved multi-host settings.

    Attributes:
      mode: "single" (no ``jax.distributed``), "explicit" (all settings known) or "auto" (JAX's cluster
        detection fills what is not given).
      coordinator_address: "host:port" of the coordinator (process 0), or None.
      num_processes: number of processes, or None (auto).
      process_id: this process's index, or None (auto).
      local_device_ids: local devices this process uses, or None (all).
      reason: where the settings came from, for logs and error messages.
    """

    mode: Mode
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    reason: str = ""


_FIELDS = {
    "coordinator_address": ENV_COORDINATOR,
    "num_processes": ENV_NUM_PROCESSES,
    "process_id": ENV_PROCESS_ID,
}


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    try:
        return int(env.get(name, "") or default)
    except ValueError:
        return default


def detect_cluster(env: Mapping[str, str]) -> str | None:
    """Name of a multi-process launcher visible in ``env`` (one JAX can auto-configure from), else None.

    Only cheap environment checks: SLURM with more than one task, Open MPI (``mpirun``), a TPU pod whose
    worker list names more than one host. A GCE TPU pod that exposes its workers only through the metadata
    server is not seen here: set ``ATLAS_DISTRIBUTED=auto`` there.
    """
    slurm_tasks = _env_int(env, "SLURM_STEP_NUM_TASKS", _env_int(env, "SLURM_NTASKS", 1))
    if "SLURM_JOB_ID" in env and slurm_tasks > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env and _env_int(env, "OMPI_COMM_WORLD_SIZE", 1) > 1:
        return "openmpi"
    hosts = env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES") or ""
    if len([h for h in hosts.split(",") if h.strip()]) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu-pod"
    return None


def _read_fields(given: dict[str, Any], env: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Fills unset fields from the environment; returns ``(values, source of each set value)``."""
    values, source = dict(given), {k: "argument" for k, v in given.items() if v is not None}
    for arg, var in _FIELDS.items():
        if values[arg] is None and env.get(var, "").strip():
            values[arg], source[arg] = env[var].strip(), "environment variable"
    for arg in ("num_processes", "process_id"):
        if values[arg] is not None:
            try:
                values[arg] = int(values[arg])
            except (TypeError, ValueError):
                raise ValueError(
                    f"{arg} ({source[arg]} {_FIELDS[arg]}) must be an integer, got {values[arg]!r}"
                ) from None
    return values, source


def _check_values(n: int | None, pid: int | None, coord: str | None) -> None:
    if n is not None and n < 1:
        raise ValueError(f"num_processes ({ENV_NUM_PROCESSES}) must be >= 1, got {n}")
    if pid is not None and (pid < 0 or (n is not None and pid >= n)):
        raise ValueError(
            f"process_id ({ENV_PROCESS_ID}) = {pid} is outside 0 … num_processes − 1 "
            f"(num_processes = {n if n is not None else 'unset'})"
        )
    if coord is not None and not _valid_address(coord):
        raise ValueError(
            f"coordinator_address ({ENV_COORDINATOR}) = {coord!r}: expected 'host:port' with a port 1-65535"
        )


def _local_ids(ids: Sequence[int] | None, env: Mapping[str, str]) -> tuple[int, ...] | None:
    if ids is None and env.get(ENV_LOCAL_DEVICE_IDS, "").strip():
        try:
            ids = [int(x) for x in env[ENV_LOCAL_DEVICE_IDS].split(",") if x.strip()]
        except ValueError:
            raise ValueError(
                f"{ENV_LOCAL_DEVICE_IDS}={env[ENV_LOCAL_DEVICE_IDS]!r}: expected comma-separated device ids"
            ) from None
    return tuple(int(i) for i in ids) if ids is not None else None


def resolve_settings(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Combines arguments, ``ATLAS_*`` variables and cluster detection (see the module docstring).

    Raises:
      ValueError: some but not all of coordinator / process count / process id are given (outside a
        detected cluster), a value is malformed, or ``process_id`` is out of range. The message names both
        the argument and its environment variable.
    """
    env = os.environ if env is None else env
    given = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    values, source = _read_fields(given, env)
    coord, n, pid = values["coordinator_address"], values["num_processes"], values["process_id"]
    ids = _local_ids(local_device_ids, env)
    mode_flag = env.get(ENV_MODE, "").strip().lower()
    if mode_flag not in ("", "auto", "off"):
        raise ValueError(f"{ENV_MODE}={env[ENV_MODE]!r}: expected 'auto', 'off' or unset")
    if mode_flag == "off":
        return Settings("single", reason=f"{ENV_MODE}=off")
    _check_values(n, pid, coord)

    cluster = "ATLAS_DISTRIBUTED=auto" if mode_flag == "auto" else detect_cluster(env)
    set_fields = [k for k in _FIELDS if values[k] is not None]
    if not set_fields:
        if cluster:
            return Settings("auto", local_device_ids=ids, reason=f"auto-detect ({cluster})")
        return Settings("single", reason="no multi-host settings")
    if n == 1 and coord is None:
        return Settings("single", reason="num_processes = 1")
    if len(set_fields) == len(_FIELDS):
        reason = ", ".join(f"{k} from {source[k]}" for k in _FIELDS)
        return Settings("explicit", coord, n, pid, ids, reason=reason)
    if cluster:
        return Settings("auto", coord, n, pid, ids, reason=f"partial settings completed by {cluster}")
    missing = [f"{k} (or {_FIELDS[k]})" for k in _FIELDS if values[k] is None]
    have = [f"{k}={values[k]!r} (from {source[k]})" for k in set_fields]
    raise ValueError(
        "incomplete multi-host settings: have " + ", ".join(have) + "; missing " + ", ".join(missing) + ". "
        f"Set all three of {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID} (or the arguments), "
        f"none of them for a single process, or {ENV_MODE}=auto on a cluster JAX can detect."
    )


def _valid_address(address: str) -> bool:
    host, sep, port = address.rpartition(":")
    return bool(sep and host and port.isdigit() and 1 <= int(port) <= 65535)


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
    *,
    initialization_timeout: int | None = None,
) -> Settings:
    """Joins this process to the multi-host run (a no-op for a single process). Call before any JAX work.

    On CPU, cross-process collectives need an implementation: gloo is selected unless the user already
    chose one (``jax_cpu_collectives_implementation``). Calling again after a successful initialisation
    returns the settings without re-initialising.

    ``initialization_timeout`` (default: env ``ATLAS_INIT_TIMEOUT_S``, else 300 s) bounds how long a
    process waits for the coordinator and for every other process to join.

    Returns:
      The resolved `Settings`.

    Raises:
      ValueError: incomplete or malformed settings (see `resolve_settings`).
      RuntimeError: JAX already ran a computation in this process (the backend exists, too late to join),
        or the coordinator / the other processes could not be reached within the timeout (the message
        names the coordinator address).
    """
    settings = resolve_settings(coordinator_address, num_processes, process_id, local_device_ids)
    if settings.mode == "single" or jax.distributed.is_initialized():
        return settings
    if initialization_timeout is None:
        raw = os.environ.get(ENV_INIT_TIMEOUT, "").strip() or "300"
        try:
            initialization_timeout = int(float(raw))
        except ValueError:
            raise ValueError(f"{ENV_INIT_TIMEOUT}={raw!r}: expected a number of seconds") from None
    if jax.config.jax_cpu_collectives_implementation in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if settings.mode == "explicit" and settings.process_id != 0:
        # jaxlib aborts the process (no Python error) when the coordinator never answers: check first.
        _wait_for_coordinator(settings, initialization_timeout)
    watchdog = threading.Timer(initialization_timeout, _warn_not_joined, (settings, initialization_timeout))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(
            coordinator_address=settings.coordinator_address,
            num_processes=settings.num_processes,
            process_id=settings.process_id,
            local_device_ids=list(settings.local_device_ids)
            if settings.local_device_ids is not None
            else None,
            # Complete explicit settings must not be mixed with a half-visible cluster environment.
            cluster_detection_method="deactivate" if settings.mode == "explicit" else None,
            initialization_timeout=initialization_timeout,
        )
    except RuntimeError as e:
        if "before" in str(e) or "already" in str(e):
            raise RuntimeError(
                "atlas_jax.distributed.initialize() must run before any JAX computation in this process "
                f"(call it first thing in main; settings: {settings.reason}): {e}"
            ) from e
        raise _unreachable(settings, initialization_timeout, e) from e
    except Exception as e:  # jaxlib raises its own XlaRuntimeError types for a missing coordinator
        raise _unreachable(settings, initialization_timeout, e) from e
    finally:
        watchdog.cancel()
    if settings.num_processes is not None and jax.process_count() != settings.num_processes:
        raise RuntimeError(
            f"joined a run of {jax.process_count()} processes, expected {settings.num_processes} ({settings.reason})"
        )
    return settings


def _wait_for_coordinator(settings: Settings, timeout: float) -> None:
    """Returns once the coordinator's port accepts a TCP connection; RuntimeError after ``timeout`` s."""
    host, _, port = str(settings.coordinator_address).rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=min(2.0, max(timeout, 0.1))):
                return
        except OSError as e:
            if time.monotonic() > deadline:
                raise _unreachable(settings, int(timeout), e) from e
            time.sleep(0.5)


def _warn_not_joined(settings: Settings, timeout: int) -> None:
    """Printed when joining takes longer than the timeout (jaxlib then aborts the process)."""
    print(
        f"atlas_jax.distributed: process {settings.process_id} waited {timeout} s ({ENV_INIT_TIMEOUT}) for "
        f"all {settings.num_processes or '?'} processes at coordinator {settings.coordinator_address}; "
        "a process did not start or cannot reach the coordinator. Stopping.",
        file=sys.stderr,
        flush=True,
    )


def _unreachable(settings: Settings, timeout: int, e: Exception) -> RuntimeError:
    return RuntimeError(
        f"process {settings.process_id} could not join the run at coordinator "
        f"{settings.coordinator_address or '(auto-detected)'} within {timeout} s ({ENV_INIT_TIMEOUT}): is "
        f"process 0 running and the address reachable from here, and did all {settings.num_processes or '?'} "
        f"processes start? ({type(e).__name__}: {str(e)[:300]})"
    )


def process_index() -> int:
    """This process's index (0 on a single host)."""
    return jax.process_index()


def process_count() -> int:
    """Number of processes in the run (1 on a single host)."""
    return jax.process_count()


def is_main_process() -> bool:
    """True on process 0: the one that writes logs, exports and other single-writer files."""
    return jax.process_index() == 0


def _row_sharding(mesh: Mesh, batch_axes: Sequence[str]) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(tuple(batch_axes)))


def host_local_batch(
    global_batch_rows: int, mesh: Mesh, batch_axes: Sequence[str] = BATCH_AXES
) -> np.ndarray:
    """Indices of the global batch rows this host feeds, in the order ``to_global_array`` expects.

    With the batch dimension split over ``batch_axes`` of ``mesh``, each device holds a block of rows;
    the host feeds the union of its devices' blocks (ascending). Hosts that are replicas along the batch
    axes get the same rows.

    Raises:
      ValueError: ``global_batch_rows`` is not divisible by the batch-axes size of the mesh.
    """
    size = int(np.prod([mesh.shape[a] for a in batch_axes]))
    if global_batch_rows < 1 or global_batch_rows % size:
        raise ValueError(
            f"global batch of {global_batch_rows} rows does not split over mesh axes {tuple(batch_axes)} "
            f"of total size {size}: use a multiple of {size}"
        )
    index_map = _row_sharding(mesh, batch_axes).addressable_devices_indices_map((global_batch_rows,))
    starts = sorted({(idx[0].start or 0, idx[0].stop or global_batch_rows) for idx in index_map.values()})
    return np.concatenate([np.arange(a, b) for a, b in starts])


def to_global_array(
    local: Any,
    mesh: Mesh,
    pspec: PartitionSpec | None = None,
    *,
    global_rows: int | None = None,
) -> Any:
    """Global ``jax.Array``(s) from this host's rows (a numpy array or a pytree of them).

    Args:
      local: this host's rows (``global[host_local_batch(...)]``) for every leaf.
      mesh: the global mesh.
      pspec: the arrays' PartitionSpec; default: rows over ("data", "fsdp"), everything else replicated.
      global_rows: the global leading size; default inferred by JAX from the local size and the sharding.
    """
    sharding = NamedSharding(mesh, pspec if pspec is not None else PartitionSpec(BATCH_AXES))

    def one(x):
        x = np.asarray(x)
        shape = None if global_rows is None else (global_rows, *x.shape[1:])
        return jax.make_array_from_process_local_data(sharding, x, shape)

    return jax.tree.map(one, local)


def shard_global_batch(batch: Any, mesh: Mesh, batch_axes: Sequence[str] = BATCH_AXES) -> Any:
    """A pytree of global numpy rows that *every* host holds → global arrays, each host feeding its rows.

    Use it where a single-host loop would pass numpy to a jitted step (``jit`` refuses numpy for arrays
    that span hosts). All leaves must share the leading (row) size.
    """
    leaves = jax.tree.leaves(batch)
    rows = {int(np.shape(x)[0]) for x in leaves}
    if len(rows) != 1:
        raise ValueError(f"batch leaves have different row counts {sorted(rows)}; expected one leading size")
    (n,) = rows
    idx = host_local_batch(n, mesh, batch_axes)  # also checks that the rows split over the mesh
    if jax.process_count() == 1:  # every row is local: one transfer, no host-side copy
        return jax.device_put(batch, _row_sharding(mesh, batch_axes))
    local = jax.tree.map(lambda x: np.asarray(x)[idx], batch)
    return to_global_array(local, mesh, PartitionSpec(tuple(batch_axes)), global_rows=n)


def gather_to_host(tree: Any) -> Any:
    """Numpy copies of a pytree of (possibly cross-host sharded) arrays, on every process.

    Arrays that span other hosts are all-gathered (``multihost_utils.process_allgather``, a collective:
    every process must call this with the same tree); everything else is fetched locally.
    """
    leaves, treedef = jax.tree.flatten(tree)
    remote = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array) and not x.is_fully_addressable]
    remote_set = set(remote)
    local = [i for i in range(len(leaves)) if i not in remote_set]
    out: list[Any] = [None] * len(leaves)
    # One device_get for all local leaves: their transfers overlap (as a single-host loop would do).
    for i, x in zip(local, jax.device_get([leaves[i] for i in local]), strict=True):
        out[i] = np.asarray(x)
    if remote:
        gathered = multihost_utils.process_allgather([leaves[i] for i in remote], tiled=True)
        for i, g in zip(remote, gathered, strict=True):
            out[i] = np.asarray(g)
    return jax.tree.unflatten(treedef, out)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj`` (any picklable value), in process order, on every process (a collective).

    Two all-gathers: the pickled sizes, then the bytes padded to the largest. Meant for small host values
    (rollout summaries, baseline-cache entries, token-id prompts), not for arrays that live on devices.
    """
    if jax.process_count() == 1:
        return [obj]
    data = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([data.size], np.int64))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [pickle.loads(rows[p, : int(n)].tobytes()) for p, n in enumerate(sizes)]


def assert_same_on_all_hosts(tree: Any, what: str, group: int = 0) -> None:
    """Checks that processes of the same ``group`` hold the same host values (a collective; no-op on one host).

    Compares a SHA-256 of every leaf's dtype, shape and bytes (32 bytes per process are exchanged), so
    the cost is one pass over the data, not a gather of it. With the default (every process in group 0)
    all processes must agree; per-host rollouts pass their share index, so only hosts that computed the
    same share (replicas along the batch axes) are compared.

    Raises:
      RuntimeError: on every process, when some process's ``tree`` differs from the first process of
        its group; names ``what`` and the differing processes.
    """
    if jax.process_count() == 1:
        return
    h = hashlib.sha256()
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        x = np.ascontiguousarray(x)
        h.update(f"{jax.tree_util.keystr(path)}|{x.dtype}|{x.shape}|".encode())
        h.update(x.tobytes())
    mine = np.concatenate(
        [np.frombuffer(h.digest(), np.uint8), np.frombuffer(np.int64(group).tobytes(), np.uint8)]
    )
    rows = np.asarray(multihost_utils.process_allgather(mine))
    digests, groups = rows[:, :32], rows[:, 32:].copy().view(np.int64).reshape(-1)
    first = {int(g): int(np.flatnonzero(groups == g)[0]) for g in np.unique(groups)}
    differ = [p for p in range(len(rows)) if not np.array_equal(digests[p], digests[first[int(groups[p])]])]
    if differ:
        leads = sorted({first[int(groups[p])] for p in differ})
        raise RuntimeError(
            f"{what} differs between process(es) {leads} and process(es) {differ}: every host must compute "
            "the same values here (same data, seeds and deterministic engines)"
        )


def sync(name: str) -> None:
    """Barrier: returns once every process reached ``sync(name)`` (same name everywhere); no-op on one host."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
