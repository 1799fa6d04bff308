"""Model config `tiny_llama` (see atlas_jax/models/presets.py); override fields with --config.<field>=..."""

import ml_collections

from atlas_jax.models.presets import get_preset


def get_config() -> ml_collections.ConfigDict:
    """The `tiny_llama` preset as a ConfigDict; `ModelConfig.from_dict(cfg)` turns it back into a ModelConfig."""
    return ml_collections.ConfigDict(get_preset("tiny_llama").to_dict())
