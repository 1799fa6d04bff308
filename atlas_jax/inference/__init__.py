"""Using a trained teacher: ``AdaptiveTeacher`` teaches any student (callable, HTTP endpoint or engine).

    from atlas_jax.inference import AdaptiveTeacher
    teacher = AdaptiveTeacher.from_config(run_config, "runs/quickstart/teacher_rl/hf")
    [r] = teacher.teach(["2+3+4"], student="http://127.0.0.1:8000/v1")
    r.teaching, r.answer, r.stayed_out, r.tokens, r.seconds

See ``inference/teacher.py`` (the protocol at inference time), ``inference/students.py`` (what a student can
be), ``inference/server.py`` (``POST /v1/teach`` and the teacher+student OpenAI endpoint) and docs/inference.md.
"""

from atlas_jax.inference.students import CallableStudent, StudentError, as_engine
from atlas_jax.inference.teacher import AdaptiveTeacher, ProblemError, TeachResult, as_problem

__all__ = [
    "AdaptiveTeacher",
    "CallableStudent",
    "ProblemError",
    "StudentError",
    "TeachResult",
    "as_engine",
    "as_problem",
]
