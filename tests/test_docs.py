"""Every shell command in the docs runs: each ```bash block under ``docs/`` is executed, in order.

The convention (for everyone who writes docs):

* A ```bash block is a bash script run with ``set -euo pipefail`` from a scratch folder that looks like a
  fresh checkout (every top-level entry of the repo is linked into it; outputs such as ``runs/`` land in
  the scratch folder, shared by all blocks of the session, so a later block can use an earlier block's run
  folder). ``python`` is this interpreter; the console scripts of ``setup.py`` (``atlas-train``,
  ``atlas-teach``, ...) run this tree's code. Background jobs (``cmd &``) are killed when the block ends.
  A block fails the test when any command in it fails.
* Write commands as a user types them (real sizes). Where a command must run smaller here, add a row to
  ``SUBSTITUTIONS`` below (doc file pattern, text in the block, replacement, why): substitutions are plain
  text replacements applied to the block before it runs, so the doc shows the real command.
* Commands already executed verbatim by another test may be listed in ``COVERED`` with that test's
  node id (the test checks that it exists and contains the command's distinguishing flag).
* Commands that need hardware we do not have (TPU pods, GPU nodes, clusters) go in ```text blocks with a
  line above saying why they are not executed here. ```sh / ```shell / ```console fences are refused (they
  would hide a command from this test).
* Blocks run file by file in ``DOC_ORDER`` (then the other pages alphabetically), top to bottom.
* ``docs/config_reference.md`` is generated: ``python -m configs.reference`` rewrites it, and
  ``test_config_reference_is_current`` fails when it drifts from ``configs/base.py``.
"""

from __future__ import annotations

import fnmatch
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
DOC_ORDER = ("installation.md", "quickstart.md", "first_experiment.md", "inference.md")
QS_CI = "configs/run/quickstart_ci.py"

# (doc file glob, text in the block, replacement, why). Applied in order, to every matching block.
SUBSTITUTIONS: list[tuple[str, str, str, str]] = [
    ("installation.md", 'pip install -e ".[cpu,test]"',
     'pip install --dry-run --no-deps --no-build-isolation --no-index -e ".[cpu,test]"',
     "checks that setup.py builds and names the extras without changing the test venv or the network"),
    ("*", "--config=configs/run/quickstart.py", f"--config={QS_CI} --config.output_dir=runs/quickstart",
     "the quickstart at CI size (configs/run/quickstart_ci.py), in the quickstart's own run folder; a "
     "later --config.output_dir in the doc command still wins"),
    ("first_experiment.md", "/models/Qwen3-0.6B", "runs/quickstart/student/hf",
     "the quickstart's tiny trained student stands in for Qwen3-0.6B (no downloads)"),
    ("first_experiment.md", "--config=configs/run/teacher_sft.py",
     "--config=configs/run/teacher_sft.py --config.sft.num_steps=2 --config.sft.batch_size=2 "
     "--config.sft.micro_batch_size=2 --config.sft.max_length=160 --config.model.compute_dtype=float32",
     "2 SFT steps"),
    ("first_experiment.md", "--config=configs/run/teacher_rcl.py",
     "--config=configs/run/teacher_rcl.py --config.grpo.num_steps=1 --config.grpo.problems_per_step=2 "
     "--config.grpo.num_generations=2 --config.grpo.micro_batch_size=4 --config.protocol.max_probe_tokens=8 "
     "--config.protocol.max_teaching_tokens=16 --config.protocol.max_student_tokens=8 "
     "--config.protocol.num_baseline_samples=1 --config.protocol.num_student_samples=1 --config.eval.every_steps=0 "
     "--config.eval.num_problems=2 --config.eval.num_seeds=1 --config.eval.chunk=2 --config.model.compute_dtype=float32",
     "1 GRPO step of 2 problems x 2 samples, tiny budgets; the evaluation on 2 problems, 1 seed"),
    ("benchmarks.md", "--batch_size=108", "--batch_size=12", "the CI quickstart holds 12 held-out problems"),
    ("multihost.md", "--config=configs/run/teacher_sft.py",
     "--config=configs/run/teacher_sft.py --config.model.teacher=runs/quickstart/student/hf "
     "--config.data.sft_path=atlas_jax/data/samples/sft_sample.jsonl --config.sft.num_steps=2 --config.sft.batch_size=8 "
     "--config.sft.micro_batch_size=4 --config.sft.max_length=96 --config.output_dir=runs/multihost_sft",
     "the quickstart's tiny student and the sample SFT rows stand in for a real teacher and data set, 2 steps"),
    ("multihost.md", "/work/venv/bin/pytest tests/test_distributed.py ", "python -m pytest --collect-only -q "
     "tests/test_distributed.py ", "the suite runs these tests itself; here the command and selection are checked"),
]  # fmt: skip

