"""The embedded JAX sampler: batched prefill + KV-cache decode of the policy itself (the default engine).

On-policy by construction. Built from an ``nnx.Module`` it reads ``nnx.state(model)`` at every
``generate`` call, so it always samples from the module's *current* weights (an optimizer step that
updates the module in place is seen by the next rollout). Built from ``(graphdef, state)`` it keeps a
reference to ``state``; ``update_weights(params)`` swaps that reference (an ``nnx.State``, a live module,
or a flat ``{"a/b/c": array}`` dict) after checking paths and shapes. The trainer's buffers are never
donated.

Rollout layout. Decoding from the training layout would cast every fp32 master weight to the compute
dtype at every token and, under FSDP, all-gather every weight at every token. So the sampler decodes from
a *rollout copy* (`rollout_copy`): weight matrices cast to ``cfg.dtype``, everything resharded with
`DECODE_RULES` (tensor-parallel over the mesh's ``tensor`` axis, replicated over ``data``/``fsdp``), the
stacked ``[L, ...]`` layer parameters split into ``L`` per-layer arrays (`decode_layout`: a step then slices
no weights), on the CPU a tied embedding table stored transposed (`TransposedTable`), and on one AVX-512 CPU
device in bf16 or fp32 every weight matrix packed for our CPU matmul kernels (`packs_weights`,
`kernels.cpu_matmul`: 1.2-1.8x the decode throughput of XLA's dots on the bench shapes). The copy is
rebuilt whenever the parameters it was made from change (``update_weights``, or new arrays in a live module:
checked by identity at each ``generate``) and reused otherwise; ``reshard_seconds`` is the time the last
rebuild took (0.0 when reused), logged per GRPO step as ``time/reshard``. It costs one model in the compute
dtype of memory; ``rollout_copy=False`` decodes from the parameters as they are.

Compilation. Shapes are bucketed so repeated calls reuse two compiled programs per bucket:
prompts per call and prompt length round up to powers of two (min 1 and ``prompt_bucket``), ``max_tokens``
to a power of two (min 16; the exact limit is a traced scalar). Rows (``prompts x n``), not prompts, are
padded to a multiple of the mesh's batch shards. Padding rows hold one dummy token and start finished. Prompts are left-padded; positions count from 0 at each row's first real token. The programs
belong to the architecture, not the engine: samplers with an equal graphdef and mesh (teacher and student
of one shape, successive checkpoints) share them (`compiled_programs`), so only the first one compiles.

Decode. ``prefill`` runs the prompts once (``n`` samples share one prefill: the cache is repeated along the
batch), samples token 0, and returns a `DecodeState`. ``decode`` runs a ``lax.while_loop`` of one-token
steps until ``step == limit`` or every row has finished, with the state donated (the cache is updated in
place). Without stop strings one ``decode`` call does the whole generation and the host syncs once; with
stop strings the host checks the decoded text every ``stop_check_every`` steps and finishes matching rows.
Sampling, log-probs and stop-token checks are fused into the step (see `sampling.Strategy`); tokens and
log-probs are gathered on device and fetched once per call.

Randomness. Row ``r = (row_offset + prompt_index) * n + sample_index`` draws ``u = uniform(fold_in(fold_in(
key(seed), r), step))``, so a fixed seed gives the same samples, the ``n`` samples of a prompt are independent,
and a host's share of a batch (``SamplingParams.row_offset``) samples what the whole batch would.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from atlas_jax import distributed
from atlas_jax.engines.base import Completion, Engine, Prompt, SamplingParams
from atlas_jax.engines.sampling import Strategy
from atlas_jax.kernels import cpu_matmul
from atlas_jax.models.decoder import TransposedTable
from atlas_jax.models.kv_cache import KVCache
from atlas_jax.models.params import flatten, unflatten
from atlas_jax.models.sharding import LOGICAL_AXES_KEY, RULES, spec_for

_MAX_STOP_IDS = 8  # stop-id vector is padded to a multiple of this (static shape)

# The rollout copy's layout: the training rules without FSDP (the model dimension is replicated), so decode
# steps never all-gather weights; heads / MLP / vocab stay sharded over "tensor" (within a host).
DECODE_RULES: dict[str, tuple[str, ...] | None] = {**RULES, "embed": None}


class DecodeState(NamedTuple):
    """Everything the decode loop carries (``B`` rows, ``M`` the max_tokens bucket).

    Attributes:
      cache: the KV cache (prompt + generated tokens).
      tokens: ``[B, M]`` sampled tokens; ``tokens[:, :step]`` are written (pad after a row finished).
      logprobs: ``[B, M]`` log-probabilities of ``tokens`` (0 after a row finished).
      step: number of tokens sampled so far.
      positions: ``[B]`` position of the last sampled token (the next input).
      done: ``[B]`` row has finished (stop token, ``max_tokens``, stop string, or bucket padding).
      lengths: ``[B]`` tokens kept per row (a trailing stop token included).
      uniforms: ``[B, M]`` the draw's uniform for each row and step (``uniform(fold_in(key_b, step))`` with
        ``key_b`` the row's PRNG key), made once at prefill: one vectorised threefry instead of two small loops
        inside every decode step.
    """

    cache: KVCache
    tokens: jax.Array
    logprobs: jax.Array
    step: jax.Array
    positions: jax.Array
    done: jax.Array
    lengths: jax.Array
    uniforms: jax.Array


def bucket(x: int, minimum: int) -> int:
    """Smallest power of two ``>= max(x, minimum)``."""
    v = max(int(x), int(minimum), 1)
    return 1 << (v - 1).bit_length()


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _stacked(path: tuple) -> bool:
    """A decoder-layer parameter (``layers/...``: leading ``[L]`` axis in the model's own layout)."""
    return bool(path) and getattr(path[0], "key", None) == "layers"


def _embedding(path: tuple) -> bool:
    """The token embedding table ``embed/embedding`` ``[V, D]``."""
    return tuple(getattr(p, "key", None) for p in path) == ("embed", "embedding")


def rollout_shardings(
    state: nnx.State, mesh: Mesh, *, transpose_table: bool = False, pack: bool = False, amx: bool = False
) -> nnx.State:
    """`NamedSharding` of each leaf of `decode_layout` ``(state, ..., transpose_table, pack)`` under `DECODE_RULES`.

    A decoder-layer Variable gets a tuple of ``L`` per-layer shardings (its logical axes without "layers"), a
    transposed table a `TransposedTable` of the reversed axes; leaves without logical axes replicate, and so
    does a packed weight (`cpu_matmul.PackedWeight`: only made for one device).
    """
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape, strict=True))

    def sharding(axes, shape) -> NamedSharding:
        spec = PartitionSpec() if axes is None else spec_for(axes, shape, sizes, DECODE_RULES)
        return NamedSharding(mesh, spec)

    def one(path: tuple, v: nnx.Variable) -> nnx.Variable:
        axes = v.get_metadata().get(LOGICAL_AXES_KEY)
        shape = v.get_value().shape
        if pack and (packed := _packing(path, v, bool(transpose_table))) is not None:
            contract, transpose = packed
            stacked = _stacked(path)
            one_shape = shape[1:] if stacked else shape
            one_shape = one_shape[::-1] if transpose else one_shape
            rep = cpu_matmul.PackedWeight(
                NamedSharding(mesh, PartitionSpec()), tuple(one_shape), contract, amx
            )
            return v.replace((rep,) * shape[0] if stacked else rep)
        if transpose_table and _embedding(path):
            return v.replace(TransposedTable(sharding(None if axes is None else axes[::-1], shape[::-1])))
        if not _stacked(path):
            return v.replace(sharding(axes, shape))
        layer = sharding(None if axes is None else axes[1:], shape[1:])
        return v.replace((layer,) * shape[0])

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=_is_variable)


