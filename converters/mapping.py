"""HF transformers parameter names <-> atlas-jax parameter paths, one declarative table per family.

This is the only module in the repository that knows HF parameter names. The same tables serve
loading (``hf_to_flat``), export (``flat_to_hf``) and pushing weights into a running vLLM, so the
three can never disagree.

Layouts. HF ``nn.Linear`` weights are stored ``[out, in]``; ours are einsum kernels
``[*in_dims, *out_dims]`` (see docs/internals.md), e.g. ``q_proj``: HF ``[N*H, D]`` <-> ours
``[D, N, H]`` and ``o_proj``: HF ``[D, N*H]`` <-> ours ``[N, H, D]``. A ``linear`` row therefore
transposes and reshapes; a ``plain`` row only reshapes (biases ``[N*H]`` <-> ``[N, H]``) or copies
(norm scales, the embedding). Dimension letters: V vocab, D hidden, N heads, K kv heads,
H head_dim, F intermediate.

Stacked layers. The decoder keeps every per-layer parameter in one stacked array with a leading ``[L]``
axis (``layers/attn/q_proj/kernel`` is ``[L, D, N, H]``; the model runs its layers under ``lax.scan``); a
per-layer row maps HF ``model.layers.{i}.…`` to index ``i`` of that array. Checkpoints written before the
stacking (``layers/{i}/…`` paths) are restacked on load by ``atlas_jax.models.params.stack_layers``.

Strictness. Every expected tensor must be present, every given tensor must be consumed, and each
shape must match; errors name the tensor and the expected/got shapes. Two documented exceptions
when reading HF checkpoints: a tied model (``tie_word_embeddings``) whose checkpoint still contains
``lm_head.weight`` is accepted if that tensor equals the embedding (it is dropped); and the
non-parameter rotary buffer ``model.layers.{i}.self_attn.rotary_emb.inv_freq`` found in some old
Llama checkpoints is ignored (it is recomputed from ``rope_theta``). ``flat_to_hf`` never emits
``lm_head.weight`` for tied models.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator, Mapping
from typing import Any, Literal, NamedTuple

import numpy as np

_DIM_FIELDS = {
    "V": "vocab_size",
    "D": "hidden_size",
    "N": "num_heads",
    "K": "num_kv_heads",
    "H": "head_dim",
    "F": "intermediate_size",
}
# Conditions a row can depend on (``when``): names of boolean predicates on the config.
_CONDITIONS = {
    "always": lambda cfg: True,
    "qkv_bias": lambda cfg: bool(cfg.qkv_bias),
    "qk_norm": lambda cfg: bool(cfg.qk_norm),
    "untied": lambda cfg: not cfg.tie_word_embeddings,
}


@dataclasses.dataclass(frozen=True)
class Row:
    """One tensor: our path template, the HF name template and how to convert between them.

    Attributes:
      ours: our flat path (per-layer rows: the stacked ``[L, ...]`` array).
      hf: the HF parameter name, ``{i}`` standing for the layer index of per-layer rows.
      kind: "linear" (HF ``[prod(out), prod(in)]`` <-> ours ``[*in, *out]``) or "plain" (HF
        ``[prod(ours)]``-compatible reshape; identical shape for norms/embedding).
      dims_in: dimension letters of our leading (input) axes, e.g. "D" or "N H".
      dims_out: dimension letters of our trailing (output) axes ("" for plain rows with no split).
      hf_dims: for plain rows, the HF shape's letters (products joined with "*", e.g. "N*H").
      when: condition under which the tensor exists (a key of ``_CONDITIONS``).
    """

    ours: str
    hf: str
    kind: Literal["linear", "plain"]
    dims_in: str
    dims_out: str = ""
    hf_dims: str = ""
    when: str = "always"

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf


class Entry(NamedTuple):
    """One HF tensor: its row, our (stacked) path, its layer index in that path (None if not per layer), HF name."""

    row: Row
    ours: str
    layer: int | None
    hf: str


def _linear(ours: str, hf: str, dims_in: str, dims_out: str, when: str = "always") -> Row:
    return Row(ours, hf, "linear", dims_in, dims_out, when=when)


def _plain(ours: str, hf: str, dims: str, hf_dims: str | None = None, when: str = "always") -> Row:
    return Row(ours, hf, "plain", dims, hf_dims=dims if hf_dims is None else hf_dims, when=when)


_L = "model.layers.{i}."
_BASE = (
    _plain("embed/embedding", "model.embed_tokens.weight", "V D"),
    _plain("layers/input_norm/scale", _L + "input_layernorm.weight", "D"),
    _linear("layers/attn/q_proj/kernel", _L + "self_attn.q_proj.weight", "D", "N H"),
    _linear("layers/attn/k_proj/kernel", _L + "self_attn.k_proj.weight", "D", "K H"),
    _linear("layers/attn/v_proj/kernel", _L + "self_attn.v_proj.weight", "D", "K H"),
    _linear("layers/attn/o_proj/kernel", _L + "self_attn.o_proj.weight", "N H", "D"),
    _plain("layers/post_attn_norm/scale", _L + "post_attention_layernorm.weight", "D"),
    _linear("layers/mlp/gate_proj/kernel", _L + "mlp.gate_proj.weight", "D", "F"),
    _linear("layers/mlp/up_proj/kernel", _L + "mlp.up_proj.weight", "D", "F"),
    _linear("layers/mlp/down_proj/kernel", _L + "mlp.down_proj.weight", "F", "D"),
    _plain("final_norm/scale", "model.norm.weight", "D"),
    _linear("lm_head/kernel", "lm_head.weight", "D", "V", when="untied"),
)
_QKV_BIAS = (
    _plain("layers/attn/q_proj/bias", _L + "self_attn.q_proj.bias", "N H", "N*H", when="qkv_bias"),
    _plain("layers/attn/k_proj/bias", _L + "self_attn.k_proj.bias", "K H", "K*H", when="qkv_bias"),
    _plain("layers/attn/v_proj/bias", _L + "self_attn.v_proj.bias", "K H", "K*H", when="qkv_bias"),
)
_QK_NORM = (
    _plain("layers/attn/q_norm/scale", _L + "self_attn.q_norm.weight", "H", when="qk_norm"),
    _plain("layers/attn/k_norm/scale", _L + "self_attn.k_norm.weight", "H", when="qk_norm"),
)

# One table per family. Rows whose ``when`` is false for a config simply do not exist for it.
TABLES: dict[str, tuple[Row, ...]] = {
    "llama": _BASE,
    "qwen2": _BASE + _QKV_BIAS,
    "qwen3": _BASE + _QK_NORM,
}
# HF names that are buffers rather than parameters; ignored on read (see module docstring).
_IGNORED_HF = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
_EMBED_HF = "model.embed_tokens.weight"
_LM_HEAD_HF = "lm_head.weight"


class MappingError(ValueError):
    """A checkpoint does not match the parameter table of its model family."""


def table(cfg: Any) -> tuple[Row, ...]:
    """The rows of ``cfg.model_type``'s table that exist for this config."""
    try:
        rows = TABLES[cfg.model_type]
    except KeyError:
        raise MappingError(
            f"unsupported model_type {cfg.model_type!r}; supported: {sorted(TABLES)}"
        ) from None
    return tuple(r for r in rows if _CONDITIONS[r.when](cfg))


