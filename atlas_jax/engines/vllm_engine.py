"""In-process vLLM engine: sampling from an HF folder, weight updates straight from our params.

vLLM runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, the "uni" executor: one device),
so ``update_weights`` hands our parameter buffers to the worker without pickling or touching disk
(see ``weight_sync``). A tensor-parallel vLLM (several worker processes) needs a transport instead:
vLLM's NCCL weight transfer, see ``server_app.NcclWeightTransfer``.

Log-probabilities. vLLM 0.32 computes the returned log-probs according to the engine-wide
``logprobs_mode``: ``raw_logprobs`` (its default) is ``log softmax(logits)`` *without* temperature;
``processed_logprobs`` is taken after temperature *and* top-k/top-p (truncated tokens get -inf, the
rest is renormalised); greedy requests get ``log softmax(logits)`` in both. Our convention (see
``base``) is ``log softmax(logits / T)`` before truncation, so this engine starts vLLM with
``processed_logprobs``, which is exactly our convention for greedy decoding and for pure temperature
sampling (``top_k=0, top_p=1``, the GRPO default). With top-k/top-p truncation vLLM can only report
the renormalised truncated distribution, ``ours - log(kept mass)``; the engine returns those values
and logs a warning once — recompute with the learner if you need them exact in that setting.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from atlas_jax.engines import weight_sync
from atlas_jax.engines.base import Completion, Engine, Prompt, SamplingParams

log = logging.getLogger(__name__)

# Read by vLLM when the engine is created: in-process engine core, small CPU KV cache by default.
_VLLM_ENV_DEFAULTS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}


class VLLMEngine(Engine):
    """A vLLM ``LLM`` in this process, serving one HF model folder.

    Args:
      model_dir: HF folder (config.json, safetensors, tokenizer files), e.g. one written by
        ``converters.jax_to_hf.export_hf_dir``.
      dtype: vLLM compute/storage dtype ("float32", "bfloat16", "auto").
      max_model_len: longest prompt + completion in tokens.
      seed: vLLM's global seed (per-request seeds come from ``SamplingParams.seed``).
      gpu_memory_utilization: fraction of accelerator memory vLLM may take (ignored on CPU, where the
        KV cache size comes from ``VLLM_CPU_KVCACHE_SPACE`` GiB, default 1).
      enforce_eager: skip graph capture (faster start; required on CPU here).
      tensor_parallel_size: devices the model is split over. 1 runs vLLM's worker in this process (the
        "uni" executor, needed by ``update_weights``); more start vLLM's worker processes ("mp"), for a
        frozen student (weight pushes then need vLLM's NCCL transfer, see ``server_app``).
      ignore_eos: never stop at EOS (benchmarks: every completion runs to ``max_tokens``).
      llm_kwargs: passed through to ``vllm.LLM``.

    Raises:
      FileNotFoundError: ``model_dir`` has no config.json.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        dtype: str = "float32",
        max_model_len: int = 2048,
        seed: int = 0,
        gpu_memory_utilization: float = 0.5,
        enforce_eager: bool = True,
        tensor_parallel_size: int = 1,
        ignore_eos: bool = False,
        **llm_kwargs: Any,
    ) -> None:
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(
                f"VLLMEngine: {model_dir} has no config.json (expected an HF model folder)"
            )
        for k, v in _VLLM_ENV_DEFAULTS.items():
            os.environ.setdefault(k, v)
        if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0":
            log.warning(
                "VLLM_ENABLE_V1_MULTIPROCESSING=1: update_weights needs the in-process engine and will fail"
            )
        import vllm
        from transformers import AutoTokenizer

        from atlas_jax.models.config import ModelConfig

        self.model_dir = model_dir
        self.model_config = ModelConfig.from_hf(model_dir)
        self._tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self._llm = vllm.LLM(
            str(model_dir),
            dtype=dtype,
            max_model_len=max_model_len,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
            tensor_parallel_size=tensor_parallel_size,
            distributed_executor_backend="uni" if tensor_parallel_size == 1 else "mp",
            logprobs_mode="processed_logprobs",
            **llm_kwargs,
        )
        self._vocab = int(self._llm.llm_engine.model_config.get_vocab_size())
        self._max_model_len = max_model_len
        self._warned_truncation = False
        self._ignore_eos = ignore_eos

    @classmethod
    def from_params(
        cls,
        params: Any,
        model_config: Any,
        tokenizer_src: Any,
        workdir: str | os.PathLike[str],
        *,
        dtype: str = "float32",
        **kwargs: Any,
    ) -> VLLMEngine:
        """Exports our params to ``workdir/hf`` (``converters.jax_to_hf``) and serves that folder.

        The export happens once, to start vLLM; later updates go through ``update_weights``.

        Args:
          params: our parameter pytree (see ``weight_sync.flat_params``).
          model_config: its ``ModelConfig``.
          tokenizer_src: tokenizer folder or object (see ``export_hf_dir``).
          workdir: folder for the export (``workdir/hf`` is replaced if it exists).
          dtype: vLLM dtype and the exported weights' dtype.
          kwargs: passed to ``VLLMEngine``.
        """
        from converters.jax_to_hf import export_hf_dir

        hf_dir = export_hf_dir(
            weight_sync.flat_params(params),
            model_config,
            Path(workdir) / "hf",
            tokenizer_src=tokenizer_src,
            dtype=None if dtype == "auto" else dtype,
            overwrite=True,
        )
        return cls(hf_dir, dtype=dtype, **kwargs)

    # ------------------------------------------------------------------------------------------ sampling
    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    def encode(self, prompt: Prompt, where: str = "prompt") -> list[int]:
        """Token ids of a prompt (text without added special tokens, or checked token ids)."""
        if isinstance(prompt, str):
            ids = self._tokenizer.encode(prompt, add_special_tokens=False)
        else:
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self._vocab]
            if bad:
                raise ValueError(f"{where}: token ids {bad[:5]} outside the vocabulary [0, {self._vocab})")
        if not ids:
            raise ValueError(f"{where}: empty prompt")
        if len(ids) >= self._max_model_len:
            raise ValueError(f"{where}: {len(ids)} tokens, max_model_len is {self._max_model_len}")
        return ids

    def _eos_ids(self) -> tuple[int, ...]:
        ids = set(self.model_config.eos_token_ids)
        if self._tokenizer.eos_token_id is not None:
            ids.add(int(self._tokenizer.eos_token_id))
        return tuple(sorted(ids))

    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams, n: int = 1
    ) -> list[list[Completion]]:
        """Samples ``n`` completions per prompt (see ``Engine.generate``).

        Seeds: with ``params.seed = s``, completion j of prompt i uses seed ``s + (row_offset + i) * n + j``, so
        repeated prompts in one batch still get distinct samples and a fixed seed reproduces them.

        Raises:
          ValueError: ``n < 1``, an empty prompt, token ids outside the vocabulary, or a prompt too long.
        """
        import vllm
        from vllm.inputs import TokensPrompt

        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if not prompts:
            return []
        if (
            (params.top_k > 0 or params.top_p < 1.0)
            and params.temperature > 0
            and not self._warned_truncation
        ):
            self._warned_truncation = True
            log.warning(
                "VLLMEngine: top_k/top_p truncation is on; vLLM returns log-probs of the truncated, "
                "renormalised distribution, not log softmax(logits/T) (see the module docstring)"
            )
        ids = [self.encode(p, where=f"prompts[{i}]") for i, p in enumerate(prompts)]
        eos = () if self._ignore_eos else self._eos_ids()
        stop_ids = sorted(set(params.stop_token_ids) | set(eos))
        greedy = params.temperature == 0
        sps = [
            vllm.SamplingParams(
                n=1 if greedy else n,  # vLLM refuses n > 1 when greedy; the copies are identical.
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k,
                max_tokens=params.max_tokens,
                stop_token_ids=stop_ids,
                stop=list(params.stop_strings) or None,
                seed=None if params.seed is None else params.seed + (params.row_offset + i) * n,
                logprobs=0,
                skip_special_tokens=True,
                ignore_eos=self._ignore_eos,
            )
            for i in range(len(ids))
        ]
        outs = self._llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids], sps, use_tqdm=False)
        result = []
        for p, out in zip(ids, outs, strict=True):
            group = [self._completion(p, o) for o in sorted(out.outputs, key=lambda o: o.index)]
            if greedy:
                g = group[0]
                group = [
                    dataclasses.replace(
                        g,
                        prompt_ids=list(g.prompt_ids),
                        token_ids=list(g.token_ids),
                        logprobs=list(g.logprobs),
                    )
                    for _ in range(n)
                ]
            result.append(group)
        return result

    def _completion(self, prompt_ids: list[int], out: Any) -> Completion:
        tokens = list(out.token_ids)
        logprobs = [float(d[t].logprob) for d, t in zip(out.logprobs, tokens, strict=True)]
        if out.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM request ended with finish_reason={out.finish_reason!r}")
        if isinstance(out.stop_reason, str):
            # Stopped by a stop string: vLLM cut the text but not the tokens; keep the tokens whose
            # text lies entirely before the stop string.
            text = out.text
            keep = self._tokens_within(tokens, text)
            tokens, logprobs = tokens[:keep], logprobs[:keep]
        else:
            # vLLM's incremental detokenizer holds back a trailing partial UTF-8 character; decode
            # in full like the other engines so text == decode(token_ids).
            text = self._tokenizer.decode(tokens, skip_special_tokens=True)
        return Completion(
            prompt_ids=prompt_ids,
            token_ids=tokens,
            text=text,
            logprobs=logprobs,
            finish_reason=out.finish_reason,
        )

    def _tokens_within(self, tokens: list[int], text: str) -> int:
        """Largest m such that ``decode(tokens[:m])`` is a prefix of ``text``."""
        for m in range(len(tokens), -1, -1):
            if text.startswith(self._tokenizer.decode(tokens[:m], skip_special_tokens=True)):
                return m
        return 0  # pragma: no cover - m = 0 decodes to "" which always matches

    # ------------------------------------------------------------------------------------------ weights
    def update_weights(self, params: Any) -> None:
        """Pushes our params (flat dict, nested dict, ``nnx.State`` or module) into the running engine.

        Tensors are converted through ``converters.mapping`` and handed over without copies on
        CPU (DLPack on accelerators); vLLM copies them into its own storage, re-packs, and the
        prefix cache is cleared so no KV entry computed with the old weights is reused.

        Raises:
          converters.mapping.MappingError: params do not match the served model's config (nothing
            is loaded in that case: the check runs before the first tensor).
        """
        flat = weight_sync.flat_params(params)
        self.load_hf_tensors(weight_sync.hf_tensors(flat, self.model_config))

    def load_hf_tensors(self, tensors: Iterable[tuple[str, Any]] | Mapping[str, Any]) -> int:
        """Loads HF-named torch tensors (checkpoint format) and clears the prefix cache.

        A mapping is checked against the served model (names and shapes) before anything is loaded;
        an iterator is trusted (``update_weights`` and ``load_hf_dir`` check theirs first).

        Returns:
          The number of tensors loaded.

        Raises:
          converters.mapping.MappingError: a mapping with wrong names or shapes.
        """
        if isinstance(tensors, Mapping):
            weight_sync.check_hf_shapes({k: tuple(v.shape) for k, v in tensors.items()}, self.model_config)
            tensors = iter(tensors.items())
        counts = self._llm.collective_rpc(weight_sync.push_to_vllm, args=(tensors,))
        self.reset_prefix_cache()
        return int(counts[0])

    def load_hf_dir(self, path: str | os.PathLike[str]) -> int:
        """Loads the safetensors of an HF folder (same architecture and sizes) into the engine.

        Raises:
          FileNotFoundError: no ``*.safetensors`` under ``path``.
          converters.mapping.MappingError: names or shapes differ from the served model (checked
            from the file headers before anything is loaded).
        """
        from safetensors import safe_open

        files = sorted(Path(path).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"load_hf_dir: no *.safetensors files in {path}")

        shapes = {}
        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                for name in fh.keys():  # noqa: SIM118 - safe_open is not a Mapping
                    shapes[name] = tuple(fh.get_slice(name).get_shape())
        weight_sync.check_hf_shapes(shapes, self.model_config, where=str(path))

        def stream() -> Iterable[tuple[str, Any]]:
            for f in files:
                with safe_open(str(f), framework="pt") as fh:
                    for name in fh.keys():  # noqa: SIM118 - safe_open is not a Mapping
                        yield name, fh.get_tensor(name)

        return self.load_hf_tensors(stream())

    def collective_rpc(self, method: str, kwargs: dict[str, Any] | None = None) -> list[Any]:
        """Calls a vLLM worker method on every worker (e.g. the NCCL weight-transfer RPCs)."""
        return self._llm.collective_rpc(method, kwargs=kwargs)

    def reset_prefix_cache(self) -> None:
        """Drops cached KV blocks (they were computed with the previous weights)."""
        self._llm.reset_prefix_cache()

    def close(self) -> None:
        llm, self._llm = getattr(self, "_llm", None), None
        if llm is not None:
            core = getattr(llm.llm_engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
            del llm
            import gc

            gc.collect()
