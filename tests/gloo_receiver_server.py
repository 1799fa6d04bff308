"""A teacher server whose workers receive weights by broadcast — NCCL's protocol over gloo, for CPU tests.

``python tests/gloo_receiver_server.py MODEL_DIR PORT TOKEN`` serves ``server_app.create_app`` around a real
``VLLMEngine`` whose ``collective_rpc`` does what vLLM 0.32's worker-side NCCL weight-transfer engine does in
unpacked mode (``NCCLWeightTransferEngine.receive_weights``): ``init_weight_transfer_engine`` joins the
trainer's group at ``rank_offset`` (TCP rendezvous at ``master_address:master_port``), ``update_weights``
receives one broadcast from rank 0 per (name, dtype, shape) of the update info, in order, and
``finish_weight_update`` loads them. Only the transport differs (gloo on CPU instead of NCCL on GPUs), so the
trainer side (``engines/nccl_push.py``) and the server's ``/weight_transfer/*`` endpoints run for real.
"""

from __future__ import annotations

import datetime
import os
import sys
from typing import Any

import torch


class GlooGroup:
    """One member of a gloo group with the ``broadcast(tensor, src)`` of vLLM's ``PyNcclCommunicator``.

    A standalone ``ProcessGroupGloo`` over a ``TCPStore`` (rank 0 hosts it): no torch.distributed default
    group, which vLLM already holds in the server process.
    """

    def __init__(self, host: str, port: int, world_size: int, rank: int = 0) -> None:
        from torch._C._distributed_c10d import ProcessGroupGloo

        timeout = datetime.timedelta(seconds=120)
        self.store = torch.distributed.TCPStore(host, port, world_size, rank == 0, timeout=timeout)
        self.pg = ProcessGroupGloo(self.store, rank, world_size, timeout)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        from torch._C._distributed_c10d import BroadcastOptions

        opts = BroadcastOptions()
        opts.rootRank = src
        self.pg.broadcast([tensor], opts).wait()


class GlooReceiver:
    """Delegates to a ``VLLMEngine``; ``collective_rpc`` receives weights by gloo broadcast."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.received: list[tuple[str, torch.Tensor]] = []
        self.group: GlooGroup | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def collective_rpc(self, method: str, kwargs: dict[str, Any] | None = None) -> list[Any]:
        kwargs = kwargs or {}
        if method == "init_weight_transfer_engine":
            info = kwargs["init_info"]
            self.group = GlooGroup(
                info["master_address"],
                int(info["master_port"]),
                int(info["world_size"]),
                int(info["rank_offset"]),
            )
        elif method == "start_weight_update":
            self.received = []
        elif method == "update_weights":
            info = kwargs["update_info"]
            for name, dtype, shape in zip(info["names"], info["dtype_names"], info["shapes"], strict=True):
                t = torch.empty(shape, dtype=getattr(torch, dtype))
                self.group.broadcast(t, src=0)
                self.received.append((name, t))
        elif method == "finish_weight_update":
            self.engine.load_hf_tensors(dict(self.received))
        else:
            raise ValueError(f"unknown collective_rpc {method!r}")
        return [None]


def main(model_dir: str, port: int, token: str) -> None:
    import uvicorn

    from atlas_jax.engines.server_app import create_app
    from atlas_jax.engines.vllm_engine import VLLMEngine

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    engine = GlooReceiver(VLLMEngine(model_dir, max_model_len=256))
    uvicorn.run(
        create_app(engine, role="teacher", token=token), host="127.0.0.1", port=port, log_level="warning"
    )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
