"""The embedded JAX sampler against transformers on a tiny random Qwen3 (hidden 64, 2x32 heads, 1 kv head).

References are independent of the code under test: HF ``generate`` for greedy tokens and an HF full forward
(torch, fp32) for log-probabilities. Tolerances: tokens exact, log-probs 1e-4 (fp32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from atlas_jax.engines.base import SamplingParams
from atlas_jax.engines.jax_sampler import (
    JaxSampler,
    bucket,
    compiled_programs,
    cut_at_stop_string,
    tokens_before,
)
from atlas_jax.models.config import ModelConfig
from atlas_jax.models.params import build_model
from atlas_jax.models.sharding import make_mesh
from converters.mapping import hf_to_flat

CORPUS = [
    "the teacher explains each step so the student can solve the problem",
    "two plus two is four and three times three is nine",
    "<teaching> check the units first </teaching> the answer is 42",
] * 20
PROMPTS = ["the teacher explains", "two plus two is four and three times", "<teaching>"]


def _tokenizer() -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    # No EOS: random tiny models would stop at random points and the parity runs want full lengths.
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok)


def _random_hf(seed: int) -> transformers.PreTrainedModel:
    """The tiny Qwen3 with large random weights (peaked distributions: no near-ties in greedy decoding)."""
    config = transformers.Qwen3Config(
        vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(
                1.0 + 0.2 * torch.randn_like(p)
                if name.endswith("norm.weight")
                else 0.15 * torch.randn_like(p)
            )
    return hf


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(hf_model, tokenizer, cfg, flat params)."""
    hf = _random_hf(0)
    d = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(str(d))
    cfg = ModelConfig.from_hf(d)
    flat = hf_to_flat({k: v.numpy() for k, v in hf.state_dict().items()}, cfg)
    return hf, _tokenizer(), cfg, flat


@pytest.fixture(scope="module")
def engine(setup):
    _, tok, cfg, flat = setup
    return JaxSampler(build_model(cfg, flat), tok)


def _hf_greedy(hf, tok, prompts, max_new):
    """HF generate on a left-padded batch; returns the new token ids per prompt."""
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    t = max(map(len, ids))
    input_ids = torch.tensor([[0] * (t - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (t - len(x)) + [1] * len(x) for x in ids])
    out = hf.generate(
        input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new,
        do_sample=False, pad_token_id=0,
    )  # fmt: skip
    return out[:, t:].tolist()


def _hf_logprobs(hf, prompt_ids, new_ids, temperature):
    """log softmax(logits / T) of an HF full forward at the completion tokens."""
    full = torch.tensor([prompt_ids + new_ids])
    with torch.no_grad():
        logits = hf(input_ids=full).logits[0].double() / temperature
    lp = torch.log_softmax(logits, -1)
    pos = torch.arange(len(prompt_ids) - 1, len(prompt_ids) + len(new_ids) - 1)
    return lp[pos, torch.tensor(new_ids)].numpy()


def test_bucket():
    assert [bucket(x, 16) for x in (1, 16, 17, 100)] == [16, 16, 32, 128]
    assert [bucket(x, 1) for x in (1, 2, 3, 5)] == [1, 2, 4, 8]


def test_greedy_matches_hf_generate_on_left_padded_batch(setup, engine):
    hf, tok, _, _ = setup
    want = _hf_greedy(hf, tok, PROMPTS, 20)
    got = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=20))
    assert [c[0].token_ids for c in got] == want
    for p, c in zip(PROMPTS, got, strict=True):
        assert c[0].prompt_ids == tok(p, add_special_tokens=False)["input_ids"]
        assert c[0].finish_reason == "length"
        assert c[0].text == tok.decode(c[0].token_ids)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_logprobs_equal_full_forward_log_softmax(setup, engine, temperature):
    hf, _, _, _ = setup
    out = engine.generate(PROMPTS, SamplingParams(temperature=temperature, max_tokens=12, seed=3), n=2)
    for row in out:
        for c in row:
            ref = _hf_logprobs(hf, c.prompt_ids, c.token_ids, temperature or 1.0)
            np.testing.assert_allclose(c.logprobs, ref, atol=1e-4)


def test_top_k_one_is_greedy(engine):
    greedy = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=10))
    topk1 = engine.generate(PROMPTS, SamplingParams(temperature=1.0, top_k=1, max_tokens=10, seed=5))
    assert [c[0].token_ids for c in topk1] == [c[0].token_ids for c in greedy]