def _dims(cfg: Any, letters: str) -> tuple[int, ...]:
    """Resolves e.g. "N H" or "N*H" to integer sizes."""
    out = []
    for token in letters.split():
        out.append(math.prod(int(getattr(cfg, _DIM_FIELDS[c])) for c in token.split("*")))
    return tuple(out)


def ours_shape(row: Row, cfg: Any) -> tuple[int, ...]:
    """Our (einsum layout) shape of one tensor of ``row`` (one layer's slice for per-layer rows)."""
    return _dims(cfg, row.dims_in) + _dims(cfg, row.dims_out)


def stacked_shape(row: Row, cfg: Any) -> tuple[int, ...]:
    """The shape of our stored array for ``row``: ``[L, *ours_shape]`` for per-layer rows."""
    lead = (int(cfg.num_layers),) if row.per_layer else ()
    return lead + ours_shape(row, cfg)


def flat_shapes(cfg: Any) -> dict[str, tuple[int, ...]]:
    """Our path -> stored shape for every parameter of ``cfg`` (table order)."""
    return {row.ours: stacked_shape(row, cfg) for row in table(cfg)}


def take(flat: Mapping[str, Any], entry: Entry) -> Any:
    """The tensor of ``entry`` from our flat params (a layer's slice of a stacked array; a view for numpy)."""
    x = flat[entry.ours]
    return x if entry.layer is None else x[entry.layer]


