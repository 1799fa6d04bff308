"""Hand our parameters to a torch-based engine (vLLM) without a disk round trip.

Three small pieces, each usable alone:

* ``flat_params(params)``: our parameter pytree (flat dict, nested dict, ``nnx.State`` or module) ->
  ``{"a/b/c": array}``.
* ``hf_tensors(flat, cfg)``: streams ``(hf_name, torch.Tensor)`` in HF layout. HF names, shapes and
  the set of tensors come from ``converters.mapping`` (the one table used for load, export and push).
  On CPU each tensor is a *view* of our buffer: HF layout of a ``linear`` row is a transpose of ours,
  which numpy and torch express as strides, so the only copy is the one vLLM makes into its own
  (pre-packed) weights. On an accelerator the layout change runs on the device and the result is
  handed over with DLPack (no host round trip).
* ``serialize`` / ``deserialize``: the same stream as safetensors bytes, for pushing to a server.

``push_to_vllm`` is the in-worker step for a running vLLM: ``model_runner.reload_weights`` with the
stream, then re-packing the tied ``lm_head`` (on CPU, vLLM pre-packs weights for its GEMM kernels;
a tied head shares the embedding's storage but keeps its own packed copy, which ``reload_weights``
does not refresh because the checkpoint has no ``lm_head.weight``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from converters import mapping


def flat_params(params: Any) -> dict[str, Any]:
    """``{"embed/embedding": array, ...}`` from a flat dict, nested dict, ``nnx.State`` or ``nnx.Module``.

    Raises:
      TypeError: ``params`` is none of those.
    """
    if isinstance(params, Mapping) and all(isinstance(k, str) and "/" in k for k in params):
        return dict(params)
    try:
        from flax import nnx

        from atlas_jax.models import params as model_params
    except ImportError as e:  # pragma: no cover - flax is a core dependency
        raise TypeError(f"cannot flatten params of type {type(params).__name__}: {e}") from e
    if isinstance(params, nnx.Module | nnx.State):
        return model_params.flatten(params)
    if isinstance(params, Mapping):
        out: dict[str, Any] = {}

        def walk(prefix: str, node: Any) -> None:
            if isinstance(node, Mapping):
                for k, v in node.items():
                    walk(f"{prefix}/{k}" if prefix else str(k), v)
            else:
                out[prefix] = node

        walk("", params)
        return out
    raise TypeError(
        f"params must be a flat dict ('a/b/c' -> array), a nested dict, an nnx.State or an nnx.Module; "
        f"got {type(params).__name__}"
    )


def _on_accelerator(x: Any) -> bool:
    devices = getattr(x, "devices", None)
    if devices is None:
        return False
    return any(d.platform != "cpu" for d in devices())


def to_torch(x: Any) -> torch.Tensor:
    """Zero-copy hand-over of one array to torch.

    numpy and CPU JAX arrays go through ``np.asarray`` (a view of the JAX buffer) and
    ``torch.from_numpy`` (shares memory, strides kept); accelerator JAX arrays go through DLPack and
    stay on their device. bfloat16 numpy arrays (ml_dtypes) are reinterpreted bit for bit.
    """
    if _on_accelerator(x):
        return torch.from_dlpack(x)
    a = np.asarray(x)
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
    with warnings.catch_warnings():
        # JAX's host views are read-only and torch warns about that; vLLM only reads them.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a)


def _hf_layout(row: mapping.Row, x: Any, cfg: Any) -> Any:
    """Our tensor in HF layout without a copy where possible (a transposed view for linear rows).

    Same layout as ``mapping.to_hf`` (tests check equality tensor by tensor), minus its copy.
    """
    if row.kind == "linear":
        n_in = math.prod(np.shape(x)[: len(row.dims_in.split())])
        return x.reshape(n_in, -1).T
    return x.reshape(mapping.hf_shape(row, cfg))


def hf_tensors(
    flat: Mapping[str, Any], cfg: Any, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Streams ``(hf_name, tensor)`` for every parameter, validated against ``cfg``'s mapping table.

    The key set and every shape are checked *now*, before this returns (``mapping.flat_to_hf``'s
    checks), so a consumer never sees a partial stream because of a naming problem.

    Args:
      flat: our path -> array (numpy, or JAX arrays on any device).
      cfg: the ``ModelConfig``.
      dtype: cast to this torch dtype (a copy; None keeps the stored dtype and copies nothing on CPU).

    Returns:
      An iterator of ``(hf_name, torch.Tensor)``; CPU tensors share memory with ``flat`` when no cast
      is needed.

    Raises:
      mapping.MappingError: missing/unexpected paths or shape mismatches.
    """
    validator = mapping.flat_to_hf(flat, cfg)  # Validates keys and shapes on its first step.
    try:
        next(validator)
    finally:
        validator.close()

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        for entry in mapping.expand(cfg):
            x = flat[entry.ours]
            if not _on_accelerator(x):
                x = np.asarray(x)
            if entry.layer is not None:  # one layer of a stacked array (a view on CPU)
                x = x[entry.layer]
            t = to_torch(_hf_layout(entry.row, x, cfg))
            if dtype is not None and t.dtype != dtype:
                t = t.to(dtype)
            yield entry.hf, t

    return stream()