def _castable(x: jax.Array, dtype: jnp.dtype) -> bool:
    """Matrices (ndim >= 2) not in ``dtype``: norm scales and biases stay as they are (tiny; the model
    applies norm scales in float32, so rounding them would change the numbers)."""
    return x.ndim >= 2 and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype


def _to_dtype(dtype: jnp.dtype):
    def cast(x: jax.Array) -> jax.Array:
        return x.astype(dtype) if _castable(x, dtype) else x

    return cast


def _platform(mesh: Mesh | None) -> str:
    """The platform the sampler runs on: the mesh's devices', else the default backend's."""
    return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


def transposes_table(cfg: Any, platform: str) -> bool:
    """The rollout copy stores the embedding table transposed (`TransposedTable`): a tied table on the CPU."""
    return bool(cfg.tie_word_embeddings) and platform == "cpu"


def packs_weights(cfg: Any, mesh: Mesh | None) -> bool:
    """The rollout copy packs its weight matrices for the CPU matmul kernels (`cpu_matmul.enabled`)."""
    return cpu_matmul.enabled(_platform(mesh), cfg.dtype, 1 if mesh is None else mesh.devices.size)


def _packing(path: tuple, v: nnx.Variable, tied: bool) -> tuple[int, bool] | None:
    """``(contract, transpose)`` when `decode_layout` with ``pack`` packs this Variable, else None.

    Packed: every projection ``.../kernel`` whose logical axes start or end with "embed" (input axes first:
    ``embed -> ...`` contracts 1 axis, ``... -> embed`` all but the last), and the embedding table when
    ``tied`` (as ``Eᵀ [D, V]``, the unembedding's operand; the lookup reads its columns).
    """
    axes = v.get_metadata().get(LOGICAL_AXES_KEY)
    if axes is None:
        return None
    axes = tuple(axes[1:]) if _stacked(path) else tuple(axes)
    if _embedding(path):
        return (1, True) if tied else None
    if getattr(path[-1], "key", None) != "kernel" or len(axes) < 2:
        return None
    if axes[0] == "embed":
        return 1, False
    if axes[-1] == "embed":
        return len(axes) - 1, False
    return None


