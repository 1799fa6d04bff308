"""The two-pass rollout: problems in, ``RolloutBatch`` (see ``protocol/batch.py``) out.

Phases, each one batched ``Engine.generate`` call:
1. baseline: k student samples per problem without teaching, only for problems not yet in the cache
   (the student is frozen, so p0 is computed once per problem for the life of the object; the cache key
   is ``Problem.key``, the id *and* a hash of question + answer; ``baseline_state`` /
   ``load_baseline_state`` move the cache in and out of checkpoints);
2. probe (pass 1): one student sample per problem, at most ``max_probe_tokens`` tokens;
3. teacher (pass 2): G samples per problem, all conditioned on the same prompt (problem + probe). The
   prompt is tokenised here with the teacher tokenizer and passed as ids, so the ids stored in each
   ``Episode`` are exactly what the teacher was conditioned on. A prompt over ``max_prompt_tokens`` (the
   probe re-tokenised by the teacher can be longer than in student tokens) gets its probe cut to fit,
   counted in ``RolloutBatch.probes_cut``; problems too long even with an empty probe are found when the
   data is loaded (``protocol/screening.py``), not here;
4. teaching extraction (``protocol/teaching.py``): thinking never reaches the student;
5. taught: m student samples per teaching (P·G prompts in one call);
6. rewards (``atlas_jax.rewards``): Δ = p1 − p0, efficiency bonus (0 for an empty teaching, a missing
   ``<teaching>`` tag or a truncated teacher completion: ``rewards.guarded_efficiency``), leak check
   (``protocol/leak.py``, on the teaching, with the question), reward terms.
Student and teacher engines may be different engines with different tokenizers: student prompts are
text (tokenised by the student engine), teacher prompts are teacher-token ids.

Shares. In a multi-host run each host rolls out its own share of a step's problems; ``row_offsets(phase,
count)`` (called once per phase, also when this host has nothing to ask in that phase) returns where this
host's ``count`` prompts start in the concatenation of every host's prompts of that phase, and each call is
seeded from there (``SamplingParams.row_offset``), so the shares sample what one call for all would.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from atlas_jax.data.rl import Problem
from atlas_jax.engines.base import Completion, Engine, SamplingParams
from atlas_jax.protocol.answers import AnswerChecker, contains_answer
from atlas_jax.protocol.batch import (
    Episode,
    ProblemGroup,
    RolloutBatch,
    RolloutSettings,
    StudentSamples,
    samples_from_state,
    samples_state,
)
from atlas_jax.protocol.teaching import extract_teaching
from atlas_jax.protocol.templates import fill, render
from atlas_jax.rewards import RewardInputs, efficiency_bonus, get_reward, guarded_efficiency

# Phase offsets mixed into the sampling seed so phases and steps draw different random numbers.
_PHASE_BASELINE, _PHASE_PROBE, _PHASE_TEACHER, _PHASE_TAUGHT = range(4)


class TwoPassRollout:
    """Runs the protocol for batches of problems with a frozen student and a teacher policy.

    Holds only the engines, the settings and the per-problem baseline cache (``{Problem.key: samples}``).
    """

    def __init__(
        self,
        student: Engine,
        teacher: Engine,
        settings: RolloutSettings,
        row_offsets: Callable[[str, int], int] | None = None,
    ) -> None:
        self.student = student
        self.teacher = teacher
        self.settings = settings
        self.checker = AnswerChecker(settings.answer_extractor, settings.verifier)
        self.reward_fn = get_reward(settings.reward)
        self.baseline_cache: dict[str, StudentSamples] = {}
        self.num_baseline_calls = 0
        self.row_offsets = row_offsets or (lambda phase, count: 0)
        self.probes_cut = 0  # probes shortened to fit max_prompt_tokens (over the object's life)

    # -- helpers -------------------------------------------------------------------------------------
    def _seed(self, step: int, phase: int) -> int:
        return (self.settings.seed * 1_000_003 + step * 16 + phase) % (2**31 - 1)

    def _student_prompt(self, template: str, **values: str) -> str:
        t = self.settings.templates
        return render(
            fill(template, **values),
            tokenizer=self.student.tokenizer if t.student_chat else None,  # remote students may have none
            chat=t.student_chat,
            system=t.student_system,
            enable_thinking=t.student_enable_thinking,
        )

    def teacher_prompt(self, question: str, approach: str) -> tuple[str, list[int]]:
        """The rendered teacher prompt and its teacher-token ids."""
        t, tok = self.settings.templates, self.teacher.tokenizer
        text = render(
            fill(t.teacher, question=question, approach=approach),
            tokenizer=tok,
            chat=t.teacher_chat,
            system=t.teacher_system,
            enable_thinking=t.teacher_enable_thinking,
        )
        return text, list(tok.encode(text, add_special_tokens=False))

    def baseline_state(self) -> dict[str, dict]:
        """The baseline cache as JSON-able data (see ``batch.samples_state``), for a checkpoint."""
        return {key: samples_state(s) for key, s in self.baseline_cache.items()}

    def load_baseline_state(self, state: dict[str, dict]) -> None:
        """Restores a cache written by ``baseline_state`` (replacing the current one)."""
        self.baseline_cache = {key: samples_from_state(v) for key, v in state.items()}

    def _score(self, prompt: str, completions: Sequence[Completion], answer: str) -> StudentSamples:
        checked = [self.checker(c.text, answer) for c in completions]
        return StudentSamples(
            prompt=prompt,
            texts=[c.text for c in completions],
            answers=[a for a, _ in checked],
            correct=[ok for _, ok in checked],
            num_tokens=[len(c.token_ids) for c in completions],
            finish_reasons=[c.finish_reason for c in completions],
        )

    def _student_params(
        self, step: int, phase: int, *, probe: bool = False, row_offset: int = 0
    ) -> SamplingParams:
        s = self.settings
        if probe:
            return SamplingParams(
                temperature=s.probe_temperature, max_tokens=s.max_probe_tokens, seed=self._seed(step, phase),
                row_offset=row_offset,
            )  # fmt: skip
        return SamplingParams(
            temperature=s.student_temperature, max_tokens=s.max_student_tokens, seed=self._seed(step, phase),
            row_offset=row_offset,
        )  # fmt: skip

    # -- phases --------------------------------------------------------------------------------------
    def baselines(self, problems: Sequence[Problem], step: int = 0) -> int:
        """Fills the baseline cache for problems not in it (one engine call); returns the cache hits."""
        todo: dict[str, Problem] = {}
        for p in problems:
            if p.key not in self.baseline_cache:
                todo.setdefault(p.key, p)
        hits = sum(1 for p in problems if p.key not in todo)
        offset = self.row_offsets("baseline", len(todo))
        if not todo:
            return hits
        pending = list(todo.values())
        tmpl = self.settings.templates.student_baseline
        prompts = [self._student_prompt(tmpl, question=p.question) for p in pending]
        params = self._student_params(step, _PHASE_BASELINE, row_offset=offset)
        outs = self.student.generate(prompts, params, n=self.settings.k)
        self.num_baseline_calls += 1
        for p, prompt, comps in zip(pending, prompts, outs, strict=True):
            self.baseline_cache[p.key] = self._score(prompt, comps, p.answer)
        return hits

    def probes(self, problems: Sequence[Problem], step: int = 0) -> list[Completion]:
        """One probe per problem (one engine call), capped at ``max_probe_tokens``."""
        tmpl = self.settings.templates.student_probe
        prompts = [self._student_prompt(tmpl, question=p.question) for p in problems]
        params = self._student_params(
            step, _PHASE_PROBE, probe=True, row_offset=self.row_offsets("probe", len(prompts))
        )
        outs = self.student.generate(prompts, params, n=1)
        return [o[0] for o in outs]

    def teacher_prompts(
        self, problems: Sequence[Problem], probes: Sequence[str]
    ) -> tuple[list[tuple[str, list[int]]], list[str]]:
        """Rendered teacher prompts with their teacher-token ids, and the probes they contain.

        A prompt over ``max_prompt_tokens`` gets its probe cut (in teacher tokens, from the end) until it
        fits; the returned probes are the cut ones.

        Raises:
          ValueError: a prompt is too long even with an empty probe (names the problem id); load-time
            screening (``protocol/screening.py``) removes such problems first.
        """
        limit, tok = self.settings.max_prompt_tokens, self.teacher.tokenizer
        result, used = [], []
        for p, probe in zip(problems, probes, strict=True):
            text, ids = self.teacher_prompt(p.question, probe)
            if len(ids) > limit:
                probe_ids = list(tok.encode(probe, add_special_tokens=False))
                keep = len(probe_ids)
                while len(ids) > limit and keep > 0:  # each pass drops >= 1 probe token
                    keep = max(keep - (len(ids) - limit), 0)
                    probe = tok.decode(probe_ids[:keep]).strip()
                    text, ids = self.teacher_prompt(p.question, probe)
                if len(ids) > limit:
                    raise ValueError(
                        f"teacher prompt of problem {p.id!r} has {len(ids)} tokens with an empty probe > "
                        f"protocol.max_prompt_tokens={limit}; screen the problems at load time "
                        "(protocol.screening.screen_problems) or raise --config.protocol.max_prompt_tokens"
                    )
                self.probes_cut += 1
            result.append((text, ids))
            used.append(probe)
        return result, used

    # -- the whole rollout ---------------------------------------------------------------------------
    def run(self, problems: Sequence[Problem], step: int = 0) -> RolloutBatch:
        """Runs all phases for ``problems`` and scores every teacher sample."""
        s = self.settings
        if not problems:
            raise ValueError("TwoPassRollout.run needs at least one problem")
        hits = self.baselines(problems, step)
        probe_comps = self.probes(problems, step)
        cut_before = self.probes_cut
        prompts, probes = self.teacher_prompts(problems, [c.text.strip() for c in probe_comps])
        teacher_params = SamplingParams(
            temperature=s.teacher_temperature,
            top_p=s.teacher_top_p,
            max_tokens=s.max_teaching_tokens,
            seed=self._seed(step, _PHASE_TEACHER),
            row_offset=self.row_offsets("teacher", len(prompts)),
        )
        teacher_out = self.teacher.generate([ids for _, ids in prompts], teacher_params, n=s.group_size)

        teachings: list[list[tuple[str, bool]]] = [
            [extract_teaching(c.text, s.missing_teaching) for c in comps] for comps in teacher_out
        ]
        taught_prompts = [
            self._student_prompt(s.templates.student_taught, question=p.question, approach=probe, teaching=t)
            for p, probe, group in zip(problems, probes, teachings, strict=True)
            for t, _ in group
        ]
        # "baseline": an empty teaching is no intervention, its taught samples are the baseline's (no call).
        skip = [s.empty_teaching == "baseline" and not t for group in teachings for t, _ in group]
        asked = [q for q, sk in zip(taught_prompts, skip, strict=True) if not sk]
        taught_params = self._student_params(
            step, _PHASE_TAUGHT, row_offset=self.row_offsets("taught", len(asked))
        )
        answers = iter(self.student.generate(asked, taught_params, n=s.m) if asked else [])
        taught_out = [None if sk else next(answers) for sk in skip]

        groups = []
        tok = self.teacher.tokenizer
        for i, (p, probe_c, probe, (prompt_text, prompt_ids)) in enumerate(
            zip(problems, probe_comps, probes, prompts, strict=True)
        ):
            baseline = self.baseline_cache[p.key]
            p0 = baseline.pass_rate
            episodes = []
            for g, comp in enumerate(teacher_out[i]):
                teaching, found = teachings[i][g]
                j = i * s.group_size + g
                out_j = taught_out[j]
                taught = baseline if out_j is None else self._score(taught_prompts[j], out_j, p.answer)
                teaching_tokens = len(tok.encode(teaching, add_special_tokens=False)) if teaching else 0
                eff = guarded_efficiency(
                    efficiency_bonus(
                        s.reward_params.efficiency,
                        teaching_tokens=teaching_tokens,
                        max_teaching_tokens=s.max_teaching_tokens,
                        baseline_tokens=baseline.mean_tokens,
                        taught_tokens=taught.mean_tokens,
                    ),
                    teaching=teaching,
                    tag_found=found,
                    truncated=comp.finish_reason == "length",
                )
                leaked = bool(teaching) and contains_answer(teaching, p.answer, p.question)
                terms = self.reward_fn(RewardInputs(p0, taught.pass_rate, eff, leaked), s.reward_params)
                episodes.append(
                    Episode(
                        teacher_prompt=prompt_text,
                        teacher_prompt_ids=list(comp.prompt_ids) or list(prompt_ids),
                        teacher_completion_ids=list(comp.token_ids),
                        teacher_logprobs=list(comp.logprobs),
                        teacher_finish_reason=comp.finish_reason,
                        teacher_text=comp.text,
                        teaching=teaching,
                        teaching_tag_found=found,
                        teaching_tokens=teaching_tokens,
                        leaked=leaked,
                        taught=taught,
                        p1=taught.pass_rate,
                        delta=taught.pass_rate - p0,
                        eff=eff,
                        reward=terms["reward"],
                        reward_terms=terms,
                    )
                )
            groups.append(
                ProblemGroup(
                    problem_id=p.id,
                    problem=p.question,
                    answer=p.answer,
                    baseline=baseline,
                    p0=p0,
                    probe=probe,
                    probe_tokens=len(probe_c.token_ids),
                    episodes=episodes,
                )
            )
        return RolloutBatch(groups=groups, baseline_cache_hits=hits, probes_cut=self.probes_cut - cut_before)
