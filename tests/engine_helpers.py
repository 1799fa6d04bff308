"""Tiny HF models and references for the engine/server tests (nothing downloads).

``make_hf_dir`` writes a random Qwen3-shape model (hidden 64, 2 heads of 32, 1 kv head, 2 layers)
with a locally trained byte-level BPE tokenizer (vocab 320, a ChatML template) into a folder that
transformers and vLLM both load.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import numpy as np

EOS = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [f"the quick brown fox jumps over the lazy dog {i} times; {i}+{i}={2 * i}." for i in range(300)]


def bpe_tokenizer(
    texts: list[str],
    *,
    vocab_size: int,
    special_tokens: list[str],
    chat_template: str,
    unk: str | None = None,
) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts`` (EOS = pad = ``<|endoftext|>``).

    ``special_tokens`` take the first ids, in order; ``unk`` (if given) is the BPE's unknown token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    extra = {} if unk is None else {"unk_token": unk}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, **extra)
    fast.chat_template = chat_template
    return fast


def make_tokenizer() -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``CORPUS`` (vocab 320)."""
    return bpe_tokenizer(
        CORPUS,
        vocab_size=320,
        special_tokens=["<unk>", EOS, "<|im_start|>", "<|im_end|>"],
        chat_template=CHAT_TEMPLATE,
        unk="<unk>",
    )


def make_hf_dir(out: str | os.PathLike[str], *, tied: bool, seed: int = 0, model_type: str = "qwen3") -> Path:
    """Writes a tiny random HF model + tokenizer to ``out`` and returns the path."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = make_tokenizer()
    cfg = AutoConfig.for_model(
        model_type,
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        tie_word_embeddings=tied,
        max_position_embeddings=512,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # Larger-than-init weights so greedy outputs depend visibly on them.
        for p in model.parameters():
            p.normal_(0.0, 0.2) if p.ndim > 1 else p.uniform_(0.5, 1.5)
    out = Path(out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def perturbed_state(hf_dir: str | os.PathLike[str], seed: int, noise: float = 0.2) -> dict[str, np.ndarray]:
    """HF state dict (name -> float32 numpy) of the model in ``hf_dir`` with N(0, noise) added."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in model.state_dict().items():
        out[name] = (p + noise * torch.randn(p.shape, generator=gen)).numpy()
    if model.config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


class HFReference:
    """transformers model of ``hf_dir``'s architecture whose weights can be swapped; scores tokens."""

    def __init__(self, hf_dir: str | os.PathLike[str]) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self._torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()

    def load(self, state: dict[str, np.ndarray]) -> None:
        sd = {k: self._torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
        missing, unexpected = self.model.load_state_dict(sd, strict=False)
        assert not unexpected, unexpected
        assert set(missing) <= {"lm_head.weight"}, missing
        if self.model.config.tie_word_embeddings:
            self.model.tie_weights()

    def logprobs(self, prompt: list[int], tokens: list[int], temperature: float = 1.0) -> list[float]:
        """log softmax(logits / T)[token_t] for each completion token."""
        ids = self._torch.tensor([prompt + tokens])
        with self._torch.no_grad():
            logits = self.model(ids).logits[0].double() / temperature
        lp = logits.log_softmax(-1)
        return [float(lp[len(prompt) - 1 + i, t]) for i, t in enumerate(tokens)]

    def greedy(self, prompt: list[int], max_tokens: int) -> list[int]:
        """Argmax continuation of ``prompt`` (no EOS handling)."""
        ids = list(prompt)
        for _ in range(max_tokens):
            with self._torch.no_grad():
                logits = self.model(self._torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
        return ids[len(prompt) :]


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadServer:
    """uvicorn serving ``app`` on a free 127.0.0.1 port in a daemon thread (``stop()`` ends it)."""

    def __init__(self, app) -> None:
        import threading
        import time

        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def wait_healthy(proc, url: str, log, what: str, timeout: float = 600, poll_s: float = 1.0) -> None:
    """Waits until ``url + "/health"`` answers 200; fails with the log's tail if ``proc`` exits or time runs out."""
    import time

    import httpx
    import pytest

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{what} was not healthy after {timeout} s:\n{log.read_text()[-3000:]}")
        time.sleep(poll_s)