# Doc commands (stripped lines, before substitution) that another test runs verbatim -> that test.
COVERED: dict[str, tuple[str, str]] = {
    "python -m launch.train --config=configs/run/quickstart.py --config.engine.kind=vllm "
    "--config.output_dir=runs/quickstart_vllm": (
        "tests/test_quickstart.py::test_quickstart_ci_on_vllm_cpu",
        "--config.engine.kind=vllm",
    ),
}

_FENCE = re.compile(r"^\s*```(\S*)\s*$")
_REFUSED = ("sh", "shell", "console", "zsh", "shell-session")


def doc_blocks(docs: Path = DOCS) -> list[tuple[str, int, str]]:
    """(doc file name, first line of the block, block text) of every ```bash block, in run order."""
    files = sorted(docs.glob("*.md"), key=lambda p: (p.name not in DOC_ORDER, _order(p.name), p.name))
    out = []
    for path in files:
        lang, start, body = None, 0, []
        for i, line in enumerate(path.read_text().splitlines(), 1):
            m = _FENCE.match(line)
            if m and lang is None:
                lang, start, body = m.group(1), i, []
            elif m and not m.group(1):
                if lang == "bash":
                    out.append((path.name, start, "\n".join(body) + "\n"))
                lang = None
            elif lang is not None:
                body.append(line)
    return out


def _order(name: str) -> int:
    return DOC_ORDER.index(name) if name in DOC_ORDER else len(DOC_ORDER)


def prepare(block: str, doc: str) -> str:
    """The block as it runs here: covered commands dropped, substitutions applied."""
    lines = []
    for line in block.splitlines():
        if line.strip() in COVERED:
            lines.append(f": covered by {COVERED[line.strip()][0]}")
        else:
            lines.append(line)
    text = "\n".join(lines) + "\n"
    for pattern, old, new, _ in SUBSTITUTIONS:
        if fnmatch.fnmatch(doc, pattern):
            text = text.replace(old, new)
    return text


def _entry_points() -> dict[str, str]:
    """console script name -> "module:function" from setup.py."""
    return dict(re.findall(r'"([a-z][a-z0-9-]*)=([\w.]+:\w+)"', (ROOT / "setup.py").read_text()))


def make_workdir(path: Path) -> tuple[Path, dict[str, str]]:
    """A scratch checkout (links to the repo's top-level entries) and the environment blocks run in."""
    path.mkdir(parents=True, exist_ok=True)
    for entry in ROOT.iterdir():
        if entry.name in (".git", "runs", ".venv") or (path / entry.name).exists():
            continue
        (path / entry.name).symlink_to(entry)
    bin_dir = path / ".docs_bin"
    bin_dir.mkdir(exist_ok=True)
    shims = {"python": f'exec {sys.executable} "$@"', "python3": f'exec {sys.executable} "$@"'}
    for name, target in _entry_points().items():
        module, func = target.split(":")
        shims[name] = (
            f'exec {sys.executable} -c \'import sys; sys.argv[0] = "{name}"; '
            f'from {module} import {func}; {func}()\' "$@"'
        )
    for name, body in shims.items():
        shim = bin_dir / name
        shim.write_text(f"#!/bin/bash\n{body}\n")
        shim.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, like a user's shell
    env.update(PATH=f"{bin_dir}:{Path(sys.executable).parent}:{env.get('PATH', '')}", PYTHONPATH=str(ROOT))
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # Doc commands compile the same tiny programs again and again: share them through JAX's persistent cache.
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(path / ".jax_cache"))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    return path, env


