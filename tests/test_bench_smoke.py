"""Benchmarks cannot rot: each has a --smoke mode (`make bench-smoke` runs them
all in CI), and the two in-process ones run here, checking what they print."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_smoke_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_benchmark_has_a_smoke_mode():
    scripts = sorted((REPO / "bench").glob("*.py"))
    assert len(scripts) >= 4
    lacking = [p.name for p in scripts if '"--smoke"' not in p.read_text()]
    assert not lacking, f"benchmarks without --smoke (bench/run_smoke.sh runs every one): {lacking}"


def test_engine_overhead_smoke_runs_the_same_work_and_prints_its_ratio(capsys):
    assert load_bench("engine_overhead").main(["--smoke"]) == 0
    out = capsys.readouterr().out
    # the engine and the plain loop computed the same losses, step for step
    assert re.search(r"max \|loss diff\| over \d+ steps 0\.0e\+00", out), out
    assert re.search(r"engine / plain, wall clock .*: small d32 L1 \d+\.\d{3}", out), out


def test_seqimg_sampling_smoke_samples_through_the_protocol(capsys):
    rows = load_bench("seqimg_sampling").main(["--smoke"])
    assert [r["backbone"] for r in rows] == ["gpt2", "lstm"]
    # cached and uncached sampling draw the same images (same per-image generators)
    assert all(r["flipped_8bit_values"] == 0 for r in rows)
    assert all(r["ratio"] > 0 for r in rows) and "ratio" in capsys.readouterr().out
