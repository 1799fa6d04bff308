"""`Decoder`: the Qwen3 / Qwen2 / Llama decoder-only transformer as an NNX module (contract in docs/internals.md)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from atlas_jax.models.config import ModelConfig
from atlas_jax.models.kv_cache import KVCache
from atlas_jax.models.layers import MLP, Attention, RMSNorm, rope_cos_sin, rope_inv_freq
from atlas_jax.models.sharding import constrain, param

_ACT_BTD = ("batch", "length", "act_embed")


class DecoderLayer(nnx.Module):
    """Pre-norm block: x += attn(norm(x)); x += mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pd, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pd, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x_btd, cos, sin, k_cache, v_cache, slot_mask, index, pair_mask=None):
        attn_btd, k_cache, v_cache = self.attn(
            self.input_norm(x_btd), cos, sin, k_cache, v_cache, slot_mask, index, pair_mask
        )
        x_btd = constrain(x_btd + attn_btd, _ACT_BTD)
        x_btd = constrain(x_btd + self.mlp(self.post_attn_norm(x_btd)), _ACT_BTD)
        return x_btd, k_cache, v_cache


def _layer_call(layer: DecoderLayer, *args):
    return layer(*args)


_remat_layer_call = nnx.remat(_layer_call)


class Decoder(nnx.Module):
    """Embedding -> L decoder layers -> final RMSNorm -> (tied or untied) unembedding.

    Prefill and one-token decode are the same call: pass a `KVCache` and the tokens are written at ``cache.index``.
    Without a cache, a temporary one of length T is used (plain causal attention over the real tokens); there,
    ``segment_ids[B,T]`` (packed SFT rows: 1, 2, … per example, 0 = padding) restrict attention to earlier tokens
    of the same segment, and ``positions`` should restart at 0 for each example.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pd = jnp.dtype(cfg.param_dtype)
        self.embed = _Embedding(cfg, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
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
    ) -> tuple[Float[Array, "b t d"], KVCache | None]:
        """Final-norm hidden states ``[B,T,D]`` (compute dtype) and the updated cache (None if none was given).

        Raises:
          ValueError: ``segment_ids`` together with a cache (packing is a training-path feature), or a KV-cache
            overflow detected outside jit.
        """
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        b, t = input_ids.shape
        zero = jnp.zeros((), jnp.int32)
        pair_mask = None
        if segment_ids is not None:
            if cache is not None:
                raise ValueError(
                    "segment_ids (packed rows) are only supported without a KVCache (training path)"
                )
            pair_mask = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B,T,S]: same example
        if (
            cache is None
        ):  # no stacked [L,...] buffers: each layer attends over its own T keys (training path)
            index = zero
            slot_mask = attention_mask.astype(jnp.bool_)
            kv_shape = (b, t, cfg.num_kv_heads, cfg.head_dim)
        else:
            index = cache.index
            if not isinstance(index, jax.core.Tracer) and int(index) + t > cache.max_len:
                # Only checkable outside jit; inside, dynamic_update_slice would clamp and corrupt the cache.
                raise ValueError(
                    f"KVCache overflow: index {int(index)} + {t} tokens > max_len {cache.max_len}"
                )
            slot_mask = jax.lax.dynamic_update_slice(
                cache.mask, attention_mask.astype(jnp.bool_), (zero, index)
            )
            k_all, v_all = cache.k, cache.v
        cos, sin = rope_cos_sin(positions, rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
        # Gather from a replicated table (an explicit FSDP all-gather) rather than let the partitioner
        # replicate the vocab/embed-sharded table implicitly for the batch-sharded lookup.
        table_vd = constrain(self.embed.embedding.get_value(), ("act_vocab", "act_embed"))
        x_btd = constrain(table_vd[input_ids].astype(dtype), _ACT_BTD)
        call = _remat_layer_call if cfg.remat else _layer_call
        for i, layer in enumerate(self.layers):
            if cache is None:
                k_i = v_i = jnp.zeros(kv_shape, dtype)
            else:
                k_i, v_i = k_all[i], v_all[i]
            x_btd, k_i, v_i = call(layer, x_btd, cos, sin, k_i, v_i, slot_mask, index, pair_mask)
            if cache is not None:  # written back in place under jit (donate the cache)
                k_all = k_all.at[i].set(k_i)
                v_all = v_all.at[i].set(v_i)
        hidden = self.final_norm(x_btd)
        if cache is None:
            return hidden, None
        return hidden, KVCache(k=k_all, v=v_all, mask=slot_mask, index=index + t)

    def unembed(self, hidden: Float[Array, "b t d"]) -> Float[Array, "b t v"]:
        """Float32 logits: hidden · Eᵀ (tied) or hidden · W_lm_head."""
        dtype = jnp.dtype(self.cfg.dtype)
        if self.cfg.tie_word_embeddings:
            w = self.embed.embedding.get_value()
            out = jnp.einsum(
                "btd,vd->btv", hidden.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32
            )
        else:
            w = self.lm_head.kernel.get_value()
            out = jnp.einsum(
                "btd,dv->btv", hidden.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32
            )
        return out

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


__all__ = ["Decoder", "DecoderLayer"]