@pytest.mark.slow  # > 30 s on the shared 2-core machine (several compilations)
def test_seed_determinism_and_independent_samples(engine):
    p = SamplingParams(temperature=1.0, max_tokens=16, seed=11)
    a = engine.generate(PROMPTS, p, n=4)
    b = engine.generate(PROMPTS, p, n=4)
    c = engine.generate(PROMPTS, SamplingParams(temperature=1.0, max_tokens=16, seed=12), n=4)
    ids = lambda out: [[s.token_ids for s in row] for row in out]  # noqa: E731
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)
    for row in a:  # the n samples of one prompt are distinct draws
        assert len({tuple(s.token_ids) for s in row}) == 4
    unseeded = [engine.generate(PROMPTS[:1], SamplingParams(max_tokens=16))[0][0].token_ids for _ in range(2)]
    assert unseeded[0] != unseeded[1]


def test_stop_token_ids_end_the_row_and_keep_the_token(engine):
    full = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=20))
    stop_id = full[1][0].token_ids[5]
    out = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=(stop_id,)))
    for f, o in zip(full, out, strict=True):
        toks = f[0].token_ids
        if stop_id in toks:
            k = toks.index(stop_id) + 1
            assert (o[0].token_ids, o[0].finish_reason) == (toks[:k], "stop")
            assert o[0].logprobs == pytest.approx(f[0].logprobs[:k], abs=1e-6)
        else:
            assert (o[0].token_ids, o[0].finish_reason) == (toks, "length")


def test_stop_strings_cut_text_and_tokens(setup, engine):
    _, tok, _, _ = setup
    full = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=40))
    text = full[0][0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), "the random model should produce visible text"
    engine.stop_check_every = 4  # exercise the chunked host check
    out = engine.generate(
        PROMPTS, SamplingParams(temperature=0.0, max_tokens=40, stop_strings=(stop, "\x00"))
    )
    for f, o in zip(full, out, strict=True):
        c, ref_text, ref_toks = o[0], f[0].text, f[0].token_ids
        cut = ref_text.find(stop)
        if cut < 0:
            assert (c.text, c.token_ids, c.finish_reason) == (ref_text, ref_toks, "length")
            continue
        assert c.text == ref_text[:cut] and c.finish_reason == "stop"
        assert c.token_ids == ref_toks[: len(c.token_ids)]  # a prefix of the uncut run
        kept = tok.decode(c.token_ids)
        assert stop not in kept and ref_text[:cut].startswith(kept)
        # maximal: one more token would reach into the stop string
        assert len(tok.decode(ref_toks[: len(c.token_ids) + 1])) > cut
        assert len(c.logprobs) == len(c.token_ids)


def test_cut_helpers_with_a_hand_tokenizer():
    pieces = {1: "ab", 2: "c</", 3: "te", 4: "ach>", 5: "zz"}
    decode = lambda ids: "".join(pieces[i] for i in ids)  # noqa: E731
    text = decode([1, 2, 3, 4, 5])
    cut = cut_at_stop_string(text, ("zz", "</teach>", "nope"))
    assert cut == 3  # "</teach>" starts before "zz"
    assert tokens_before([1, 2, 3, 4, 5], cut, decode) == 1  # token 2 straddles the cut: dropped
    assert cut_at_stop_string(text, ("nope", "")) is None


@pytest.mark.slow  # > 30 s on the shared 2-core machine (several compilations)
def test_no_recompilation_within_a_bucket(engine):
    p = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=10, seed=1)
    engine.generate(PROMPTS, p)
    before = dict(engine.trace_counts)
    engine.generate(
        ["two plus", PROMPTS[1], "three times three", "four"], SamplingParams(**{**vars(p), "max_tokens": 14})
    )
    engine.generate(PROMPTS[::-1], SamplingParams(**{**vars(p), "seed": 9}), n=1)
    assert dict(engine.trace_counts) == before
    engine.generate(PROMPTS * 3, p)  # 9 prompts: next batch bucket -> one new prefill and decode
    assert engine.trace_counts["prefill"] == before["prefill"] + 1
    assert engine.trace_counts["decode"] == before["decode"] + 1