def hf_shape(row: Row, cfg: Any) -> tuple[int, ...]:
    """HF shape of ``row``: ``[prod(out), prod(in)]`` for linear rows."""
    if row.kind == "linear":
        return (math.prod(_dims(cfg, row.dims_out)), math.prod(_dims(cfg, row.dims_in)))
    return _dims(cfg, row.hf_dims)


def expand(cfg: Any) -> list[Entry]:
    """One `Entry` per HF tensor of ``cfg``, layers expanded, in table order."""
    out = []
    for row in table(cfg):
        layers = range(int(cfg.num_layers)) if row.per_layer else (None,)
        for i in layers:
            out.append(Entry(row, row.ours, i, row.hf.format(i=i)))
    return out


def _check_shape(name: str, got: tuple[int, ...], want: tuple[int, ...], side: str) -> None:
    if tuple(got) != tuple(want):
        raise MappingError(f"{side} tensor {name!r} has shape {tuple(got)}, expected {tuple(want)}")


def to_ours(row: Row, x: np.ndarray, cfg: Any) -> np.ndarray:
    """Converts one HF tensor to our layout (new contiguous array; HF ``[out, in]`` -> ``[*in, *out]``)."""
    if row.kind == "linear":
        return np.ascontiguousarray(x.T).reshape(ours_shape(row, cfg))
    return np.array(x).reshape(ours_shape(row, cfg))


def to_hf(row: Row, x: np.ndarray, cfg: Any) -> np.ndarray:
    """Converts one of our tensors to the HF layout (new contiguous array)."""
    if row.kind == "linear":
        n_in = math.prod(_dims(cfg, row.dims_in))
        return np.ascontiguousarray(x.reshape(n_in, -1).T)
    return np.array(x).reshape(hf_shape(row, cfg))


def _cast(x: np.ndarray, dtype: Any) -> np.ndarray:
    return x if dtype is None or x.dtype == np.dtype(dtype) else x.astype(dtype)


