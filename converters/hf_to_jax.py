"""HF transformers folder -> self-contained atlas-jax (orbax) checkpoint.

Usage::

    python -m converters.hf_to_jax --hf_dir DIR --out CKPT [--dtype float32|bfloat16] [--overwrite]

CKPT (see ``atlas_jax.checkpoint``) holds step 0 with the flat params (``{"embed/embedding": ...}``),
``model_config.json`` (the ModelConfig as an HF config dict, read back with
``ModelConfig.from_hf``) and ``hf/`` with the tokenizer files and generation_config.json copied from
DIR, so ``converters.jax_to_hf`` can rebuild a complete HF folder from CKPT alone. The output folder
appears atomically: on any error nothing is left at CKPT.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np

from atlas_jax.checkpoint import Checkpointer, read_json, write_json
from atlas_jax.models.config import DTYPES, ModelConfig
from converters import mapping
from converters.safetensors_io import SafetensorsFolder, atomic_dir

MODEL_CONFIG_FILE = "model_config.json"
ASSETS_DIR = "hf"
# Files (besides weights and config.json) that make an HF folder usable: tokenizer + generation defaults.
ASSET_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def load_hf_config(hf_dir: str | os.PathLike[str], param_dtype: str = "float32") -> ModelConfig:
    """Builds the ModelConfig from ``hf_dir/config.json``.

    Raises:
      ValueError: missing or unparsable config.json, an unsupported ``model_type`` or feature (the
        message names the file and the field).
    """
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: HF config.json not found")
    return ModelConfig.from_hf(path, param_dtype=param_dtype)


def copy_assets(src_dir: str | os.PathLike[str], dst_dir: str | os.PathLike[str]) -> list[str]:
    """Copies the tokenizer/generation files present in ``src_dir`` into ``dst_dir``."""
    src, dst = Path(src_dir), Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in ASSET_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def convert(
    hf_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    dtype: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Converts an HF folder into a checkpoint at ``out`` (see the module docstring).

    Args:
      hf_dir: folder with config.json and model.safetensors (or a sharded set with its index).
      out: checkpoint folder to create.
      dtype: cast the params to this dtype ("float32", "bfloat16"); None keeps them.
      overwrite: replace an existing ``out``.

    Returns:
      The checkpoint path.

    Raises:
      FileNotFoundError, ValueError, mapping.MappingError: bad input; nothing is written.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
    cfg = load_hf_config(hf_dir)
    tensors = SafetensorsFolder(hf_dir)
    flat = mapping.hf_to_flat(tensors, cfg, dtype=None if dtype is None else np_dtype(dtype))
    tensors.close()
    cfg = cfg.replace(param_dtype=_stored_dtype(flat, hf_dir))
    # Orbax copies numpy leaves into extra host buffers while saving (~2x the weights) but jax arrays
    # only once more (~0.85x), so move each tensor to a (host) jax array, dropping the numpy copy.
    cpu = jax.devices("cpu")[0]
    for key in list(flat):
        flat[key] = jax.device_put(flat.pop(key), cpu)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        with Checkpointer(tmp) as ckpt:
            ckpt.save(0, flat, meta={"source": str(Path(hf_dir).absolute()), "kind": "params"}, force=True)
        write_model_config(tmp, cfg)
        copy_assets(hf_dir, tmp / ASSETS_DIR)
    return out


def _stored_dtype(flat: dict[str, np.ndarray], where: Any) -> str:
    names = {np.dtype(x.dtype).name for x in flat.values()}
    if len(names) != 1 or next(iter(names)) not in DTYPES:
        raise ValueError(f"{where}: weights have dtype(s) {sorted(names)}; pass --dtype one of {DTYPES}")
    return next(iter(names))


def write_model_config(ckpt_dir: str | os.PathLike[str], cfg: ModelConfig) -> None:
    """Stores ``cfg`` beside a checkpoint as ``model_config.json`` (``cfg.to_dict()``)."""
    write_json(Path(ckpt_dir) / MODEL_CONFIG_FILE, cfg.to_dict())


def read_model_config(ckpt_dir: str | os.PathLike[str]) -> ModelConfig:
    """Reads the ModelConfig stored by ``write_model_config``."""
    path = Path(ckpt_dir) / MODEL_CONFIG_FILE
    try:
        return ModelConfig.from_dict(read_json(path, "model config"))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: cannot build a ModelConfig ({e})") from e


def np_dtype(name: str) -> Any:
    """numpy dtype for "float32" / "bfloat16" (ml_dtypes)."""
    return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf_dir", required=True, help="HF model folder (config.json + safetensors)")
    parser.add_argument("--out", required=True, help="checkpoint folder to create")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="cast params (default: keep)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf_to_jax", description=__doc__.split("\n\n")[0])
    add_args(parser)
    args = parser.parse_args(argv)
    return run_args(args)


def run_args(args: argparse.Namespace) -> int:
    try:
        out = convert(args.hf_dir, args.out, dtype=args.dtype, overwrite=args.overwrite)
    except (OSError, ValueError) as e:
        print(f"hf_to_jax: error: {e}", file=sys.stderr)
        return 2
    print(f"hf_to_jax: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
