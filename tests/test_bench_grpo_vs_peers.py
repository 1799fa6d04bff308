"""bench/grpo_vs_peers.py's accounting: the workload check and the ratios it prints (no timing is asserted)."""

from __future__ import annotations

import pytest

from bench import grpo_vs_peers as bench


def _completions(tokens: int = bench.TOKENS) -> list[list[list[int]]]:
    return [[[5] * tokens for _ in range(bench.GENERATIONS)] for _ in range(bench.PROMPTS)]


def test_workload_is_8x8x128_completion_tokens():
    prompts = bench.text_prompts(bench.PROMPTS)
    assert bench.check_workload(prompts, _completions()) == 8 * 8 * 128
    short = _completions()
    short[3][5] = short[3][5][:-1]  # one completion stopped a token early
    with pytest.raises(AssertionError, match="prompt 3 sample 5: 127 tokens"):
        bench.check_workload(prompts, short)
    with pytest.raises(AssertionError, match="prompt 0: 7 samples"):
        bench.check_workload(prompts, [g[:-1] for g in _completions()])


def test_table_ratios_are_peer_time_over_ours():
    tokens = 8192
    res = {
        "ours": [
            {"step": 4.0, "cpu": 8.0, "generate": 1.0, "batch": 0.0, "update": 3.0},
            {"step": 5.0, "cpu": 9.0, "generate": 2.0, "batch": 0.0, "update": 3.0},
        ],
        "trl": [{"step": 16.0, "cpu": 32.0}, {"step": 20.0, "cpu": 40.0}],
    }
    lines = bench.table(res, tokens)
    assert any(line.startswith("    ours |       2048 |        1638 |      1024") for line in lines), lines
    assert "ours / trl: 4.00x wall (best/best; spread 3.20-5.00x), 4.00x per CPU-s" in lines
    assert f"ours / TRL defaults (DESIGN.md 524 tok/s, quiet machine): {2048 / 524:.2f}x" in lines
