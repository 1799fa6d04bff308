"""End to end through ``launch.train.train``: SFT then GRPO (two-pass protocol, JAX engines) on tiny HF folders."""

import json

import pytest
from protocol_helpers import SAMPLES
from run_helpers import model_folders

from configs.base import get_config
from launch.train import train

REQUIRED_GRPO_METRICS = (
    "reward_mean", "reward_std", "lr", "ndr", "les", "acc_with_teaching", "acc_without_teaching",
    "completion_with_teaching", "teaching_tokens_mean", "probe_tokens_mean", "kl", "clip_frac", "grad_norm",
    "loss", "entropy", "logprob_mismatch_abs", "logprob_mismatch_kl", "time/weight_push", "time/rollout",
    "time/gen_teacher", "time/gen_probe", "time/gen_taught", "time/gen_baseline", "time/scoring", "time/update", "time/update_batch", "time/update_logprobs", "time/update_train", "time/step", "teacher_tokens_per_s",
)  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return model_folders(tmp_path_factory.mktemp("models"))


def _base(tmp_path, folders):
    c = get_config()
    c.output_dir = str(tmp_path / "run")
    c.model.teacher = folders["teacher"]
    c.model.student = folders["student"]
    c.model.compute_dtype = "float32"
    c.model.remat = False
    c.logging.progress_bar = False
    c.checkpoint.async_save = False
    return c


@pytest.mark.slow
def test_sft_job_then_grpo_job_from_its_checkpoint(tmp_path, folders):
    c = _base(tmp_path / "sft", folders)
    c.job = "sft"
    c.data.sft_path = str(SAMPLES / "sft_sample.jsonl")
    c.data.eval_fraction = 0.2
    c.sft.num_steps, c.sft.batch_size, c.sft.micro_batch_size, c.sft.max_length = 2, 8, 8, 256
    c.sft.learning_rate = 1e-3
    c.checkpoint.every_steps = 1
    train(c)
    sft_records = [json.loads(x) for x in (tmp_path / "sft/run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in sft_records] == [1, 2] and "eval/loss" in sft_records[-1]

    g = _base(tmp_path / "grpo", folders)
    g.job = "grpo"
    g.model.teacher = str(tmp_path / "sft/run/checkpoints")  # start from the SFT output, as teacher_rcl does
    g.model.tokenizer = folders["teacher"]
    g.data.rl_path = str(SAMPLES / "rl_sample.jsonl")
    g.data.eval_fraction = 0.25
    g.grpo.num_steps, g.grpo.problems_per_step, g.grpo.num_generations, g.grpo.micro_batch_size = 2, 4, 2, 8
    g.grpo.beta, g.grpo.ref_update, g.grpo.ref_sync_steps = 0.04, "ema", 1
    g.protocol.max_probe_tokens, g.protocol.max_teaching_tokens, g.protocol.max_student_tokens = 8, 16, 8
    g.protocol.num_baseline_samples = g.protocol.num_student_samples = 1
    g.eval.every_steps, g.eval.num_problems = 2, 2
    g.checkpoint.every_steps = 1
    g.checkpoint.export_hf_dir = str(tmp_path / "hf_out")
    train(g)
    records = [json.loads(x) for x in (tmp_path / "grpo/run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    missing = [k for k in REQUIRED_GRPO_METRICS if k not in records[-1]]
    assert not missing, missing
    assert "eval/ndr" in records[-1] and records[0]["logprob_mismatch_abs"] < 1e-3
    for r in records:  # the update's parts add up to it; β > 0, so the reference scoring pass ran
        parts = r["time/update_batch"] + r["time/update_logprobs"] + r["time/update_train"]
        assert parts == pytest.approx(r["time/update"], rel=1e-6) and r["time/update_logprobs"] > 0
    samples = [json.loads(x) for x in (tmp_path / "grpo/run/samples/step_2.jsonl").read_text().splitlines()]
    assert samples and {"problem", "probe", "teaching", "student_answers", "reward"} <= set(samples[0])
    assert (tmp_path / "grpo/run/checkpoints/2").is_dir()
    assert list((tmp_path / "grpo/run/tensorboard").iterdir())

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "hf_out")  # the final export loads in transformers
