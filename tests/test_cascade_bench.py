"""bench/cascade_decoding.py in its --smoke mode: cached and uncached decoding choose the same tokens, and the
beam widths are timed."""
from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_cascade_decoding_smoke(capsys):
    spec = importlib.util.spec_from_file_location("bench_cascade_decoding", REPO / "bench" / "cascade_decoding.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--smoke"])
    levels = [r for r in rows if "level" in r]
    beams = [r for r in rows if "beam_width" in r]
    assert [r["level"] for r in levels] == [0, 1] and all(r["same_tokens"] and r["ratio"] > 0 for r in levels)
    assert [r["beam_width"] for r in beams] == [1, 2]
    assert all(r["cost_ratio"] > 0 and len(r["loglik"]) == 2 for r in beams)
    assert "ratio cached/uncached" in capsys.readouterr().out