def decode_layout(
    state: nnx.State, dtype: jnp.dtype | str, transpose_table: bool = False, pack: bool = False
) -> nnx.State:
    """``state`` laid out for decoding (a pure function; jit it): floating matrices cast to ``dtype``, each
    decoder-layer Variable holding a tuple of ``L`` per-layer arrays instead of one ``[L, ...]`` array, and
    with ``transpose_table`` the embedding table as a `TransposedTable` (`transposes_table`).

    With ``pack`` (bf16 or float32 ``dtype``, one AVX-512 CPU device: `packs_weights`) every projection kernel,
    and with ``transpose_table`` the tied table as ``Eᵀ``, is a `cpu_matmul.PackedWeight` in ``dtype`` instead
    (`_packing`): `Decoder` multiplies those with the CPU kernels.

    Why per-layer arrays: decoding from stacked parameters makes every layer of every step take a slice
    ``w[i]`` of each weight, and XLA:CPU materialises those slices (measured: 10 copies per layer per step,
    ~30% of a decode step of the peer model). Sliced once here, a step reads the arrays as they are.
    `Decoder` runs such a state like the model's own (`Decoder._run_layers`).
    """
    cast = _to_dtype(jnp.dtype(dtype))
    packer = functools.partial(cpu_matmul.pack, dtype=dtype, amx=pack and cpu_matmul.uses_amx(dtype))

    def one(path: tuple, v: nnx.Variable) -> nnx.Variable:
        x = v.get_value()
        if pack and (packed := _packing(path, v, bool(transpose_table))) is not None:
            contract, transpose = packed
            if transpose:
                return v.replace(packer(x.T, contract))
            if not _stacked(path):
                return v.replace(packer(x, contract))
            return v.replace(tuple(packer(x[i], contract) for i in range(x.shape[0])))
        if transpose_table and _embedding(path):
            return v.replace(TransposedTable(cast(x).T))
        if not _stacked(path):
            return v.replace(cast(x))
        return v.replace(tuple(cast(x[i]) for i in range(x.shape[0])))

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=_is_variable)


