"""atlas-jax params -> HF transformers folder (loads in AutoModelForCausalLM and in vLLM).

Usage::

    python -m converters.jax_to_hf --ckpt CKPT --out DIR [--dtype float32|bfloat16] [--step N]
        [--max_shard_size 5GB] [--overwrite]

CKPT is a checkpoint written by ``converters.hf_to_jax`` or by the trainer (``model_config.json``
beside the orbax steps, tokenizer files under ``hf/``). The state of a step may be the flat params,
nested params, or a train state with a ``params`` entry.

Library entry point: ``export_hf_dir(flat_params, cfg, out_dir, tokenizer_src, dtype)``, used by the
trainer for its final export and by the engines to start vLLM. DIR gets config.json
(``cfg.to_hf()`` with the stored dtype), safetensors (sharded with an index above the shard size),
the tokenizer files and generation_config.json, all at once (written to a temporary sibling and
renamed; nothing is left on failure).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from atlas_jax.checkpoint import Checkpointer, write_json
from atlas_jax.models.config import DTYPES, ModelConfig
from atlas_jax.models.params import stack_layers
from converters import mapping
from converters.hf_to_jax import ASSETS_DIR, copy_assets, np_dtype, read_model_config
from converters.safetensors_io import DEFAULT_MAX_SHARD_BYTES, atomic_dir, write_safetensors


def export_hf_dir(
    flat_params: Mapping[str, Any],
    cfg: ModelConfig,
    out_dir: str | os.PathLike[str],
    tokenizer_src: Any = None,
    dtype: str | None = None,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Writes a complete HF model folder from flat params.

    Args:
      flat_params: our path -> array (numpy or single-host jax arrays), e.g. ``models.params.flatten``.
      cfg: the ModelConfig.
      out_dir: folder to create.
      tokenizer_src: None, a folder to copy tokenizer files and generation_config.json from, a
        transformers tokenizer (``save_pretrained``) or a ``tokenizers.Tokenizer`` (``save``).
      dtype: "float32" | "bfloat16" to cast the weights; None keeps their dtype.
      max_shard_bytes: safetensors shard size limit.
      overwrite: replace an existing ``out_dir``.

    Returns:
      ``out_dir`` as a Path.

    Raises:
      mapping.MappingError: params do not match ``cfg``'s table (nothing is written).
      FileExistsError: ``out_dir`` exists and not ``overwrite``.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    out = Path(out_dir)
    stream = mapping.flat_to_hf(
        flat_params, cfg, dtype=None if dtype is None else np_dtype(dtype)
    )  # Validates before writing.
    first_name, first = next(stream)
    stored = dtype or _dtype_name(first.dtype)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_safetensors(_chain(first_name, first, stream), tmp, max_shard_bytes=max_shard_bytes)
        del first
        config = dict(cfg.to_hf())
        config["dtype"] = config["torch_dtype"] = (
            stored  # What the files hold, whatever cfg.param_dtype says.
        )
        write_json(tmp / "config.json", config)
        _write_tokenizer(tokenizer_src, tmp)
        if not (tmp / "generation_config.json").exists():
            write_json(tmp / "generation_config.json", _generation_config(cfg))
    return out


def _chain(name: str, first: np.ndarray, rest: Any) -> Any:
    yield name, first
    yield from rest


def _dtype_name(dt: np.dtype) -> str:
    name = np.dtype(dt).name
    if name not in DTYPES:
        raise ValueError(f"cannot export weights of dtype {name}; pass dtype= one of {DTYPES}")
    return name


def _generation_config(cfg: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(cfg, key, None)
        if value is not None:
            out[key] = list(value) if isinstance(value, tuple) else value
    return out


def _write_tokenizer(src: Any, dst: Path) -> None:
    if src is None:
        return
    if isinstance(src, str | os.PathLike):
        if not Path(src).is_dir():
            raise FileNotFoundError(f"tokenizer source {src} is not a folder")
        copy_assets(src, dst)
    elif hasattr(src, "save_pretrained"):
        src.save_pretrained(str(dst))
    elif hasattr(src, "save") and hasattr(src, "encode"):  # tokenizers.Tokenizer
        src.save(str(dst / "tokenizer.json"))
    else:
        raise TypeError(f"tokenizer_src must be a folder or a tokenizer object, got {type(src).__name__}")


def params_from_state(state: Any) -> dict[str, Any]:
    """Flat params (stacked layout) from a restored state: flat dict, nested dict, or a dict with ``params``."""
    if isinstance(state, Mapping) and "params" in state and "embed/embedding" not in state:
        state = state["params"]
    if not isinstance(state, Mapping):
        raise ValueError(f"checkpoint state is a {type(state).__name__}, expected a dict of params")
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(f"{prefix}/{k}" if prefix else str(k), v)
        else:
            flat[prefix] = node

    walk("", state)
    # nnx.State pure dicts may wrap leaves as {"value": array}; strip that suffix.
    if flat and all(k.endswith("/value") for k in flat):
        flat = {k[: -len("/value")]: v for k, v in flat.items()}
    return stack_layers(flat)  # checkpoints from before the stacked-layer layout hold layers/{i}/...


def convert(
    ckpt: str | os.PathLike[str],
    out: str | os.PathLike[str],
    dtype: str | None = None,
    step: int | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Exports step ``step`` (default: latest) of checkpoint ``ckpt`` as an HF folder at ``out``."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"{ckpt}: checkpoint folder does not exist")
    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
    cfg = read_model_config(ckpt)
    with Checkpointer(ckpt) as c:
        flat = params_from_state(c.restore(step))
    assets = ckpt / ASSETS_DIR
    return export_hf_dir(
        flat,
        cfg,
        out,
        tokenizer_src=assets if assets.is_dir() else None,
        dtype=dtype,
        max_shard_bytes=max_shard_bytes,
        overwrite=overwrite,
    )


def parse_size(text: str) -> int:
    """ "5GB" / "200MB" / "64KB" / "1000" -> bytes (powers of 1000, like transformers)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r}; use e.g. 5GB, 500MB, 1000000")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3}[unit[0]]
    return int(float(m.group(1)) * base**power)


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="checkpoint folder (from hf_to_jax or training)")
    parser.add_argument("--out", required=True, help="HF folder to create")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="cast weights (default: keep)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--max_shard_size", type=parse_size, default=DEFAULT_MAX_SHARD_BYTES, help="e.g. 5GB")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def run_args(args: argparse.Namespace) -> int:
    try:
        out = convert(args.ckpt, args.out, args.dtype, args.step, args.max_shard_size, args.overwrite)
    except (OSError, ValueError) as e:
        print(f"jax_to_hf: error: {e}", file=sys.stderr)
        return 2
    print(f"jax_to_hf: wrote {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jax_to_hf", description=__doc__.split("\n\n")[0])
    add_args(parser)
    return run_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