def run_block(
    text: str, cwd: Path, env: dict[str, str], timeout: float = 1500
) -> subprocess.CompletedProcess:
    """Runs one prepared block as a bash script (fails on the first failing command)."""
    script = "set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n" + text
    return subprocess.run(
        ["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


BLOCKS = doc_blocks()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_workdir(tmp_path_factory.mktemp("docs_run"))


@pytest.mark.slow
@pytest.mark.parametrize("doc,line,block", BLOCKS, ids=[f"{d}:{n}" for d, n, _ in BLOCKS])
def test_doc_block_runs(doc, line, block, workdir):
    cwd, env = workdir
    text = prepare(block, doc)
    proc = run_block(text, cwd, env)
    if proc.returncode != 0:
        pytest.fail(
            f"docs/{doc}:{line}: a command of this ```bash block failed (exit {proc.returncode}).\n"
            f"--- block as run (after tests/test_docs.py SUBSTITUTIONS) ---\n{text}"
            f"--- stdout (tail) ---\n{proc.stdout[-3000:]}\n--- stderr (tail) ---\n{proc.stderr[-5000:]}\n"
            "Fix the doc or the code; if the command must run smaller here, add a row to SUBSTITUTIONS.",
            pytrace=False,
        )


def test_runner_fails_on_a_failing_command(tmp_path):
    """A failing command anywhere in a block fails it, and the rest of the block does not run."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "x.md").write_text(
        "# x\n\n```bash\necho first\nfalse\necho after > after.txt\n```\n\n```text\nfalse\n```\n"
    )
    blocks = doc_blocks(tmp_path / "docs")
    assert [(d, n) for d, n, _ in blocks] == [("x.md", 3)]  # the text block is not collected
    cwd, env = make_workdir(tmp_path / "run")
    proc = run_block(prepare(blocks[0][2], "x.md"), cwd, env)
    assert proc.returncode != 0 and "first" in proc.stdout
    assert not (cwd / "after.txt").exists()
    # A failing command inside a pipeline fails too (pipefail), and so does a missing program.
    assert run_block("false | cat\n", cwd, env).returncode != 0
    assert run_block("no-such-program-xyz --help\n", cwd, env).returncode != 0
    # Console scripts run this tree's code (atlas-train without --config explains what it needs).
    shim = run_block(
        "{ atlas-train || true; } 2>&1 | grep -q 'configs/run/<name>.py is required'\n", cwd, env
    )
    assert shim.returncode == 0, shim.stderr


def test_substitutions_and_covered_commands_are_used():
    """Every substitution and every COVERED entry matches some doc block (no stale rows)."""
    blocks = doc_blocks()
    for pattern, old, _, why in SUBSTITUTIONS:
        hits = [d for d, _, b in blocks if fnmatch.fnmatch(d, pattern) and old in b]
        assert hits, f"SUBSTITUTIONS row {old!r} ({why}) matches no ```bash block in docs/{pattern}"
    for command, (node, flag) in COVERED.items():
        assert any(command in [ln.strip() for ln in b.splitlines()] for _, _, b in blocks), command
        path, _, func = node.partition("::")
        source = (ROOT / path).read_text()
        assert f"def {func}(" in source and flag in source, f"{node} does not run {flag}"


def test_no_hidden_shell_blocks_and_links_resolve():
    """Shell fences other than ```bash are refused; relative links in docs/ point at existing files."""
    for path in sorted(DOCS.glob("*.md")):
        text = path.read_text()
        for i, line in enumerate(text.splitlines(), 1):
            m = _FENCE.match(line)
            assert not (m and m.group(1) in _REFUSED), (
                f"docs/{path.name}:{i}: use ```bash (executed by tests/test_docs.py) or ```text (not executed; "
                "say why on the line above)"
            )
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target or target.startswith("mailto:"):
                continue
            assert (path.parent / target).exists(), f"docs/{path.name}: broken link {target}"


def test_config_reference_is_current():
    """docs/config_reference.md equals what configs/reference.py writes from the config files now."""
    from configs import reference

    current = reference.OUTPUT.read_text() if reference.OUTPUT.is_file() else ""
    assert current == reference.render(), (
        "docs/config_reference.md is out of date with the config files: run `python -m configs.reference` "
        "and commit docs/config_reference.md"
    )


def test_field_comments_reads_one_line_and_wrapped_assignments(tmp_path):
    """The generator's parser: inline comments, comments inside a wrapped value, a comment line above."""
    from configs.reference import field_comments

    path = tmp_path / "cfg.py"
    path.write_text(
        "def get_config():\n"
        "    c.a.b = 1  # one line\n"
        "    c.a.c = (\n"
        "        2  # wrapped by the formatter\n"
        "    )\n"
        "    # above the field\n"
        "    c.a.d = 3\n"
        "    c.a.e = 4\n"
    )
    got = {k: v[0] for k, v in field_comments(path).items()}
    assert got == {"a.b": "one line", "a.c": "wrapped by the formatter", "a.d": "above the field", "a.e": ""}
