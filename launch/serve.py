"""Generation server: one vLLM-backed model (teacher or student) over HTTP.

    python -m launch.serve --model=HF_DIR --role=student [--port=8000] [--token=SECRET]
    atlas-serve --model=HF_DIR --role=teacher --token=$ATLAS_SERVER_TOKEN

Binds 127.0.0.1 unless --host says otherwise. Weight updates and cache resets need the shared
token (--token or env ATLAS_SERVER_TOKEN); a server without one refuses them. Path-based weight
updates must name a folder inside --weights_root (none: refused). See docs/reliability.md. Endpoints: see
``atlas_jax/engines/server_app.py``.
"""

from __future__ import annotations

import os

from absl import app, flags, logging

_MODEL = flags.DEFINE_string("model", None, "HF model folder (e.g. written by converters.jax_to_hf).")
_ROLE = flags.DEFINE_enum("role", "student", ["teacher", "student"], "Which model this server serves.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to bind (loopback by default).")
_PORT = flags.DEFINE_integer("port", 8000, "TCP port.")
_TOKEN = flags.DEFINE_string(
    "token", None, "Shared secret for mutating endpoints (default: env ATLAS_SERVER_TOKEN)."
)
_DTYPE = flags.DEFINE_string("dtype", "float32", "vLLM dtype: float32 | bfloat16 | auto.")
_MAX_MODEL_LEN = flags.DEFINE_integer("max_model_len", 4096, "Longest prompt + completion in tokens.")
_SEED = flags.DEFINE_integer("seed", 0, "vLLM global seed.")
_GPU_MEM = flags.DEFINE_float("gpu_memory_utilization", 0.5, "Accelerator memory fraction for vLLM.")
_MAX_WEIGHTS_MB = flags.DEFINE_integer("max_weights_mb", 4096, "Body limit of /update_weights in MiB.")
_MAX_JSON_MB = flags.DEFINE_integer("max_json_mb", 16, "Body limit of the other endpoints in MiB.")
_TRANSFER = flags.DEFINE_enum(
    "weight_transfer", "http", ["http", "nccl"],
    "nccl: also accept vLLM NCCL weight transfer from the trainer (GPU; /weight_transfer/*).",
)  # fmt: skip
_WEIGHTS_ROOT = flags.DEFINE_string(
    "weights_root", None, "Folder that path-based weight updates must lie in (default: path updates refused)."
)
_MAX_INFLIGHT = flags.DEFINE_integer("max_inflight", 64, "Requests served at once; more get 503.")
flags.mark_flag_as_required("model")


def main(argv: list[str]) -> None:
    del argv
    import uvicorn

    from atlas_jax.engines.server_app import MiB, create_app
    from atlas_jax.engines.vllm_engine import VLLMEngine

    token = _TOKEN.value or os.environ.get("ATLAS_SERVER_TOKEN") or None
    if token is None:
        logging.warning(
            "no --token / ATLAS_SERVER_TOKEN: /update_weights and /reset_prefix_cache are disabled"
        )
    engine = VLLMEngine(
        _MODEL.value,
        dtype=_DTYPE.value,
        max_model_len=_MAX_MODEL_LEN.value,
        seed=_SEED.value,
        gpu_memory_utilization=_GPU_MEM.value,
        **({"weight_transfer_config": {"backend": "nccl"}} if _TRANSFER.value == "nccl" else {}),
    )
    server_app = create_app(
        engine,
        role=_ROLE.value,
        token=token,
        max_weights_bytes=_MAX_WEIGHTS_MB.value * MiB,
        max_json_bytes=_MAX_JSON_MB.value * MiB,
        weights_root=_WEIGHTS_ROOT.value,
        max_inflight=_MAX_INFLIGHT.value,
    )
    try:
        uvicorn.run(server_app, host=_HOST.value, port=_PORT.value, log_level="warning")
    finally:
        engine.close()


def run() -> None:
    """Console-script entry point (``atlas-serve``)."""
    app.run(main)


if __name__ == "__main__":
    run()
