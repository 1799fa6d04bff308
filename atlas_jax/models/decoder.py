"""`Decoder`: the Qwen3 / Qwen2 / Llama decoder-only transformer as an NNX module (contract in docs/internals.md)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from atlas_jax.kernels.cpu_matmul import PackedWeight, columns, matmul
from atlas_jax.models.attention import PAD_SEGMENT
from atlas_jax.models.config import REMAT_POLICIES, ModelConfig
from atlas_jax.models.kv_cache import KVCache
from atlas_jax.models.layers import (
    MLP,
    Attention,
    AttentionContext,
    RMSNorm,
    einsum,
    rope_cos_sin,
    rope_inv_freq,
)
from atlas_jax.models.sharding import LOGICAL_AXES_KEY, constrain, param

_ACT_BTD = ("batch", "length", "act_embed")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TransposedTable:
    """An embedding table ``E[V, D]`` stored as ``dv = Eᵀ [D, V]`` (a pytree; the value of ``embed/embedding``).

    The JAX sampler's rollout copy on the CPU holds a tied table this way (`jax_sampler.decode_layout`): the
    unembedding ``h·Eᵀ`` is then ``h·dv``, the plain ``[contract, out]`` matmul, which XLA:CPU runs ~1.5x
    faster in fp32 at decode batch 16 on a 151,936 x 896 table (measured 35 -> 23 ms); the token lookup reads
    columns of ``dv``. `Decoder` accepts either form.
    """

    dv: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        """The table's logical shape ``(V, D)``."""
        return tuple(self.dv.shape[::-1])