def rollout_copy(
    state: nnx.State,
    dtype: jnp.dtype | str,
    mesh: Mesh | None,
    *,
    transpose_table: bool = False,
    pack: bool = False,
) -> nnx.State:
    """The parameters the sampler decodes from: `decode_layout` of ``state``, laid out by `DECODE_RULES`.

    A new array per leaf (the source is never aliased or donated), made by one jitted program per layout,
    compiled once per process for each (structure, shapes, dtype, mesh): every engine and every refresh of
    one architecture reuses it.
    """
    return _rollout_copy_jit(state, jnp.dtype(dtype), mesh, bool(transpose_table), bool(pack))


def _decode_copy(state: nnx.State, cfg: Any, mesh: Mesh | None) -> nnx.State:
    """`rollout_copy` of ``state`` for a model of ``cfg`` on ``mesh`` (table transposed and weights packed
    where it pays), blocking."""
    transpose = transposes_table(cfg, _platform(mesh))
    pack = packs_weights(cfg, mesh)
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        return jax.block_until_ready(
            rollout_copy(state, cfg.dtype, mesh, transpose_table=transpose, pack=pack)
        )


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _rollout_copy_jit(
    state: nnx.State, dtype: jnp.dtype, mesh: Mesh | None, transpose_table: bool, pack: bool
):
    out = decode_layout(state, dtype, transpose_table, pack)
    if mesh is None:
        return out
    amx = pack and cpu_matmul.uses_amx(dtype)
    return jax.lax.with_sharding_constraint(
        out, rollout_shardings(state, mesh, transpose_table=transpose_table, pack=pack, amx=amx)
    )


def _uniforms(keys: jax.Array, step: jax.Array) -> jax.Array:
    return jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, step)))(keys)


def _all_uniforms(keys: jax.Array, steps: int) -> jax.Array:
    """``[B, steps]``: column ``s`` equals ``_uniforms(keys, s)`` bit for bit."""
    return jax.vmap(lambda s: _uniforms(keys, s), out_axes=1)(jnp.arange(steps, dtype=jnp.int32))


def _advance(st: DecodeState, tok, lp, max_tokens, stop_ids) -> DecodeState:
    """Writes the token sampled at ``st.step`` and updates lengths/done (finished rows write pad/0)."""
    tok = jnp.where(st.done, 0, tok).astype(jnp.int32)
    lp = jnp.where(st.done, 0.0, lp)
    tokens = jax.lax.dynamic_update_slice(st.tokens, tok[:, None], (0, st.step))
    logprobs = jax.lax.dynamic_update_slice(st.logprobs, lp[:, None], (0, st.step))
    lengths = jnp.where(st.done, st.lengths, st.step + 1)
    stopped = jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)
    done = st.done | stopped | (st.step + 1 >= max_tokens)
    return st._replace(tokens=tokens, logprobs=logprobs, lengths=lengths, done=done, step=st.step + 1)


def _shard(mesh: Mesh | None, x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    if mesh is None:
        return x
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape, strict=True))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec_for(axes, x.shape, sizes)))


