"""The adaptive teacher at inference time: probe the student, write guidance, let the student answer.

``AdaptiveTeacher(teacher_engine, settings).teach(problems, student)`` runs the two-pass protocol of
training (``protocol.rollout.TwoPassRollout``: the same templates, prompt rendering, budgets, teaching
extraction and answer checking) with one teacher sample per problem, in batches:

1. probe: the student writes its approach (``student_probe`` template, ≤ ``max_probe_tokens``);
2. teach: the teacher reads problem + probe (``teacher`` template, teacher-token ids) and writes
   ``<thinking>…</thinking><teaching>…</teaching>``; the student only ever sees the teaching
   (``protocol.teaching.extract_teaching``). An empty teaching means the teacher stays out of the way;
3. answer (optional): the student answers with the teaching (``student_taught``), or, when the teaching
   is empty and ``settings.empty_teaching == "baseline"``, alone (``student_baseline``), as in training;
4. baseline (optional): the student also answers alone, to compare.
With a ground truth, each answer is checked (``protocol.answers.AnswerChecker``). Each phase is one batched
engine call per batch; remote students bound their own concurrency, timeouts and retries
(``inference.students``). Seconds are the batch's phase times divided by its size (amortised per problem).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

from atlas_jax.data.rl import Problem
from atlas_jax.engines.base import Completion, Engine, SamplingParams
from atlas_jax.protocol.answers import extract_answer
from atlas_jax.protocol.batch import RolloutSettings
from atlas_jax.protocol.rollout import _PHASE_BASELINE, _PHASE_TAUGHT, _PHASE_TEACHER, TwoPassRollout
from atlas_jax.protocol.teaching import extract_teaching


class ProblemError(ValueError):
    """One problem cannot be taught (no text, or its teacher prompt is over the budget); names the problem.

    ``atlas-teach`` reports and skips the row; any other error stops the run.
    """


@dataclasses.dataclass
class TeachResult:
    """What the teacher did for one problem (and, if asked, what the student then answered).

    Attributes:
      id: the problem id.
      problem: the problem text.
      probe: the student's approach (pass 1).
      teaching: the guidance shown to the student ("" = the teacher stayed out of the way).
      stayed_out: the teaching is empty.
      teaching_tag_found: the teacher wrote a ``<teaching>`` tag.
      teacher_text: the whole teacher completion, thinking included (never shown to the student).
      answer: the student's taught answer text (None unless asked).
      extracted: the answer extracted from it (None = none found or not asked).
      correct: the taught answer matches the ground truth (None without a ground truth or answer).
      baseline_answer, baseline_extracted, baseline_correct: the same for the student alone (if asked).
      tokens: ``probe``, ``teacher_prompt``, ``teacher_completion``, ``teaching`` (teacher tokens), ``answer``,
        ``baseline`` (student tokens; None when the student engine cannot count them).
      seconds: ``probe``, ``teach``, ``answer``, ``baseline``, ``total`` (batch phase time / batch size).
      finish_reasons: ``teacher``, ``answer``, ``baseline`` ("stop" or "length").
    """

    id: str
    problem: str
    probe: str
    teaching: str
    stayed_out: bool
    teaching_tag_found: bool
    teacher_text: str
    answer: str | None = None
    extracted: str | None = None
    correct: bool | None = None
    baseline_answer: str | None = None
    baseline_extracted: str | None = None
    baseline_correct: bool | None = None
    tokens: dict[str, int | None] = dataclasses.field(default_factory=dict)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    finish_reasons: dict[str, str] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (what ``atlas-teach`` writes per row)."""
        return dataclasses.asdict(self)


def as_problem(item: str | Problem | Mapping[str, Any], index: int = 0) -> Problem:
    """A ``Problem`` from text, a ``Problem`` or a dict with ``question``/``prompt``/``problem`` and optionally
    ``answer``/``ground_truth`` and ``id`` (no answer = "": nothing is checked).

    Raises:
      ValueError: no problem text.
    """
    if isinstance(item, Problem):
        return item
    if isinstance(item, str):
        text, answer, pid = item, "", None
    else:
        text = next((item[k] for k in ("question", "prompt", "problem") if item.get(k)), None)
        answer = next((str(item[k]) for k in ("answer", "ground_truth") if item.get(k) is not None), "")
        pid = item.get("id")
    if not isinstance(text, str) or not text.strip():
        raise ProblemError(
            f"problem {index}: no problem text (give a string or a dict with 'question'/'prompt')"
        )
    return Problem(id=str(pid) if pid is not None else f"p{index}", question=text, answer=answer)


def _ntok(c: Completion) -> int | None:
    return len(c.token_ids) if c.token_ids else (0 if not c.text else None)


