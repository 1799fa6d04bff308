"""The inference API: an adaptive teacher (a real tiny model trained to teach) against real students.

Teacher: a tiny transformers model fitted (``train_to_emit``) to write ``<thinking>secret plan</thinking>
<teaching>add the numbers</teaching>`` for the protocol's teacher prompts (a second one writes an empty
teaching). Students: a Python function that gets the sum right only when it is taught, a tiny model over
``atlas-serve``'s OpenAI routes on 127.0.0.1, and vLLM's own OpenAI server (slow).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import httpx
import pytest
from engine_helpers import ThreadServer, free_port
from protocol_helpers import HFEngine, Recorder, make_model, make_tokenizer, train_to_emit

from atlas_jax.engines.base import SamplingParams
from atlas_jax.engines.openai_client import APIError
from atlas_jax.inference import AdaptiveTeacher, CallableStudent, StudentError
from atlas_jax.protocol.batch import RolloutSettings
from atlas_jax.protocol.templates import DEFAULT_TEACHER, fill

pytestmark = pytest.mark.slow  # fitting the two tiny teachers takes ~40 s on 2 shared cores

TEACHING = "add the numbers"
COMPLETION = f"<thinking>secret plan</thinking><teaching>{TEACHING}</teaching>"
PROBE = "I will add them"
PROBLEMS = [("2+3", "5"), ("4+1", "5"), ("3+3", "6")]
SETTINGS = RolloutSettings(
    k=1, m=1, group_size=1, max_probe_tokens=8, max_teaching_tokens=64, max_student_tokens=8,
    student_temperature=0.0, teacher_temperature=0.0, seed=3,
)  # fmt: skip


def student_fn(prompt: str) -> str:
    """Probe: a plan; taught with the right hint: the right sum; otherwise a wrong answer."""
    if "Do not solve it yet" in prompt:
        return PROBE
    question = prompt.split("Problem: ")[1].split("\n")[0]
    if f"Teacher's guidance: {TEACHING}" in prompt:
        return f"\\boxed{{{eval(question)}}}"  # the question is a sum of digits written here
    return "\\boxed{0}"


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(320)


def _teacher_engine(tok, completion: str, seed: int) -> HFEngine:
    model = make_model(tok, seed=seed)
    prompts = [fill(DEFAULT_TEACHER, question=q, approach=PROBE) for q, _ in PROBLEMS]
    train_to_emit(model, tok, prompts, completion)
    return HFEngine(model, tok)


@pytest.fixture(scope="module")
def teacher_engine(tok):
    return _teacher_engine(tok, COMPLETION, seed=0)


@pytest.fixture(scope="module")
def empty_teacher_engine(tok):
    return _teacher_engine(tok, "<thinking>they can do it</thinking><teaching></teaching>", seed=1)


def problems():
    return [{"question": q, "answer": a, "id": f"q{i}"} for i, (q, a) in enumerate(PROBLEMS)]


def test_teach_a_python_callable(teacher_engine, tok):
    seen: list[str] = []

    def student(prompt: str) -> str:
        seen.append(prompt)
        return student_fn(prompt)

    teacher = AdaptiveTeacher(Recorder(teacher_engine), SETTINGS, batch_size=2)
    results = teacher.teach(problems(), CallableStudent(student, tokenizer=tok), baseline=True)
    assert [r.id for r in results] == ["q0", "q1", "q2"]
    assert len(teacher.teacher.calls) == 2  # batches of 2 + 1, one teacher call each
    for r, (q, a) in zip(results, PROBLEMS, strict=True):
        assert r.problem == q and r.probe == PROBE
        assert r.teaching == TEACHING and r.teaching_tag_found and not r.stayed_out
        assert "secret plan" in r.teacher_text
        assert r.answer == f"\\boxed{{{a}}}" and r.extracted == a and r.correct is True
        assert r.baseline_answer == "\\boxed{0}" and r.baseline_correct is False
        prompt = fill(DEFAULT_TEACHER, question=q, approach=PROBE)
        assert r.tokens["teacher_prompt"] == len(tok.encode(prompt, add_special_tokens=False))
        assert r.tokens["teaching"] == len(tok.encode(TEACHING, add_special_tokens=False))
        assert r.tokens["answer"] == len(tok.encode(r.answer, add_special_tokens=False))
        assert set(r.seconds) == {"probe", "teach", "answer", "baseline", "total"}
        assert r.finish_reasons["teacher"] == "stop"
    # The student saw the teaching but never the teacher's thinking.
    assert any(TEACHING in p for p in seen) and not any("secret plan" in p for p in seen)


def test_empty_teaching_means_the_teacher_stays_out(empty_teacher_engine):
    import dataclasses

    seen: list[str] = []

    def student(prompt: str) -> str:
        seen.append(prompt)
        return student_fn(prompt)

    for rule, taught_template in (("baseline", False), ("template", True)):
        seen.clear()
        settings = dataclasses.replace(SETTINGS, empty_teaching=rule)
        [r] = AdaptiveTeacher(empty_teacher_engine, settings).teach(problems()[:1], student)
        assert r.stayed_out and r.teaching == "" and r.teaching_tag_found
        answer_prompt = seen[-1]
        assert ("Teacher's guidance" in answer_prompt) is taught_template, rule
        assert r.correct is False  # this student needs the hint


def test_given_probes_need_no_student(teacher_engine):
    teacher = AdaptiveTeacher(teacher_engine, SETTINGS)
    [r] = teacher.teach(["2+3"], None, answer=False, probes=[PROBE])
    assert r.teaching == TEACHING and r.answer is None and r.tokens["probe"] is None
    with pytest.raises(ValueError, match="needs a student"):
        teacher.teach(["2+3"], None, probes=[PROBE])  # answers need a student
    with pytest.raises(ValueError, match="no problem text"):
        teacher.teach([{"answer": "3"}], student_fn)


def test_callable_retries_timeouts_and_concurrency():
    params = SamplingParams(max_tokens=4)
    calls = {"n": 0}

    def flaky(prompt: str) -> str:
        calls["n"] += 1
        if calls["n"] <= 2:
            raise ConnectionError("try again")
        return "ok"

    [[c]] = CallableStudent(flaky, retries=2, backoff=0.0).generate(["x"], params)
    assert c.text == "ok" and calls["n"] == 3
    calls["n"] = 0
    with pytest.raises(StudentError, match=r"after 2 attempt\(s\): ConnectionError: try again"):
        CallableStudent(flaky, retries=1, backoff=0.0).generate(["x"], params)

    release = threading.Event()
    slow = CallableStudent(lambda p: release.wait(30) and "late", timeout=0.2)
    with pytest.raises(StudentError, match=r"no answer within 0\.2 s"):
        slow.generate(["x"], params)
    release.set()

    # Two calls are in flight at once (the barrier needs both), never more than `concurrency`.
    barrier, lock, state = threading.Barrier(2, timeout=20), threading.Lock(), {"now": 0, "max": 0}

    def together(prompt: str) -> str:
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        barrier.wait()
        with lock:
            state["now"] -= 1
        return prompt.upper()

    out = CallableStudent(together, concurrency=2).generate(["a", "b", "c", "d"], params)
    assert [o[0].text for o in out] == ["A", "B", "C", "D"] and state["max"] == 2
    batched = CallableStudent(lambda ps, params: [p * params.max_tokens for p in ps], batched=True)
    assert [o[0].text for o in batched.generate(["a", "b"], params)] == ["aaaa", "bbbb"]


@pytest.fixture(scope="module")
def served_student(tok):
    """A tiny real model behind atlas-serve's app (its OpenAI routes), greedy."""
    from atlas_jax.engines.server_app import create_app

    engine = HFEngine(make_model(tok, seed=5), tok)
    server = ThreadServer(create_app(engine, role="student", model_name="tiny-student"))
    yield engine, server
    server.stop()