def _prefill_impl(
    graphdef, mesh, counts, params, ids, mask, live, seed, max_tokens, stop_ids, row0,
    *, n, cache_len, max_new, strategy, row_multiple=1,
):  # fmt: skip
    counts["prefill"] += 1
    model = nnx.merge(graphdef, params)
    shard = functools.partial(_shard, mesh)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    cache_dtype = KVCache.storage_dtype(
        model.cfg.dtype, _platform(mesh)
    )  # f32 for bf16 on the CPU (see KVCache)
    cache = KVCache.init(model.cfg, ids.shape[0], cache_len, cache_dtype).split_layers()  # in-place updates
    hidden, cache = model.hidden_states(ids, positions, mask, cache, prefill=True)  # fresh cache: index 0
    b = -(-ids.shape[0] * n // row_multiple) * row_multiple  # rows padded to the mesh's batch shards
    # Rows r >= prompts * n (padding) repeat the last prompt and start finished.
    rep = functools.partial(jnp.repeat, repeats=n, total_repeat_length=b)
    rep0 = functools.partial(rep, axis=0)
    cache = KVCache(
        k=tuple(map(rep0, cache.k)), v=tuple(map(rep0, cache.v)), mask=rep0(cache.mask), index=cache.index
    )
    cache = jax.tree.map(shard, cache, cache.sharding_axes())
    live = rep(live, axis=0) & (jnp.arange(b) < ids.shape[0] * n)
    row = functools.partial(shard, axes=("batch",))
    rows = row0 + jnp.arange(b, dtype=jnp.uint32)
    keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.key(seed), r))(rows)
    logits = model.unembed(shard(rep(hidden[:, -1:], axis=0), ("batch", None, None)))[:, 0]
    uniforms = shard(_all_uniforms(keys, max_new), ("batch", None))
    tok, lp = strategy.sample(logits, uniforms[:, 0])
    st = DecodeState(
        cache=cache,
        tokens=shard(jnp.zeros((b, max_new), jnp.int32), ("batch", None)),
        logprobs=shard(jnp.zeros((b, max_new), jnp.float32), ("batch", None)),
        step=jnp.zeros((), jnp.int32),
        positions=row(rep(positions[:, -1] + 1, axis=0)),
        done=row(~live),
        lengths=row(jnp.zeros((b,), jnp.int32)),
        uniforms=uniforms,
    )
    return _advance(st, tok, lp, max_tokens, stop_ids)


def _decode_impl(graphdef, counts, params, st: DecodeState, limit, max_tokens, stop_ids, *, strategy):
    counts["decode"] += 1  # rows keep the sharding prefill gave them
    b = st.tokens.shape[0]
    ones = jnp.ones((b, 1), jnp.int32)

    def body(st: DecodeState) -> DecodeState:
        # Merged here with fresh Variables (copy=True; no array copies under jit): NNX transforms inside the
        # model (``nnx.remat`` layers, model.remat=True) refuse Variables made at an outer trace level.
        model = nnx.merge(graphdef, params, copy=True)
        last = jax.lax.dynamic_slice_in_dim(st.tokens, st.step - 1, 1, axis=1)
        hidden, cache = model.hidden_states(last, st.positions[:, None], ones, st.cache)
        u = jax.lax.dynamic_slice_in_dim(st.uniforms, st.step, 1, axis=1)[:, 0]
        tok, lp = strategy.sample(model.unembed(hidden)[:, 0], u)
        st = st._replace(cache=cache, positions=st.positions + 1)
        return _advance(st, tok, lp, max_tokens, stop_ids)

    return jax.lax.while_loop(lambda s: (s.step < limit) & ~jnp.all(s.done), body, st)


class Programs(NamedTuple):
    """Jitted ``prefill`` and ``decode`` (``st`` donated) of one architecture; traces per program."""

    prefill: Any
    decode: Any
    trace_counts: collections.Counter[str]


def _build_programs(graphdef: Any, mesh: Mesh | None) -> Programs:
    counts: collections.Counter[str] = collections.Counter()
    static = ("n", "cache_len", "max_new", "strategy", "row_multiple")
    prefill = jax.jit(functools.partial(_prefill_impl, graphdef, mesh, counts), static_argnames=static)
    decode = functools.partial(_decode_impl, graphdef, counts)
    decode = jax.jit(decode, static_argnames="strategy", donate_argnames="st")
    return Programs(prefill, decode, counts)


_cached_programs = functools.lru_cache(maxsize=16)(_build_programs)


def compiled_programs(graphdef: Any, mesh: Mesh | None) -> Programs:
    """The `Programs` for ``(graphdef, mesh)``, shared by all samplers with an equal graphdef and mesh.

    A graphdef holds the architecture (config, module structure), never parameter values, so engines of
    one architecture with different weights (teacher and student, SFT and RL checkpoints) compile each
    (bucket, strategy) program once per process. An unhashable graphdef gets programs of its own.
    """
    try:
        return _cached_programs(graphdef, mesh)
    except TypeError:  # unhashable graphdef (a module with an unhashable static attribute)
        return _build_programs(graphdef, mesh)