class DecoderLayer(nnx.Module):
    """Pre-norm block: x += attn(norm(x)); x += mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pd, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pd, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x_btd, cos, sin, ctx: AttentionContext, kv=None, layer=0):
        attn_btd, kv = self.attn(self.input_norm(x_btd), cos, sin, ctx, kv, layer)
        x_btd = constrain(x_btd + attn_btd, _ACT_BTD)
        x_btd = constrain(x_btd + self.mlp(self.post_attn_norm(x_btd)), _ACT_BTD)
        return x_btd, kv


def remat_policy(name: str):
    """The ``jax.checkpoint`` policy of `config.REMAT_POLICIES` ``name``.

    "full" saves nothing (each layer's forward is recomputed in the backward pass); "save_dots" saves the outputs
    of matmuls without batch dimensions (the weight projections: recompute only norms, RoPE, attention and
    activations); "offload" saves the same values in host memory (``pinned_host``) instead of on the device.
    """
    policies = jax.checkpoint_policies
    if name == "full":
        return policies.nothing_saveable
    if name == "save_dots":
        return policies.dots_with_no_batch_dims_saveable
    if name == "offload":
        return policies.offload_dot_with_no_batch_dims("device", "pinned_host")
    raise ValueError(f"remat_policy={name!r}: expected one of {REMAT_POLICIES} (--config.model.remat_policy)")


def _stacked_layers(cfg: ModelConfig, rngs: nnx.Rngs) -> DecoderLayer:
    """One `DecoderLayer` whose every parameter has a leading ``[L]`` axis (logical axis "layers")."""

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(r: nnx.Rngs) -> DecoderLayer:
        return DecoderLayer(cfg, rngs=r)

    layers = make(rngs)
    for _, var in nnx.iter_graph(layers):
        if isinstance(var, nnx.Variable) and LOGICAL_AXES_KEY in var.get_metadata():
            var.set_metadata(**{LOGICAL_AXES_KEY: ("layers", *var.get_metadata()[LOGICAL_AXES_KEY])})
    return layers


def _map_variables(fn, state: nnx.State) -> nnx.State:
    """``state`` with each Variable's value (an array, or a tuple of per-layer arrays) replaced by ``fn(value)``."""
    return jax.tree.map(
        lambda v: v.replace(fn(v.get_value())), state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


class Decoder(nnx.Module):
    """Embedding -> L decoder layers -> final RMSNorm -> (tied or untied) unembedding.

    The layers are one stacked `DecoderLayer` (parameters ``layers/...`` of shape ``[L, ...]``) run under
    ``lax.scan``, so a layer is traced and compiled once whatever the depth (``cfg.scan_layers=False`` unrolls the
    same stacked parameters). With ``cfg.remat`` each layer is a ``jax.checkpoint`` with ``cfg.remat_policy``.

    Prefill and one-token decode are the same call: pass a `KVCache` and the tokens are written at ``cache.index``.
    Without a cache, the tokens attend causally to each other (the training path); there, ``segment_ids[B,T]``
    (packed SFT rows: 1, 2, … per example, 0 = padding) restrict attention to earlier tokens of the same segment,
    and ``positions`` should restart at 0 for each example.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pd = jnp.dtype(cfg.param_dtype)
        self.embed = _Embedding(cfg, rngs=rngs)
        self.layers = _stacked_layers(cfg, rngs)
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pd, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = _LMHead(cfg, rngs=rngs)

    def hidden_states(
        self,
        input_ids: Int[Array, "b t"],
        positions: Int[Array, "b t"],
        attention_mask: Array,
        cache: KVCache | None = None,
        segment_ids: Int[Array, "b t"] | None = None,
        *,
        prefill: bool = False,
    ) -> tuple[Float[Array, "b t d"], KVCache | None]:
        """Final-norm hidden states ``[B,T,D]`` (compute dtype) and the updated cache (None if none was given).

        Args:
          prefill: the given cache is empty (``index == 0``, the caller guarantees it): the tokens attend over
            themselves with the fused self-attention kernel (`attention.self_attention`) and are written into
            the cache; otherwise a call with a cache attends over every filled slot.

        Raises:
          ValueError: ``segment_ids`` together with a cache (packing is a training-path feature), or a KV-cache
            overflow detected outside jit.
        """
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        t = input_ids.shape[1]
        zero = jnp.zeros((), jnp.int32)
        real_bt = attention_mask.astype(jnp.bool_)
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids (packed rows) are only supported without a KVCache (training path)")
        seg = jnp.ones_like(input_ids, jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
        segment_bt = jnp.where(real_bt, seg, PAD_SEGMENT)
        if cache is None:
            ctx = AttentionContext(segment_bt, None, zero, prefill=False)
            kv = None
        else:
            index = cache.index
            if not isinstance(index, jax.core.Tracer) and int(index) + t > cache.max_len:
                # Only checkable outside jit; inside, dynamic_update_slice would clamp and corrupt the cache.
                raise ValueError(
                    f"KVCache overflow: index {int(index)} + {t} tokens > max_len {cache.max_len}"
                )
            slot_mask = jax.lax.dynamic_update_slice(cache.mask, real_bt, (zero, index))
            ctx = AttentionContext(segment_bt, slot_mask, index, prefill=prefill)
            kv = (cache.k, cache.v)
        cos, sin = rope_cos_sin(positions, rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
        # Gather from a replicated table (an explicit FSDP all-gather) rather than let the partitioner
        # replicate the vocab/embed-sharded table implicitly for the batch-sharded lookup.
        table = self.embed.embedding.get_value()
        if isinstance(table, PackedWeight):  # Eᵀ packed for the CPU kernels (rollout copy)
            x_btd = columns(table, input_ids)
        elif isinstance(table, TransposedTable):
            table_dv = constrain(table.dv, ("act_embed", "act_vocab"))
            x_btd = jnp.moveaxis(jnp.take(table_dv, input_ids, axis=1), 0, -1)
        else:
            x_btd = constrain(table, ("act_vocab", "act_embed"))[input_ids]
        x_btd = constrain(x_btd.astype(dtype), _ACT_BTD)
        x_btd, kv = self._run_layers(x_btd, cos, sin, ctx, kv)
        hidden = self.final_norm(x_btd)
        if cache is None:
            return hidden, None
        return hidden, KVCache(k=kv[0], v=kv[1], mask=ctx.slot_mask_bs, index=cache.index + t)

    def _run_layers(self, x_btd, cos, sin, ctx: AttentionContext, kv):
        """Applies the L layers: ``lax.scan`` over the stacked parameters (carry: activations and cache).

        A Variable of ``self.layers`` may hold a tuple of ``L`` per-layer arrays instead of one ``[L, ...]``
        array (the sampler's rollout copy, `jax_sampler.decode_layout`): with a per-layer cache the
        unrolled loop picks layer ``i``'s array (no slice of a stacked weight per step); otherwise the
        tuples are stacked.
        """
        cfg = self.cfg
        graphdef, state = nnx.split(self.layers)

        def body(carry, xs):
            x, kv = carry
            layer_state, i = xs
            x, kv = nnx.merge(graphdef, layer_state)(x, cos, sin, ctx, kv, i)
            return (x, kv), None

        if cfg.remat:
            body = jax.checkpoint(
                body, policy=remat_policy(cfg.remat_policy), prevent_cse=not cfg.scan_layers
            )
        layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
        if kv is not None and isinstance(kv[0], tuple):  # per-layer cache: unrolled, each buffer in place
            ks, vs = list(kv[0]), list(kv[1])
            for i in range(cfg.num_layers):
                layer_state = _map_variables(lambda x, i=i: x[i], state)
                (x_btd, (ks[i], vs[i])), _ = body((x_btd, (ks[i], vs[i])), (layer_state, None))
            return x_btd, (tuple(ks), tuple(vs))
        state = _map_variables(
            lambda x: jax.tree.map(lambda *a: jnp.stack(a), *x) if isinstance(x, tuple) else x, state
        )
        if cfg.scan_layers:
            (x_btd, kv), _ = jax.lax.scan(body, (x_btd, kv), (state, layer_ids))
            return x_btd, kv
        for i in range(cfg.num_layers):  # unrolled: every layer traced and compiled separately
            (x_btd, kv), _ = body((x_btd, kv), jax.tree.map(lambda a, i=i: a[i], (state, layer_ids)))
        return x_btd, kv

    def unembed(self, hidden: Float[Array, "b t d"]) -> Float[Array, "b t v"]:
        """Float32 logits: hidden · Eᵀ (tied; ``hidden · dv`` for a `TransposedTable`) or hidden · W_lm_head.

        A `PackedWeight` table (``Eᵀ`` packed) or head goes to the CPU kernels (`cpu_matmul.matmul`).
        """
        dtype = jnp.dtype(self.cfg.dtype)
        w = (
            self.embed.embedding.get_value()
            if self.cfg.tie_word_embeddings
            else self.lm_head.kernel.get_value()
        )
        if isinstance(w, PackedWeight):
            return matmul(hidden.astype(dtype), w)
        if self.cfg.tie_word_embeddings:
            if isinstance(w, TransposedTable):
                spec, w = "btd,dv->btv", w.dv
            else:
                spec = "btd,vd->btv"
        else:
            spec, w = "btd,dv->btv", self.lm_head.kernel.get_value()
        # `einsum`'s backward keeps the logits' cotangent in ``dtype`` (f32 accumulation), as for every other
        # product; JAX's own transpose of an f32-accumulating product ran both gradient products in f32.
        return einsum(spec, hidden, w, dtype, jnp.float32)

    def __call__(
        self,
        input_ids: Int[Array, "b t"],
        positions: Int[Array, "b t"],
        attention_mask: Array,
        cache: KVCache | None = None,
        segment_ids: Int[Array, "b t"] | None = None,
    ) -> tuple[Float[Array, "b t v"], KVCache | None]:
        """Logits ``[B,T,V]`` in float32 and the updated cache (``segment_ids``: see ``hidden_states``)."""
        hidden, cache = self.hidden_states(input_ids, positions, attention_mask, cache, segment_ids)
        return self.unembed(hidden), cache


class _Embedding(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(stddev=0.02)
        self.embedding = param(
            init,
            rngs.params(),
            (cfg.vocab_size, cfg.hidden_size),
            jnp.dtype(cfg.param_dtype),
            ("vocab", "embed"),
        )


class _LMHead(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(stddev=0.02)
        self.kernel = param(
            init,
            rngs.params(),
            (cfg.hidden_size, cfg.vocab_size),
            jnp.dtype(cfg.param_dtype),
            ("embed", "vocab"),
        )


__all__ = ["Decoder", "DecoderLayer", "TransposedTable", "remat_policy"]