def test_remote_student_equals_local(teacher_engine, served_student, tok):
    """Teaching the model over HTTP (model name from /v1/models) gives what teaching it in-process gives."""
    engine, server = served_student
    teacher = AdaptiveTeacher(teacher_engine, SETTINGS)
    local = teacher.teach(problems(), engine, baseline=True)
    remote = teacher.teach(problems(), server.url + "/v1", baseline=True, student_kwargs={"tokenizer": tok})
    for a, b in zip(local, remote, strict=True):
        assert (a.probe, a.teaching, a.answer, a.baseline_answer) == (
            b.probe,
            b.teaching,
            b.answer,
            b.baseline_answer,
        )
        assert a.tokens == b.tokens


def test_unreachable_student_names_the_url(teacher_engine):
    url = f"http://127.0.0.1:{free_port()}/v1"
    teacher = AdaptiveTeacher(teacher_engine, SETTINGS)
    with pytest.raises(StudentError, match=f"GET {url}/models failed"):
        teacher.teach(["2+3"], url)
    kw = {"model": "m", "retries": 1, "backoff": 0.01}
    with pytest.raises(APIError, match=f"POST {url}/completions failed after 2 attempts"):
        teacher.teach(["2+3"], url, student_kwargs=kw)


def test_atlas_serve_openai_surface_models_and_stream(served_student):
    """The `openai` client against atlas-serve's app: models.list(), completions and chat, stream or not."""
    import openai

    _, server = served_student
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["tiny-student"]
    assert client.models.retrieve("tiny-student").id == "tiny-student"
    kw = {"model": "tiny-student", "max_tokens": 6, "temperature": 0.0, "seed": 1}
    full = client.completions.create(prompt="the quick", **kw)
    chunks = list(client.completions.create(prompt="the quick", stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text != ""
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    msgs = [{"role": "user", "content": "the lazy dog"}]
    chat = client.chat.completions.create(messages=msgs, **kw)
    stream = list(client.chat.completions.create(messages=msgs, stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in stream) == chat.choices[0].message.content
    assert stream[-1].choices[0].finish_reason == chat.choices[0].finish_reason


@pytest.fixture(scope="module")
def teach_server(teacher_engine, served_student):
    from atlas_jax.inference.server import create_teach_app

    teacher = AdaptiveTeacher(teacher_engine, SETTINGS)
    open_app = create_teach_app(teacher, CallableStudent(student_fn), model_name="atlas-tutor",
                                allow_request_students=True)  # fmt: skip
    keyed_app = create_teach_app(teacher, CallableStudent(student_fn), api_key="k3y")
    servers = ThreadServer(open_app), ThreadServer(keyed_app)
    yield servers
    for s in servers:
        s.stop()


def test_teach_server_with_the_openai_client(teach_server):
    """Teacher + student as one OpenAI model: list it, ask it, stream it."""
    import openai

    server, _ = teach_server
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["atlas-tutor"]
    msgs = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "4+1"}]
    out = client.chat.completions.create(model="atlas-tutor", messages=msgs)
    assert out.choices[0].message.content == "\\boxed{5}"
    extra = out.model_extra["atlas"]
    assert extra["teaching"] == TEACHING and extra["probe"] == PROBE and extra["stayed_out"] is False
    stream = list(client.chat.completions.create(model="atlas-tutor", messages=msgs, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in stream) == "\\boxed{5}"
    with pytest.raises(openai.UnprocessableEntityError, match="n must be 1"):
        client.chat.completions.create(model="atlas-tutor", messages=msgs, n=2)


def test_teach_endpoint(teach_server, served_student):
    server, keyed = teach_server
    _, student_server = served_student
    r = httpx.post(server.url + "/v1/teach", json={"problem": "2+3"}, timeout=60)
    assert r.status_code == 200, r.text
    [res] = r.json()["results"]
    assert res["teaching"] == TEACHING and res["answer"] is None and res["probe"] == PROBE
    r = httpx.post(server.url + "/v1/teach", json={"problems": [{"question": "3+3", "answer": "6"}],
                                                  "answer": True}, timeout=60)  # fmt: skip
    assert r.json()["results"][0]["correct"] is True
    # A student named in the request (allowed on this server): the tiny model behind atlas-serve.
    spec = {"base_url": student_server.url + "/v1"}
    r = httpx.post(
        server.url + "/v1/teach", json={"problem": "2+3", "answer": True, "student": spec}, timeout=60
    )
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["teaching"] == TEACHING and r.json()["results"][0]["answer"] is not None
    # Refused by default, and a down student is a 502 naming it.
    r = httpx.post(keyed.url + "/v1/teach", json={"problem": "2+3", "student": spec},
                   headers={"Authorization": "Bearer k3y"}, timeout=60)  # fmt: skip
    assert r.status_code == 403 and "allow_request_students" in r.text
    down = {"base_url": f"http://127.0.0.1:{free_port()}/v1"}
    r = httpx.post(server.url + "/v1/teach", json={"problem": "2+3", "student": down}, timeout=60)
    assert r.status_code == 502 and down["base_url"] in r.text
    assert httpx.post(server.url + "/v1/teach", json={}, timeout=10).status_code == 422
    # The api key guards every /v1 route.
    assert httpx.post(keyed.url + "/v1/teach", json={"problem": "2+3"}, timeout=10).status_code == 401
    bad = {"Authorization": "Bearer nope"}
    assert (
        httpx.post(keyed.url + "/v1/teach", json={"problem": "2+3"}, headers=bad, timeout=10).status_code
        == 403
    )
    ok = httpx.post(keyed.url + "/v1/teach", json={"problem": "2+3"}, headers={"Authorization": "Bearer k3y"},
                    timeout=60)  # fmt: skip
    assert ok.status_code == 200


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.multiprocess
def test_vllm_openai_server_as_student(teacher_engine, tmp_path):
    """vLLM's own OpenAI server (`python -m vllm.entrypoints.openai.api_server`) is a student like any other:
    its probes and answers alone equal those of the same weights in-process (transformers, greedy)."""
    import torch
    from engine_helpers import make_hf_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = make_hf_dir(tmp_path / "student", tied=True, seed=2)
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    log = open(tmp_path / "vllm.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(d), "--host", "127.0.0.1",
         "--port", str(port), "--max-model-len", "256", "--dtype", "float32", "--served-model-name", "tiny", "--enforce-eager"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 900
        while True:
            assert proc.poll() is None, (tmp_path / "vllm.log").read_text()[-3000:]
            try:
                if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "vllm.log").read_text()[-3000:]
            time.sleep(1)
        stok = AutoTokenizer.from_pretrained(str(d))
        reference = HFEngine(AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval(), stok)
        teacher = AdaptiveTeacher(teacher_engine, SETTINGS)
        local = teacher.teach(problems(), reference, baseline=True)
        remote = teacher.teach(problems(), url + "/v1", baseline=True, student_kwargs={"tokenizer": str(d)})
        for a, b in zip(local, remote, strict=True):
            # Same greedy tokens (vLLM returns ids as token_id:<id>); texts may differ only in a trailing
            # incomplete UTF-8 byte, which vLLM's incremental detokenizer holds back on a random model.
            assert (
                a.tokens["probe"] == b.tokens["probe"] > 0
                and a.tokens["baseline"] == b.tokens["baseline"] > 0
            )
            assert a.probe.rstrip("\ufffd") == b.probe.rstrip("\ufffd")
            assert a.baseline_answer.rstrip("\ufffd") == b.baseline_answer.rstrip("\ufffd")
            assert isinstance(b.answer, str) and b.tokens["answer"] > 0
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


# -- atlas-teach (the CLI, as a subprocess, against a teacher server and a student server) ------------------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cli_servers(teacher_engine, tok, tmp_path_factory):
    """The fitted teacher behind atlas-serve's /generate, the sum student behind its OpenAI routes."""
    from atlas_jax.engines.server_app import create_app

    tok_dir = tmp_path_factory.mktemp("teacher_tok")
    tok.save_pretrained(tok_dir)
    teacher = ThreadServer(create_app(teacher_engine, role="teacher"))
    student = ThreadServer(create_app(CallableStudent(student_fn), role="student", model_name="sums"))
    yield teacher.url, student.url + "/v1", tok_dir
    teacher.stop()
    student.stop()


def atlas_teach(inp, out, teacher_url, student_url, tok_dir, *flags):
    cmd = [sys.executable, "-m", "launch.teach", "--config=configs/base.py", f"--input={inp}", f"--output={out}",
           f"--teacher={teacher_url}", f"--teacher_tokenizer={tok_dir}", f"--student={student_url}",
           "--temperature=0", "--config.protocol.max_teaching_tokens=64", "--retries=1", "--batch_size=2", *flags]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def rows_of(path):
    import json

    return [json.loads(line) for line in path.read_text().splitlines()]


def test_atlas_teach_resumes_and_skips_bad_rows(cli_servers, tmp_path):
    import json

    teacher_url, student_url, tok_dir = cli_servers
    inp, out = tmp_path / "problems.jsonl", tmp_path / "taught.jsonl"
    lines = [
        {"prompt": "2+3", "ground_truth": "5"}, "this is not json", {"prompt": "4+1", "ground_truth": 5, "id": "x"},
        {"question": "3+3"}, {"prompt": "3+3", "ground_truth": "6"}, "", {"prompt": "1+1"},
        {"prompt": "1+" * 3000 + "1", "ground_truth": "3001"},  # over protocol.max_prompt_tokens
    ]  # fmt: skip
    inp.write_text("".join((json.dumps(r) if isinstance(r, dict) else r) + "\n" for r in lines))

    first = atlas_teach(inp, out, teacher_url, student_url, tok_dir, "--num_problems=3")
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"{inp}:2: skipped: not JSON" in first.stderr and "teach:" in first.stderr  # bad row, progress bar
    assert [r["line"] for r in rows_of(out)] == [1, 3]
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    assert (
        summary["written"] == 2 and summary["accuracy_taught"] == 1.0 and summary["problems_per_second"] > 0
    )

    second = atlas_teach(inp, out, teacher_url, student_url, tok_dir, "--baseline")
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"{inp}:4: skipped: field 'prompt' missing" in second.stderr
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    assert summary["skipped_done"] == 2 and summary["written"] == 2
    assert [b["line"] for b in summary["bad_rows"]] == [2, 4, 8]
    assert f"{inp}:8: skipped: teacher prompt of problem 'line8'" in second.stderr
    rows = rows_of(out)
    assert [r["line"] for r in rows] == [1, 3, 5, 7] and [r["id"] for r in rows][1] == "x"
    assert [r["correct"] for r in rows] == [True, True, True, None]
    assert rows[2]["baseline_correct"] is False and rows[2]["teaching"] == TEACHING
    assert rows[2]["ground_truth"] == "6" and rows[2]["tokens"]["teaching"] > 0

    # A crash mid-write leaves a torn last line: the next run drops it and writes that row again.
    text = out.read_text()
    out.write_text(text[: len(text) - 40])
    third = atlas_teach(inp, out, teacher_url, student_url, tok_dir)
    assert third.returncode == 0 and "dropping a torn last line" in third.stderr
    assert [r["line"] for r in rows_of(out)] == [1, 3, 5, 7]

    # A student that is down: a clear error naming it, and the finished rows stay.
    with open(inp, "a") as f:
        f.write(json.dumps({"prompt": "2+2", "ground_truth": "4"}) + "\n")
    down = f"http://127.0.0.1:{free_port()}/v1"
    fourth = atlas_teach(inp, out, teacher_url, down, tok_dir, "--student_model=sums")
    assert fourth.returncode != 0 and down in fourth.stderr
    assert [r["line"] for r in rows_of(out)] == [1, 3, 5, 7]
