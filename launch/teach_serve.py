"""The teaching server: ``atlas-teach-serve --config=configs/run/quickstart.py [--port=8200]``.

Serves ``POST /v1/teach`` (problem [+ student endpoint] -> guidance) and an OpenAI-compatible
``/v1/chat/completions`` that teaches the configured student and returns its taught answer, plus
``/v1/models`` and ``/health`` (``atlas_jax/inference/server.py``). Teacher and student come from the same
flags as ``atlas-teach`` (``launch/teach_common.py``). Binds 127.0.0.1 unless ``--host`` says otherwise;
``--api_key`` (or env ``ATLAS_TEACH_API_KEY``) makes every ``/v1`` route require ``Authorization: Bearer``.
"""

from __future__ import annotations

import os

from absl import app, flags

from launch import teach_common

_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to bind (loopback by default).")
_PORT = flags.DEFINE_integer("port", 8200, "TCP port.")
_MODEL_NAME = flags.DEFINE_string("model_name", "atlas-teacher", "The model id /v1/models lists.")
_API_KEY = flags.DEFINE_string("api_key", None, "Key /v1 routes require (default: env ATLAS_TEACH_API_KEY).")
_ALLOW = flags.DEFINE_boolean(
    "allow_request_students",
    False,
    "Let /v1/teach requests name their own student endpoint (outbound calls).",
)
_MAX_PENDING = flags.DEFINE_integer("max_pending", 16, "Requests waiting or running at once (503 beyond).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import uvicorn

    from atlas_jax.inference.server import create_teach_app

    try:
        _, teacher, student = teach_common.build()
    except (ValueError, FileNotFoundError) as e:
        raise app.UsageError(str(e)) from e
    server_app = create_teach_app(
        teacher, student, model_name=_MODEL_NAME.value,
        api_key=_API_KEY.value or os.environ.get("ATLAS_TEACH_API_KEY") or None,
        allow_request_students=_ALLOW.value, max_pending=_MAX_PENDING.value,
        student_timeout=teach_common.TIMEOUT.value, student_retries=teach_common.RETRIES.value,
    )  # fmt: skip
    try:
        uvicorn.run(server_app, host=_HOST.value, port=_PORT.value, log_level="warning")
    finally:
        student.close()
        teacher.close()


def run() -> None:
    """Console-script entry point (``atlas-teach-serve``)."""
    import sys

    flags.FLAGS.unparse_flags()
    app.run(main, argv=sys.argv)


if __name__ == "__main__":
    app.run(main)