class JaxSampler(Engine):
    """Samples from an NNX `Decoder` with jit-compiled, bucketed prefill/decode (see the module docstring).

    Args:
      model: an ``nnx.Module`` (live view: always samples its current weights) or ``(graphdef, state)``.
      tokenizer: HF tokenizer for text prompts, decoding and EOS (None: token-id prompts only, empty text).
      mesh: when given, rows are sharded over the mesh's ``data``/``fsdp`` axes and the rollout copy is
        laid out on it (`DECODE_RULES`).
      ignore_eos: do not add EOS to the stop ids (benchmarks).
      stop_check_every: decode steps between host checks of stop strings.
      prompt_bucket: smallest prompt-length bucket (prompt lengths round up to a power of two >= this).
      rollout_copy: decode from a compute-dtype copy laid out for decoding (module docstring); False
        decodes from the parameters as they are (no extra memory).
    """

    def __init__(
        self,
        model: nnx.Module | tuple[Any, nnx.State],
        tokenizer: Any = None,
        *,
        mesh: Mesh | None = None,
        ignore_eos: bool = False,
        stop_check_every: int = 16,
        prompt_bucket: int = 16,
        rollout_copy: bool = True,
    ):
        if int(prompt_bucket) < 1:
            raise ValueError(f"prompt_bucket must be >= 1, got {prompt_bucket}")
        if isinstance(model, nnx.Module):
            self._graphdef, state = nnx.split(model)
            self._live: nnx.Module | None = model
        else:
            self._graphdef, state = model
            self._live = None
        self._state = state
        self.cfg = nnx.merge(self._graphdef, state).cfg  # merge references the arrays, no copy
        self._tokenizer = tokenizer
        self.mesh = mesh
        self.stop_check_every = int(stop_check_every)
        self.prompt_bucket = int(prompt_bucket)
        self._rollout_copy = bool(rollout_copy)
        self._copy: tuple[list[jax.Array], nnx.State] | None = None  # (source leaves, copy)
        self.reshard_seconds = 0.0  # time the last rollout-copy rebuild took (0.0: reused)
        eos = set(self.cfg.eos_token_ids)
        if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
            eos.add(int(tokenizer.eos_token_id))
        self._eos = () if ignore_eos else tuple(sorted(eos))
        sizes = {} if mesh is None else dict(zip(mesh.axis_names, mesh.devices.shape, strict=True))
        self._batch_axes = tuple(a for a in ("data", "fsdp") if sizes.get(a, 1) > 1)
        self._batch_multiple = int(np.prod([sizes[a] for a in self._batch_axes]))
        self._seed_rng = np.random.default_rng()
        programs = compiled_programs(self._graphdef, mesh)
        self._prefill, self._decode = programs.prefill, programs.decode
        self.trace_counts = programs.trace_counts  # shared by the engines of one architecture and mesh

    @classmethod
    def frozen(cls, model: nnx.Module, tokenizer: Any = None, **kwargs: Any) -> JaxSampler:
        """A sampler of weights that never change (the student): it keeps only the rollout layout.

        The model's state is laid out for decoding once (`rollout_copy` on ``kwargs["mesh"]``) and the sampler
        is built on that state with ``rollout_copy=False``, so it holds one model of memory instead of the
        source plus its copy; drop other references to ``model`` to free the source. Do not call
        ``update_weights`` on it (its parameters are in the decode layout).
        """
        graphdef, state = nnx.split(model)
        laid_out = _decode_copy(state, model.cfg, kwargs.get("mesh"))
        return cls((graphdef, laid_out), tokenizer, **{**kwargs, "rollout_copy": False})

    # ------------------------------------------------------------------------------------------ weights
    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def params(self) -> nnx.State:
        """The parameters the next ``generate`` samples from (a reference, not a copy)."""
        return nnx.state(self._live) if self._live is not None else self._state

    def update_weights(self, params: nnx.State | nnx.Module | Mapping[str, jax.Array]) -> None:
        """Points the sampler at new weights without copying them.

        Args:
          params: a live ``nnx.Module`` (sampled as it changes), an ``nnx.State`` of the same structure,
            or a flat ``{"layers/attn/q_proj/kernel": array, ...}`` dict.

        Raises:
          ValueError: a path is missing/unexpected or a shape differs (names the path).
        """
        if isinstance(params, nnx.Module):
            params = nnx.state(params)
        expected = {k: v.shape for k, v in flatten(self.params).items()}
        flat = flatten(params) if isinstance(params, nnx.State) else dict(params)
        missing, extra = sorted(set(expected) - set(flat)), sorted(set(flat) - set(expected))
        if missing or extra:
            raise ValueError(f"update_weights: missing paths {missing[:5]}, unexpected paths {extra[:5]}")
        for k, shape in expected.items():
            if tuple(flat[k].shape) != tuple(shape):
                raise ValueError(f"update_weights: {k!r} has shape {tuple(flat[k].shape)}, expected {shape}")
        if not isinstance(params, nnx.State):
            params = jax.eval_shape(lambda: self.params)
            nnx.replace_by_pure_dict(params, unflatten(flat))
        self._state, self._live = params, None
        self.rollout_params()  # refresh the rollout copy now (timed as reshard_seconds)

    def rollout_params(self) -> nnx.State:
        """The parameters ``generate`` decodes from: the rollout copy of `params` (rebuilt if they changed).

        Sets ``reshard_seconds`` to the rebuild time (blocking until the copy exists), or 0.0 when the
        copy of the same source arrays is reused or the sampler was built with ``rollout_copy=False``.
        """
        state = self.params
        self.reshard_seconds = 0.0
        if not self._rollout_copy:
            self._copy = None
            return state
        leaves = jax.tree.leaves(state)
        src = self._copy[0] if self._copy is not None else []
        if len(src) == len(leaves) and all(a is b for a, b in zip(src, leaves, strict=True)):
            return self._copy[1]
        self._copy = None  # drop the old copy before building the new one (peak memory)
        t0 = time.perf_counter()
        copy = _decode_copy(state, self.cfg, self.mesh)
        self.reshard_seconds = time.perf_counter() - t0
        self._copy = (leaves, copy)
        return copy

    # ------------------------------------------------------------------------------------------ generate
    def _encode(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if self._tokenizer is None:
                    raise ValueError(f"prompt {i} is text but the sampler has no tokenizer")
                ids = list(self._tokenizer(p, add_special_tokens=False)["input_ids"])
            else:
                ids = [int(t) for t in p]
            if not ids:
                raise ValueError(f"prompt {i} is empty (needs at least one token)")
            bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise ValueError(
                    f"prompt {i}: token id {bad[0]} outside the vocabulary [0, {self.cfg.vocab_size})"
                )
            out.append(ids)
        return out

    def _put(self, x: np.ndarray) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(x)
        axes = self._batch_axes if x.shape[0] % self._batch_multiple == 0 else ()
        spec = PartitionSpec(axes or None, *([None] * (x.ndim - 1)))
        return jax.device_put(x, NamedSharding(self.mesh, spec))

    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams, n: int = 1
    ) -> list[list[Completion]]:
        """Samples ``n`` completions per prompt (see `Engine.generate` and the module docstring)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if not prompts:
            return []
        if params.stop_strings and self._tokenizer is None:
            raise ValueError("SamplingParams.stop_strings needs a tokenizer")
        prompt_ids = self._encode(prompts)
        longest = max(len(p) for p in prompt_ids)
        if longest + params.max_tokens > self.cfg.max_position_embeddings:
            raise ValueError(
                f"longest prompt ({longest} tokens) + max_tokens ({params.max_tokens}) exceeds the model's "
                f"max_position_embeddings ({self.cfg.max_position_embeddings})"
            )
        bp = bucket(len(prompt_ids), 1)
        tp, m = bucket(longest, self.prompt_bucket), bucket(params.max_tokens, 16)
        ids, mask, live = np.zeros((bp, tp), np.int32), np.zeros((bp, tp), np.int32), np.zeros(bp, bool)
        mask[:, -1] = 1  # bucket-padding rows: one dummy token, finished from the start
        for i, p in enumerate(prompt_ids):
            ids[i, tp - len(p) :], mask[i, tp - len(p) :], live[i] = p, 1, True
        stop = sorted(set(params.stop_token_ids) | set(self._eos))
        stop_ids = np.full(max(1, -(-len(stop) // _MAX_STOP_IDS)) * _MAX_STOP_IDS, -1, np.int32)
        stop_ids[: len(stop)] = stop
        seed = params.seed if params.seed is not None else int(self._seed_rng.integers(2**31))
        strategy = Strategy.from_params(params.temperature, params.top_p, params.top_k)
        weights = self.rollout_params()
        max_tokens = jnp.int32(params.max_tokens)
        with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            st = self._prefill(
                weights, self._put(ids), self._put(mask), self._put(live), jnp.uint32(seed % 2**32), max_tokens,
                jnp.asarray(stop_ids), jnp.uint32(params.row_offset * n % 2**32), n=n, cache_len=tp + m,
                max_new=m, strategy=strategy, row_multiple=self._batch_multiple,
            )  # fmt: skip
            step = 1
            while True:
                chunk = self.stop_check_every if params.stop_strings else params.max_tokens
                limit = min(step + chunk, params.max_tokens)
                st = self._decode(
                    weights, st, jnp.int32(limit), max_tokens, jnp.asarray(stop_ids), strategy=strategy
                )
                # gather_to_host: rows may sit on other hosts' devices (a multi-process mesh).
                step, done = int(st.step), distributed.gather_to_host(st.done)
                if done.all() or step >= params.max_tokens:
                    break
                if params.stop_strings:
                    toks, lens = distributed.gather_to_host((st.tokens, st.lengths))
                    hit = self._stop_string_rows(toks, lens, done, params)
                    if hit.any():
                        st = st._replace(done=self._put(done | hit))
                        if (done | hit).all():
                            break
        tokens, logprobs, lengths = distributed.gather_to_host((st.tokens, st.logprobs, st.lengths))
        out = []
        for i, p in enumerate(prompt_ids):
            row = []
            for j in range(n):
                r = i * n + j
                toks, lps = tokens[r, : lengths[r]].tolist(), logprobs[r, : lengths[r]].tolist()
                row.append(self._finish(p, toks, lps, set(stop), params.stop_strings))
            out.append(row)
        return out

    def _decode_text(self, toks: Sequence[int]) -> str:
        return "" if self._tokenizer is None else self._tokenizer.decode(toks, skip_special_tokens=True)

    def _stop_string_rows(self, tokens, lengths, done, params: SamplingParams) -> np.ndarray:
        hit = np.zeros_like(done)
        for r in np.nonzero(~done)[0]:
            text = self._decode_text(tokens[r, : lengths[r]].tolist())
            hit[r] = any(s in text for s in params.stop_strings)
        return hit

    def _finish(self, prompt, toks, lps, stop: set[int], stop_strings: Sequence[str]) -> Completion:
        text = self._decode_text(toks)
        cut = cut_at_stop_string(text, stop_strings)
        if cut is not None:
            keep = tokens_before(toks, cut, self._decode_text)
            return Completion(list(prompt), toks[:keep], text[:cut], lps[:keep], "stop")
        reason = "stop" if toks and toks[-1] in stop else "length"
        return Completion(list(prompt), toks, text, lps, reason)


def cut_at_stop_string(text: str, stop_strings: Sequence[str]) -> int | None:
    """Index where the earliest stop string starts in ``text`` (None if none occurs)."""
    hits = [i for i in (text.find(s) for s in stop_strings if s) if i >= 0]
    return min(hits) if hits else None


def tokens_before(toks: Sequence[int], cut: int, decode) -> int:
    """Largest ``j`` with ``len(decode(toks[:j])) <= cut``: the tokens lying wholly before character ``cut``.

    Binary search (decoded length grows with the prefix). A token straddling ``cut`` is dropped, so the
    stop string never appears in the kept ``token_ids``; the returned text keeps its leading characters.
    """
    lo, hi = 0, len(toks)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(decode(toks[:mid])) <= cut:
            lo = mid
        else:
            hi = mid - 1
    return lo
