"""Benchmarks put their scratch files (and Ray's session files) where the
caller says: RAY_TMPDIR, else TMPDIR."""
from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_data_pipeline_bench_works_under_ray_tmpdir_else_tmpdir(tmp_path, monkeypatch):
    import tempfile

    bench = load_bench("data_pipeline")
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "ray-tmp"))  # not there yet: created
    work = bench.make_work_dir()
    assert work.parent == tmp_path / "ray-tmp" and work.name.startswith("rg-bench-")
    monkeypatch.delenv("RAY_TMPDIR")
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    assert bench.make_work_dir().parent == tmp_path / "tmp"