class AdaptiveTeacher:
    """A trained teacher that teaches any student through the two-pass protocol.

    Args:
      teacher: the teacher's ``Engine`` (its ``tokenizer`` must be available: prompts are sent as ids).
        ``AdaptiveTeacher.load`` builds one from a folder or URL.
      settings: protocol settings (templates, budgets, temperatures, answer checking); build them from a
        run config with ``protocol.settings.rollout_settings_from_config``. Default: the built-ins.
      temperature: teacher sampling temperature (default ``settings.teacher_temperature``; 0 = greedy).
      top_p: teacher nucleus mass (default ``settings.teacher_top_p``).
      batch_size: problems per engine call.
    """

    def __init__(
        self,
        teacher: Engine,
        settings: RolloutSettings | None = None,
        *,
        temperature: float | None = None,
        top_p: float | None = None,
        batch_size: int = 32,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.teacher = teacher
        self.settings = settings or RolloutSettings()
        self.temperature = self.settings.teacher_temperature if temperature is None else float(temperature)
        self.top_p = self.settings.teacher_top_p if top_p is None else float(top_p)
        self.batch_size = batch_size

    @classmethod
    def from_config(cls, config: Any, source: Any = None, **kwargs: Any) -> AdaptiveTeacher:
        """A teacher with the protocol settings, dtypes and engine options of run config ``config``.

        ``source`` defaults to the config's teacher: ``<output_dir>/teacher_rl/hf`` of a pipeline run
        (``job == "pipeline"``), else ``model.teacher``. Other keywords go to ``load``.
        """
        from pathlib import Path

        from atlas_jax.protocol.settings import rollout_settings_from_config

        if source is None:
            pipeline = str(config.job) == "pipeline"
            source = (
                str(Path(config.output_dir) / "teacher_rl" / "hf") if pipeline else str(config.model.teacher)
            )
        return cls.load(source, rollout_settings_from_config(config), config=config, **kwargs)

    @classmethod
    def load(cls, source: Any, settings: RolloutSettings | None = None, *, kind: str = "auto",
             tokenizer: Any = None, config: Any = None, **kwargs: Any) -> AdaptiveTeacher:  # fmt: skip
        """A teacher from an HF folder, an atlas-jax checkpoint, a running teacher server (URL) or an engine.

        ``kind``: "jax" (default for folders), "vllm", "server" (``atlas-serve --role=teacher``, default for
        URLs) or "openai" (any OpenAI-compatible completions API, e.g. vLLM's server); a URL needs
        ``tokenizer`` (the teacher's tokenizer folder). ``config``: the run config whose dtypes and engine
        options a folder's engine uses (``inference.students.as_engine``). Other keywords go to
        ``AdaptiveTeacher``.
        """
        from atlas_jax.inference.students import as_engine

        if isinstance(source, str) and source.startswith(("http://", "https://")) and tokenizer is None:
            raise ValueError(
                f"teacher {source}: a remote teacher needs tokenizer= (the teacher's tokenizer folder)"
            )
        engine = as_engine(source, role="teacher", kind=kind, tokenizer=tokenizer, config=config,
                           seed=settings.seed if settings else 0)  # fmt: skip
        return cls(engine, settings, **kwargs)

    def teach(
        self,
        problems: Sequence[str | Problem | Mapping[str, Any]],
        student: Any,
        *,
        answer: bool = True,
        baseline: bool = False,
        step: int = 0,
        probes: Sequence[str] | None = None,
        student_kwargs: Mapping[str, Any] | None = None,
    ) -> list[TeachResult]:
        """Teaches ``student`` on every problem, ``batch_size`` problems per engine call.

        Args:
          problems: texts, ``Problem``s or dicts (see ``as_problem``); a ground truth turns on checking.
          student: an ``Engine``, a callable, a URL or a folder (``inference.students.as_engine``).
          answer: also get the student's taught answer.
          baseline: also get the student's answer without teaching.
          step: mixed into the sampling seeds (``settings.seed`` is the base), so calls can differ.
          probes: the students' approaches, when the caller already has them (no probe call is made; with
            ``answer=False`` and ``baseline=False`` the student is then never called and may be None).
          student_kwargs: more ``as_engine`` arguments when ``student`` is not an engine yet.

        Raises:
          ProblemError: a problem without text, or a teacher prompt over ``max_prompt_tokens`` even with the
            probe cut (``TwoPassRollout.teacher_prompts`` cuts long probes to fit).
          ValueError: bad arguments (probes of the wrong length, no student).
          StudentError, engines.openai_client.APIError, engines.server_client.ServerError: a remote
            student failed after its retries.
        """
        from atlas_jax.inference.students import as_engine

        items = [as_problem(p, i) for i, p in enumerate(problems)]
        if probes is not None and len(probes) != len(items):
            raise ValueError(f"got {len(probes)} probes for {len(items)} problems")
        if student is None and (probes is None or answer or baseline):
            raise ValueError("teach needs a student (to probe it or to get its answers)")
        owned = student is not None and not isinstance(student, Engine)
        engine = as_engine(student, **dict(student_kwargs or {})) if owned else student
        try:
            rollout = TwoPassRollout(engine or _NoStudent(), self.teacher, self.settings)
            out: list[TeachResult] = []
            for b, lo in enumerate(range(0, len(items), self.batch_size)):
                hi = lo + self.batch_size
                given = None if probes is None else list(probes[lo:hi])
                out.extend(self._batch(rollout, items[lo:hi], answer, baseline, step + b, given))
            return out
        finally:
            if owned:
                engine.close()

    def close(self) -> None:
        """Releases the teacher engine (processes, sockets, device memory)."""
        self.teacher.close()

    def __enter__(self) -> AdaptiveTeacher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one batch -----------------------------------------------------------------------------------
    def _batch(
        self,
        rollout: TwoPassRollout,
        problems: list[Problem],
        answer: bool,
        baseline: bool,
        step: int,
        given_probes: list[str] | None,
    ) -> list[TeachResult]:
        s = self.settings
        t = s.templates
        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        if given_probes is None:
            probe_comps: list[Completion | None] = list(rollout.probes(problems, step))
            probes = [c.text.strip() for c in probe_comps]
        else:
            probe_comps, probes = [None] * len(problems), [p.strip() for p in given_probes]
        seconds["probe"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        prompts: list[tuple[str, list[int]]] = []
        for i, p in enumerate(problems):  # one by one, so an over-long prompt names its problem
            try:
                [prompt], [probes[i]] = rollout.teacher_prompts([p], [probes[i]])  # a long probe gets cut
            except ValueError as e:
                raise ProblemError(str(e)) from e
            prompts.append(prompt)
        params = SamplingParams(temperature=self.temperature, top_p=self.top_p, max_tokens=s.max_teaching_tokens,
                                seed=rollout._seed(step, _PHASE_TEACHER))  # fmt: skip
        teacher_out = [group[0] for group in self.teacher.generate([ids for _, ids in prompts], params, n=1)]
        extracted = [extract_teaching(c.text, s.missing_teaching) for c in teacher_out]
        seconds["teach"] = time.perf_counter() - t0

        answers: list[Completion | None] = [None] * len(problems)
        if answer:
            t0 = time.perf_counter()
            texts = []
            for p, probe, (teaching, _) in zip(problems, probes, extracted, strict=True):
                if not teaching and s.empty_teaching == "baseline":  # no intervention: the student alone
                    texts.append(rollout._student_prompt(t.student_baseline, question=p.question))
                else:
                    texts.append(rollout._student_prompt(t.student_taught, question=p.question, approach=probe,
                                                         teaching=teaching))  # fmt: skip
            answers = [
                g[0]
                for g in rollout.student.generate(texts, self._student_params(rollout, step, _PHASE_TAUGHT))
            ]
            seconds["answer"] = time.perf_counter() - t0
        alone: list[Completion | None] = [None] * len(problems)
        if baseline:
            t0 = time.perf_counter()
            texts = [rollout._student_prompt(t.student_baseline, question=p.question) for p in problems]
            alone = [
                g[0]
                for g in rollout.student.generate(texts, self._student_params(rollout, step, _PHASE_BASELINE))
            ]
            seconds["baseline"] = time.perf_counter() - t0
        seconds["total"] = sum(seconds.values())
        per = {k: v / len(problems) for k, v in seconds.items()}

        tok = self.teacher.tokenizer
        results = []
        for i, p in enumerate(problems):
            teaching, found = extracted[i]
            r = TeachResult(
                id=p.id, problem=p.question, probe=probes[i], teaching=teaching, stayed_out=not teaching,
                teaching_tag_found=found, teacher_text=teacher_out[i].text, seconds=dict(per),
            )  # fmt: skip
            r.tokens = {
                "probe": None if probe_comps[i] is None else _ntok(probe_comps[i]),
                "teacher_prompt": len(prompts[i][1]),
                "teacher_completion": len(teacher_out[i].token_ids),
                "teaching": len(tok.encode(teaching, add_special_tokens=False)) if teaching else 0,
            }
            r.finish_reasons["teacher"] = teacher_out[i].finish_reason
            for name, comp in (("answer", answers[i]), ("baseline", alone[i])):
                if comp is None:
                    continue
                if p.answer:
                    got, ok = rollout.checker(comp.text, p.answer)
                else:
                    got, ok = extract_answer(comp.text, s.answer_extractor), None
                if name == "answer":
                    r.answer, r.extracted, r.correct = comp.text, got, ok
                else:
                    r.baseline_answer, r.baseline_extracted, r.baseline_correct = comp.text, got, ok
                r.tokens[name] = _ntok(comp)
                r.finish_reasons[name] = comp.finish_reason
            results.append(r)
        return results

    def _student_params(self, rollout: TwoPassRollout, step: int, phase: int) -> SamplingParams:
        s = self.settings
        return SamplingParams(temperature=s.student_temperature, max_tokens=s.max_student_tokens,
                              seed=rollout._seed(step, phase))  # fmt: skip


class _NoStudent(Engine):
    """Stands in when the caller gave the probes and wants no answers: any call is a bug."""

    @property
    def tokenizer(self) -> Any:
        return None

    def generate(self, prompts: Any, params: SamplingParams, n: int = 1) -> list[list[Completion]]:
        raise RuntimeError("no student was given")