def test_engines_of_one_architecture_share_compiled_programs(setup, engine):
    hf, tok, cfg, _ = setup
    hf_b = _random_hf(1)
    other = JaxSampler(
        build_model(cfg, hf_to_flat({k: v.numpy() for k, v in hf_b.state_dict().items()}, cfg)), tok
    )
    greedy = SamplingParams(temperature=0.0, max_tokens=20)
    got_a = engine.generate(PROMPTS, greedy)  # compiles this bucket (unless an earlier test did)
    compiles: list[str] = []

    def on_event(name: str, secs: float, **_) -> None:
        if name == "/jax/core/compile/backend_compile_duration":
            compiles.append(name)

    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        got_b = other.generate(PROMPTS, greedy)
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)
    assert compiles == []  # the second engine ran the first one's executables
    # ... and each engine still samples its own weights.
    assert [c[0].token_ids for c in got_a] == _hf_greedy(hf, tok, PROMPTS, 20)
    assert [c[0].token_ids for c in got_b] == _hf_greedy(hf_b, tok, PROMPTS, 20)
    assert [c[0].token_ids for c in got_a] != [c[0].token_ids for c in got_b]
    assert [c[0].token_ids for c in engine.generate(PROMPTS, greedy)] == [c[0].token_ids for c in got_a]
    # Another architecture or mesh gets programs of its own (looked up without compiling anything).
    shallower = nnx.split(build_model(cfg.replace(num_layers=1)))[0]
    assert compiled_programs(shallower, None) is not compiled_programs(nnx.split(build_model(cfg))[0], None)
    assert (
        compiled_programs(nnx.split(build_model(cfg))[0], make_mesh((2, 2, 2))).prefill is not engine._prefill
    )


@pytest.mark.slow  # > 30 s on the shared 2-core machine (several compilations)
def test_update_weights_swaps_references_and_live_model_is_on_policy(setup):
    _, tok, cfg, flat = setup
    model = build_model(cfg, flat)
    eng = JaxSampler(model, tok)
    for a, b in zip(jax.tree.leaves(eng.params), jax.tree.leaves(nnx.state(model)), strict=True):
        assert a is b  # shared, not copied
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    before = eng.generate(PROMPTS, greedy)
    other = build_model(cfg, seed=1)
    nnx.update(model, nnx.state(other))  # an in-place "optimizer step" on the live module
    after = eng.generate(PROMPTS, greedy)
    assert [c[0].token_ids for c in after] != [c[0].token_ids for c in before]
    ref = JaxSampler(nnx.split(other), tok).generate(PROMPTS, greedy)
    assert [c[0].token_ids for c in after] == [c[0].token_ids for c in ref]

    eng2 = JaxSampler(nnx.split(other), tok)
    eng2.update_weights({k: jnp.asarray(v) for k, v in flat.items()})
    assert [c[0].token_ids for c in eng2.generate(PROMPTS, greedy)] == [c[0].token_ids for c in before]
    new_state = nnx.state(build_model(cfg, seed=2))
    eng2.update_weights(new_state)
    assert all(a is b for a, b in zip(jax.tree.leaves(eng2.params), jax.tree.leaves(new_state), strict=True))
    bad = dict(flat)
    bad["embed/embedding"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match="embed/embedding"):
        eng2.update_weights(bad)
    with pytest.raises(ValueError, match="missing"):
        eng2.update_weights({k: v for k, v in flat.items() if k != "final_norm/scale"})


def test_sharded_mesh_matches_unsharded(setup, engine):
    _, tok, cfg, flat = setup
    mesh = make_mesh((2, 2, 2))
    eng = JaxSampler(build_model(cfg, flat, mesh=mesh), tok, mesh=mesh)
    p = SamplingParams(temperature=1.0, max_tokens=12, seed=4)
    got = eng.generate(PROMPTS, p, n=2)
    ref = engine.generate(PROMPTS, p, n=2)
    for g, r in zip(got, ref, strict=True):
        for a, b in zip(g, r, strict=True):
            assert a.token_ids == b.token_ids
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)


def test_bad_input_errors(engine):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate(["ok", ""], SamplingParams())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate([[1, 2, 10_000]], SamplingParams())
    with pytest.raises(ValueError, match="max_position_embeddings"):
        engine.generate([[1, 2]], SamplingParams(max_tokens=1000))
