"""Shared helpers for the data/protocol tests: a locally trained tokenizer and a tiny HF model engine.

``HFEngine`` is a real ``Engine`` over a real (tiny, random) transformers model using HF ``generate``;
it stands in for the JAX sampler / vLLM engines where a test only needs *some* real engine.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from engine_helpers import EOS, bpe_tokenizer

from atlas_jax.engines.base import Completion, Engine, Prompt, SamplingParams

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SAMPLES = Path(__file__).resolve().parents[1] / "atlas_jax" / "data" / "samples"


def corpus() -> list[str]:
    """Training text for the tokenizer: the sample files plus protocol words."""
    texts = []
    for name in ("rl_sample.jsonl", "sft_sample.jsonl"):
        for line in (SAMPLES / name).read_text().splitlines():
            texts.extend(str(v) for v in json.loads(line).values())
    texts.append("<thinking> </thinking> <teaching> </teaching> \\boxed{42} answer is 0123456789 {}")
    return texts


def make_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained here (no downloads), with a chat template and EOS."""
    return bpe_tokenizer(
        corpus(),
        vocab_size=vocab_size,
        special_tokens=[EOS, "<|im_start|>", "<|im_end|>"],
        chat_template=CHAT_TEMPLATE,
    )


def _qwen2_config(tokenizer):
    """The tiny Qwen2-shape config (hidden 64, 2 heads of 32, 1 kv head, 2 layers) for ``tokenizer``."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )


def make_model(tokenizer, seed: int = 0):
    """A tiny random Qwen2-shape model (hidden 64, 2 heads of 32, 1 kv head, 2 layers)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)  # 2 shared cores: more threads only contend
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(_qwen2_config(tokenizer)).eval()


class HFEngine(Engine):
    """A real engine over a transformers model (HF ``generate``), logging every call it serves."""

    def __init__(self, model, tokenizer) -> None:
        self.model = model
        self._tokenizer = tokenizer
        self.calls: list[tuple[list[Prompt], SamplingParams, int]] = []

    @property
    def tokenizer(self):
        return self._tokenizer

    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams, n: int = 1
    ) -> list[list[Completion]]:
        import torch

        self.calls.append((list(prompts), params, n))
        if params.seed is not None:
            torch.manual_seed(params.seed)
        eos = self._tokenizer.eos_token_id
        out = []
        for prompt in prompts:
            ids = (
                list(prompt)
                if not isinstance(prompt, str)
                else self._tokenizer.encode(prompt, add_special_tokens=False)
            )
            x = torch.tensor([ids])
            greedy = params.temperature == 0
            with torch.no_grad():
                res = self.model.generate(
                    x,
                    attention_mask=torch.ones_like(x),
                    max_new_tokens=params.max_tokens,
                    do_sample=not greedy,
                    temperature=None if greedy else params.temperature,
                    top_p=None if greedy else params.top_p,
                    top_k=None if greedy else (params.top_k or None),
                    num_return_sequences=1 if greedy else n,
                    eos_token_id=[eos, *params.stop_token_ids],
                    pad_token_id=eos,
                    output_scores=True,
                    return_dict_in_generate=True,
                )
            comps = []
            for j in range(n):
                j = 0 if greedy else j  # greedy: n identical copies
                new = res.sequences[j, len(ids) :].tolist()
                stop_at = next((t for t, tok in enumerate(new) if tok in (eos, *params.stop_token_ids)), None)
                new = new[: stop_at + 1] if stop_at is not None else new
                # HF scores are already temperature-scaled (and top-p masked): close enough for these
                # tests, which never compare log-probs.
                logprobs = [
                    float(torch.log_softmax(res.scores[t][j].float(), -1)[tok]) for t, tok in enumerate(new)
                ]
                text = self._tokenizer.decode([t for t in new if t != eos], skip_special_tokens=False)
                comps.append(
                    Completion(ids, new, text, logprobs, "stop" if stop_at is not None else "length")
                )
            out.append(comps)
        return out


def train_to_emit(model, tokenizer, prompts: Sequence[str], completion: str, steps: int = 150) -> None:
    """Fits the model (in place) so greedy decoding of each prompt yields ``completion`` + EOS.

    Used to get a *real* teacher that writes a known <thinking>/<teaching> structure.
    """
    import torch

    target = [*tokenizer.encode(completion, add_special_tokens=False), tokenizer.eos_token_id]
    seqs = [tokenizer.encode(p, add_special_tokens=False) + target for p in prompts]
    width = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id
    # Left-pad into one batch; labels only on the completion.
    x = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    labels = x.clone()
    labels[:, : width - len(target)] = -100
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        loss = model(input_ids=x, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        if loss.item() < 1e-3:
            break
    model.eval()


class Recorder(Engine):
    """Forwards to a real engine and records each call (prompts, params, n) for assertions."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.calls: list[tuple[list[Prompt], SamplingParams, int]] = []

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams, n: int = 1
    ) -> list[list[Completion]]:
        self.calls.append((list(prompts), params, n))
        return self.engine.generate(prompts, params, n)


def hf_config_dict(tokenizer) -> dict:
    """The HF config (dict) of the tiny Qwen2-shape model ``make_model`` builds."""
    return _qwen2_config(tokenizer).to_dict()


def make_jax_engine(tokenizer, seed: int = 0) -> Engine:
    """Our JAX sampler over a tiny random decoder (same shape as ``make_model``)."""
    from atlas_jax.engines.jax_sampler import JaxSampler
    from atlas_jax.models.config import ModelConfig
    from atlas_jax.models.params import build_model

    cfg = ModelConfig.from_hf(hf_config_dict(tokenizer))
    return JaxSampler(build_model(cfg, seed=seed), tokenizer)
