"""A small byte-level BPE tokenizer trained locally (no hub) and saved as an HF tokenizer folder.

Digits are always single tokens (so arithmetic is digit by digit), the protocol tags ``<teaching>``,
``</teaching>``, ``<thinking>``, ``</thinking>`` are single *non-special* added tokens (they survive
``decode(..., skip_special_tokens=True)``, which the protocol relies on to find the teaching), and
``<|endoftext|>`` is BOS, EOS and PAD. The folder carries a ChatML-style chat template, so chat-mode
prompting, ``transformers.AutoTokenizer`` and vLLM all load it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable

EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
TAG_TOKENS = ("<teaching>", "</teaching>", "<thinking>", "</thinking>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], out_dir: str, *, vocab_size: int = 320) -> str:
    """Trains the tokenizer on ``texts`` and writes an HF tokenizer folder to ``out_dir``.

    The folder is written to a temporary sibling first and renamed, so a crash leaves nothing
    half-written.

    Args:
      texts: training corpus (prompts and completions of the task).
      out_dir: destination folder (created; must not exist or be empty).
      vocab_size: target size including the 256 byte symbols and the added tokens.

    Returns:
      ``out_dir``.

    Raises:
      ValueError: ``vocab_size`` too small for the byte alphabet plus the added tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [EOS, IM_START, IM_END]
    if vocab_size < 256 + len(specials) + len(TAG_TOKENS):
        raise ValueError(f"vocab_size must be >= {256 + len(specials) + len(TAG_TOKENS)}, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(TAG_TOKENS),
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    tok.add_tokens(list(TAG_TOKENS))
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=None,
        additional_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ValueError(f"tokenizer output folder {out_dir} exists and is not empty")
    tmp = tempfile.mkdtemp(prefix=".tok-", dir=parent)
    hf.save_pretrained(tmp)
    if os.path.isdir(out_dir):
        os.rmdir(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def load_tokenizer(path: str):
    """Loads a tokenizer folder with ``transformers.AutoTokenizer`` (local files only)."""
    from transformers import AutoTokenizer

    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise FileNotFoundError(f"no tokenizer.json in {path}; train one with train_tokenizer")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)
