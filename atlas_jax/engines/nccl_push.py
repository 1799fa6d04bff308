"""Trainer side of vLLM's NCCL weight transfer to ``atlas-serve --role=teacher`` servers (GPU clusters).

vLLM 0.32 (``vllm.distributed.weight_transfer``, servers started with ``weight_transfer_config={"backend":
"nccl"}``) joins every inference worker and the trainer into one NCCL group: the trainer is rank 0, server
``s``'s workers are ranks ``rank_offset_s … rank_offset_s + workers_s − 1``. Per update the trainer sends
the tensors' names, dtypes and shapes over HTTP (``/weight_transfer/update``, which blocks while the
workers receive) and broadcasts each tensor, in the same order, from rank 0; no weights cross HTTP.

* ``init_payloads`` / ``update_payload``: the JSON bodies, exactly vLLM's ``NCCLWeightTransferInitInfo``
  (unpacked, TCP-store rendezvous at ``address``) and ``NCCLWeightTransferUpdateInfo`` fields;
* ``NcclWeightPush.push(params)``: HF-named tensors from ``weight_sync.hf_tensors`` (on a GPU they stay on
  the device: JAX → torch by DLPack), the update request to every server on a side thread, and the
  broadcasts on the group from ``open_group(host, port, world_size)``. The default opens vLLM's own
  trainer endpoint (``nccl_common.trainer_init``: a ``PyNcclCommunicator`` on the current CUDA device);
  any object with ``broadcast(tensor, src=0)`` works (the CPU tests use a gloo group).
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Sequence
from typing import Any

from atlas_jax.engines import weight_sync
from atlas_jax.engines.server_client import ServerEngine


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not (sep and host and port.isdigit()):
        raise ValueError(f"--config.engine.nccl_address={address!r}: expected host:port")
    return host, int(port)


def init_payloads(address: str, workers_per_server: Sequence[int]) -> list[dict[str, Any]]:
    """``/weight_transfer/init`` bodies, one per server: its workers' ranks after the trainer's rank 0."""
    host, port = _split_address(address)
    world = 1 + sum(workers_per_server)
    offsets = [1 + sum(workers_per_server[:i]) for i in range(len(workers_per_server))]
    return [
        {
            "master_address": host,
            "master_port": port,
            "rank_offset": off,
            "world_size": world,
            "packed": False,
        }
        for off in offsets
    ]


def update_payload(tensors: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """``/weight_transfer/update`` body: names, torch dtype names and shapes, in broadcast order."""
    return {
        "names": [name for name, _ in tensors],
        "dtype_names": [str(t.dtype).removeprefix("torch.") for _, t in tensors],
        "shapes": [list(t.shape) for _, t in tensors],
    }


def _vllm_trainer_group(host: str, port: int, world_size: int) -> Any:
    from vllm.distributed.weight_transfer.nccl_common import trainer_init

    return trainer_init({"master_address": host, "master_port": port, "world_size": world_size})


class NcclWeightPush:
    """Pushes the policy to teacher servers by NCCL broadcast (the ``transfer`` of ``TeacherServers``).

    Args:
      urls: the servers (each joins with ``workers_per_server`` workers, default 1).
      address: "host:port" of the rendezvous rank 0 opens (reachable from the servers).
      model_config: the policy's ``ModelConfig``.
      workers_per_server: vLLM workers (tensor × pipeline parallel size) of each server.
      dtype: torch dtype the servers run (tensors are cast before sending); None keeps ours.
      open_group: ``(host, port, world_size) -> group`` with ``broadcast(tensor, src=0)``.
      **kw: ``ServerEngine`` options for the control requests (token, timeouts).
    """

    def __init__(
        self,
        urls: Sequence[str],
        address: str,
        *,
        model_config: Any,
        workers_per_server: Sequence[int] | None = None,
        dtype: Any = None,
        open_group: Callable[[str, int, int], Any] | None = None,
        **kw: Any,
    ) -> None:
        self.client = ServerEngine(urls, model_config=model_config, **kw)
        self.cfg, self.dtype = model_config, dtype
        self.workers = list(workers_per_server or [1] * len(self.client.urls))
        if len(self.workers) != len(self.client.urls):
            raise ValueError(
                f"workers_per_server has {len(self.workers)} entries for {len(self.client.urls)} servers"
            )
        self.address = address
        _split_address(address)
        self.open_group = open_group or _vllm_trainer_group
        self.group: Any = None

    def _post_all(self, path: str, bodies: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        headers = self.client._auth()
        with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
            futures = [
                pool.submit(self.client._request, url, "POST", path, json=body, headers=headers)
                for url, body in zip(self.client.urls, bodies, strict=True)
            ]
            return [f.result() for f in futures]

    def connect(self) -> None:
        """Joins the servers' workers into the group (they wait in the rendezvous while rank 0 opens it)."""
        host, port = _split_address(self.address)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(
                self._post_all, "/weight_transfer/init", init_payloads(self.address, self.workers)
            )
            self.group = self.open_group(host, port, 1 + sum(self.workers))
            pending.result()

    def push(self, params: Any) -> list[int]:
        """Sends ``params`` to every server; returns their new weight versions.

        Raises:
          converters.mapping.MappingError: params do not match ``model_config``.
          ServerError: a server refused or failed the update.
        """
        tensors = list(weight_sync.hf_tensors(weight_sync.flat_params(params), self.cfg, dtype=self.dtype))
        if self.group is None:
            self.connect()
        body = update_payload(tensors)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            # The servers' update requests block until every tensor has arrived by broadcast.
            pending = pool.submit(self._post_all, "/weight_transfer/update", [body] * len(self.client.urls))
            for _, t in tensors:
                self.group.broadcast(t.contiguous(), src=0)
            outs = pending.result()
        return [int(o["weight_version"]) for o in outs]

    def close(self) -> None:
        self.client.close()
