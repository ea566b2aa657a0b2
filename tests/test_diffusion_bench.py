"""bench/diffusion_sampling.py runs end to end in its smoke mode: one trained
model, three samplers, the same images and extractor, FID and speed-up each."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_sampling_benchmark_smoke(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # its scratch folder goes here, and is removed after
    spec = importlib.util.spec_from_file_location("bench_diffusion_sampling", REPO / "bench" / "diffusion_sampling.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--smoke", "--threads", "1", "--json", str(tmp_path / "out.json")])
    assert [(r["sampler"], r["steps"]) for r in rows] == [("ddpm", 40), ("ddim", 4), ("dpmsolver++", 3)]
    assert all(math.isfinite(r["fid"]) and r["fid"] >= 0 and r["seconds"] > 0 for r in rows)
    assert rows[0]["speedup"] == 1.0 and rows[1]["speedup"] > 1.0  # 4 steps against 40
    out = capsys.readouterr().out
    assert "ddim-4 vs ddpm-40" in out and "the target (>= 15x" in out
    assert (tmp_path / "out.json").is_file() and not list(tmp_path.glob("rg-bench-*"))