def check_hf_shapes(shapes: Mapping[str, Sequence[int]], cfg: Any, where: str = "weights") -> None:
    """Checks that HF-named tensors are exactly ``cfg``'s set with the right shapes.

    Raises:
      mapping.MappingError: naming the missing, unexpected or mis-shaped tensors and ``where``.
    """
    want = mapping.hf_shapes(cfg)
    extra = sorted(set(shapes) - set(want))
    missing = sorted(set(want) - set(shapes))
    if extra or missing:
        raise mapping.MappingError(
            f"{where}: tensor names do not match model_type={cfg.model_type!r} "
            f"(unexpected {extra[:5]}, missing {missing[:5]})"
        )
    bad = [
        f"{k} {tuple(shapes[k])} (expected {want[k]})" for k in sorted(want) if tuple(shapes[k]) != want[k]
    ]
    if bad:
        raise mapping.MappingError(f"{where}: shape mismatch: {bad[:5]}")


def serialize(tensors: Iterable[tuple[str, torch.Tensor]]) -> bytes:
    """safetensors bytes of a ``(name, tensor)`` stream (tensors moved to CPU and made contiguous)."""
    from safetensors.torch import save

    return save({name: t.detach().cpu().contiguous() for name, t in tensors})


def deserialize(data: bytes) -> dict[str, torch.Tensor]:
    """Inverse of ``serialize``.

    Raises:
      ValueError: ``data`` is not a safetensors payload.
    """
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as e:  # safetensors raises its own SafetensorError
        raise ValueError(f"weight payload is not valid safetensors ({len(data)} bytes): {e}") from e


def push_to_vllm(worker: Any, tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Loads HF-named tensors into a running vLLM worker's model in place (runs inside the worker).

    Args:
      worker: the vLLM worker (``collective_rpc`` passes it as the first argument).
      tensors: ``(hf_name, tensor)`` pairs in the checkpoint format.

    Returns:
      The number of tensors consumed.
    """
    count = 0

    def counted() -> Iterator[tuple[str, torch.Tensor]]:
        nonlocal count
        for item in tensors:
            count += 1
            yield item

    runner = worker.model_runner
    runner.reload_weights(weights_iterator=counted())
    model = runner.get_model()
    lm_head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if lm_head is not None and embed is not None and lm_head.weight.data_ptr() == embed.weight.data_ptr():
        # Tied head: refresh its packed GEMM copy from the (reloaded) shared embedding storage.
        lm_head.quant_method.process_weights_after_loading(lm_head)
    return count