def hf_to_flat(hf: Mapping[str, Any], cfg: Any, dtype: Any = None) -> dict[str, np.ndarray]:
    """Converts HF tensors (name -> array) into our flat params (path -> array).

    Reads one tensor at a time from ``hf`` (which may be a lazy mapping over safetensors files),
    so conversion holds at most the output plus one tensor in flight.

    Args:
      hf: HF parameter name -> array-like (numpy, or anything ``np.asarray`` accepts).
      cfg: a ``ModelConfig`` (its ``model_type``, sizes, ``tie_word_embeddings``, ``qkv_bias``,
        ``qk_norm`` select and size the rows).
      dtype: cast every tensor to this dtype (None keeps the stored dtype).

    Returns:
      ``{our_path: np.ndarray}`` in our einsum layouts.

    Raises:
      MappingError: unknown model_type, a missing or unexpected tensor, a shape mismatch, or a tied
        model whose ``lm_head.weight`` differs from the embedding.
    """
    entries = expand(cfg)
    expected = {e.hf for e in entries}
    extra = [k for k in hf if k not in expected and not _IGNORED_HF.match(k)]
    if cfg.tie_word_embeddings and _LM_HEAD_HF in extra:
        # Tied checkpoints sometimes still carry lm_head.weight; accept it only if it is the embedding.
        if _EMBED_HF in hf and not np.array_equal(np.asarray(hf[_LM_HEAD_HF]), np.asarray(hf[_EMBED_HF])):
            raise MappingError(
                f"config has tie_word_embeddings=True but {_LM_HEAD_HF!r} differs from {_EMBED_HF!r}; "
                "set tie_word_embeddings=false in config.json or drop the tensor"
            )
        extra.remove(_LM_HEAD_HF)
    if extra:
        raise MappingError(
            f"{len(extra)} unexpected tensor(s) for model_type={cfg.model_type!r} "
            f"(tie_word_embeddings={cfg.tie_word_embeddings}, qkv_bias={cfg.qkv_bias}, "
            f"qk_norm={cfg.qk_norm}, num_layers={cfg.num_layers}): {sorted(extra)[:10]}"
        )
    missing = [k for k in sorted(expected) if k not in hf]
    if missing:
        raise MappingError(f"{len(missing)} tensor(s) missing from the checkpoint: {missing[:10]}")
    flat: dict[str, np.ndarray] = {}
    for row, ours, layer, hf_name in entries:
        x = np.asarray(hf[hf_name])
        _check_shape(hf_name, x.shape, hf_shape(row, cfg), "HF")
        y = _cast(to_ours(row, x, cfg), dtype)
        if layer is None:
            flat[ours] = y
        else:  # filled layer by layer: the stacked array is the only full-size copy
            if ours not in flat:
                flat[ours] = np.empty(stacked_shape(row, cfg), y.dtype)
            flat[ours][layer] = y
        del x, y
    if len(flat) != len(table(cfg)):  # Guards against two rows mapping to one path.
        raise MappingError(f"internal: {len(table(cfg))} rows mapped onto {len(flat)} paths")
    return flat


def flat_to_hf(flat: Mapping[str, Any], cfg: Any, dtype: Any = None) -> Iterator[tuple[str, np.ndarray]]:
    """Streams our flat params as ``(hf_name, np.ndarray)`` pairs, one tensor at a time.

    Key sets are validated before the first tensor is yielded, so a consumer never sees a partial
    stream because of a naming problem. Tied models yield no ``lm_head.weight`` (HF and vLLM tie it
    to the embedding themselves).

    Args:
      flat: our path -> array (numpy or jax arrays; jax arrays are fetched per tensor).
      cfg: the ``ModelConfig``.
      dtype: cast each yielded tensor to this dtype (None keeps the dtype).

    Yields:
      ``(hf_name, array)`` in table order, arrays contiguous in HF layout.

    Raises:
      MappingError: unknown model_type, a missing or unexpected path, or a shape mismatch.
    """
    entries = expand(cfg)
    shapes = flat_shapes(cfg)
    extra = sorted(k for k in flat if k not in shapes)
    unstacked = [k for k in extra if re.match(r"^layers/\d+/", k)]
    if unstacked:
        raise MappingError(
            f"parameter paths {unstacked[:3]} use the per-layer layout of older checkpoints; restack them "
            "with atlas_jax.models.params.stack_layers(flat, num_layers) (build_model and checkpoint loading "
            "do this automatically)"
        )
    if extra:
        raise MappingError(
            f"{len(extra)} unexpected parameter path(s) for model_type={cfg.model_type!r} "
            f"(tie_word_embeddings={cfg.tie_word_embeddings}): {extra[:10]}"
        )
    missing = sorted(set(shapes) - set(flat))
    if missing:
        raise MappingError(f"{len(missing)} parameter path(s) missing: {missing[:10]}")
    for ours, shape in shapes.items():
        _check_shape(ours, tuple(np.shape(flat[ours])), shape, "parameter")
    for entry in entries:
        yield entry.hf, _cast(to_hf(entry.row, np.asarray(take(flat, entry)), cfg), dtype)


def hf_shapes(cfg: Any) -> dict[str, tuple[int, ...]]:
    """HF name -> HF shape for every tensor ``flat_to_hf`` emits for ``cfg``."""
    return {e.hf: hf_shape(e.row, cfg) for e in expand(cfg)}
