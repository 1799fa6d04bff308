"""The engine factory: known kinds map to real classes; unknown kinds fail with the list."""

import pytest

from atlas_jax.engines.base import Engine
from atlas_jax.engines.factory import ENGINE_KINDS, engine_class, make_engine


@pytest.mark.slow
def test_factory_builds_a_jax_student():
    from protocol_helpers import hf_config_dict, make_tokenizer

    from atlas_jax.engines.jax_sampler import JaxSampler
    from atlas_jax.models.config import ModelConfig
    from atlas_jax.models.params import build_model

    tok = make_tokenizer()
    engine = make_engine("jax", build_model(ModelConfig.from_hf(hf_config_dict(tok))), tok)
    assert isinstance(engine, JaxSampler) and isinstance(engine, Engine)
    assert engine.tokenizer is tok


def test_factory_kinds_and_errors():
    assert set(ENGINE_KINDS) == {"jax", "vllm", "vllm_server", "openai"}
    from atlas_jax.engines.server_client import ServerEngine

    assert engine_class("vllm_server") is ServerEngine
    with pytest.raises(ValueError, match=r"unknown engine kind 'tpu'.*jax.*vllm"):
        make_engine("tpu")
