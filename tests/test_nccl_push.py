"""The trainer side of vLLM's NCCL weight transfer, as far as a CPU allows.

NCCL itself needs GPUs; here the control payloads are built from real parameters of a tiny model and
parsed by vLLM 0.32's own dataclasses (``NCCLWeightTransferInitInfo`` / ``NCCLWeightTransferUpdateInfo``),
the tensor list is checked against the transformers model (names, shapes, dtypes, values, in order), and
the whole push — ``TeacherServers`` → ``NcclWeightPush`` → the server's ``/weight_transfer/*`` → worker-side
receive by broadcast → loaded into a real vLLM — runs with gloo standing in for NCCL
(``tests/gloo_receiver_server.py``), checked by the server's greedy tokens and log-probs.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_helpers import make_hf_dir

from atlas_jax.engines import weight_sync
from atlas_jax.engines.nccl_push import NcclWeightPush, init_payloads, update_payload
from atlas_jax.models.config import ModelConfig
from converters import mapping
from converters.safetensors_io import SafetensorsFolder


def test_init_payloads_give_each_server_its_ranks():
    out = init_payloads("10.0.0.1:29600", [1, 2, 4])
    assert [p["rank_offset"] for p in out] == [1, 2, 4]  # rank 0 is the trainer
    assert {p["world_size"] for p in out} == {8}
    assert all(
        p["master_address"] == "10.0.0.1" and p["master_port"] == 29600 and not p["packed"] for p in out
    )
    with pytest.raises(ValueError, match="nccl_address='nohost': expected host:port"):
        init_payloads("nohost", [1])
    with pytest.raises(ValueError, match="workers_per_server has 2 entries for 1 servers"):
        NcclWeightPush(["http://127.0.0.1:1"], "h:1", model_config=None, workers_per_server=[1, 1])


@pytest.mark.vllm
def test_payloads_parse_as_vllm_info_and_match_the_hf_model(tmp_path):
    from transformers import AutoModelForCausalLM
    from vllm.distributed.weight_transfer.nccl_common import NCCLWeightTransferInitInfo
    from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferUpdateInfo

    d = make_hf_dir(tmp_path / "m", tied=False)
    cfg = ModelConfig.from_hf(d / "config.json")
    folder = SafetensorsFolder(d)
    try:
        flat = mapping.hf_to_flat(folder, cfg)  # our layout
    finally:
        folder.close()
    tensors = list(weight_sync.hf_tensors(flat, cfg, dtype=torch.bfloat16))
    body = update_payload(tensors)
    info = NCCLWeightTransferUpdateInfo(**body)
    for p in init_payloads("127.0.0.1:29600", [1]):
        NCCLWeightTransferInitInfo(**p)
    hf = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).state_dict()
    assert sorted(info.names) == sorted(hf)
    assert set(info.dtype_names) == {"bfloat16"}
    for name, shape, (_, t) in zip(info.names, info.shapes, tensors, strict=True):
        assert shape == list(hf[name].shape), name
        np.testing.assert_allclose(
            t.float().numpy(), hf[name].to(torch.bfloat16).float().numpy(), err_msg=name
        )


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.multiprocess
def test_push_by_broadcast_reaches_a_real_server(tmp_path):
    """NcclWeightPush + TeacherServers against a real server whose workers receive by (gloo) broadcast."""
    import sys

    from engine_helpers import HFReference, free_port, perturbed_state
    from gloo_receiver_server import GlooGroup

    from atlas_jax.engines.base import SamplingParams
    from atlas_jax.engines.server_client import ServerEngine
    from atlas_jax.engines.teacher_servers import TeacherServers
    from launch import processes

    d = make_hf_dir(tmp_path / "m", tied=True)
    cfg = ModelConfig.from_hf(d / "config.json")
    port, token = free_port(), "gloo-token"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    server = processes.start(
        "gloo_server", [sys.executable, str(Path(__file__).parent / "gloo_receiver_server.py"), str(d), str(port), token],
        tmp_path, env,
    )  # fmt: skip
    server.url = f"http://127.0.0.1:{port}"
    try:
        processes.wait_healthy([server], 600)
        push = NcclWeightPush(
            [server.url], f"127.0.0.1:{free_port()}", model_config=cfg, token=token, open_group=GlooGroup
        )
        engine = TeacherServers([server.url], model_config=cfg, token=token, transfer=push, wait_s=60)
        state = perturbed_state(d, seed=3)
        assert engine.update_weights(mapping.hf_to_flat(state, cfg)) == [1]  # version waited for
        ref = HFReference(d)
        ref.load(state)
        prompt = [5, 17, 42, 100, 7]
        with ServerEngine([server.url]) as client:
            [[c]] = client.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8))
        assert c.token_ids == ref.greedy(prompt, len(c.token_ids))
        np.testing.assert_allclose(c.logprobs, ref.logprobs(prompt, c.token_ids), atol=1e-4, rtol=0)
        engine.close()
        push.close()
    finally:
        processes.stop([server])
