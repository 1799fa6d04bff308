"""Start-up checks of inputs that would otherwise fail late or silently (docs/reliability.md).

``check_teacher_tokenizer``: the tokenizer the teacher engine samples with must fit the policy model (every
token id has an embedding row) and, when the teacher folder ships its own tokenizer, be that tokenizer: the
learner scores the engine's token ids with the policy, so a different vocabulary would train on garbage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def _ships_tokenizer(folder: str) -> bool:
    p = Path(folder)
    return any((d / f).is_file() for d in (p, p / "hf") for f in TOKENIZER_FILES)


def check_teacher_tokenizer(tokenizer: Any, vocab_size: int, *, source: str, teacher: str, load: Any) -> None:
    """Raises ``ValueError`` naming ``--config.model.tokenizer`` on a tokenizer mismatch (see module docstring).

    Args:
      tokenizer: the engine's tokenizer (None: nothing to check).
      vocab_size: the policy model's embedding rows.
      source: where ``tokenizer`` came from (``model.tokenizer`` or ``model.teacher``).
      teacher: ``config.model.teacher`` (a folder, or "" for a preset).
      load: ``path -> tokenizer`` (``rl_setup.load_tokenizer``).
    """
    if tokenizer is None:
        return
    n = len(tokenizer)
    if n > vocab_size:
        raise ValueError(
            f"tokenizer mismatch between teacher and engine: --config.model.tokenizer={source} has {n} tokens but "
            f"the teacher model has {vocab_size} embedding rows; use the teacher's own tokenizer"
        )
    same_folder = not teacher or Path(source).resolve() == Path(teacher).resolve()
    if not same_folder and _ships_tokenizer(teacher) and load(teacher).get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"tokenizer mismatch between teacher and engine: --config.model.tokenizer={source} differs from "
            f"the tokenizer shipped with --config.model.teacher={teacher}; leave model.tokenizer empty or "
            "point it at the teacher's tokenizer"
        )
