"""Run every doc's blocks in order in a fresh workspace (see doc_harness)."""
from __future__ import annotations

import pytest

import doc_harness

DOCS = doc_harness.doc_files()


@pytest.mark.slow
@pytest.mark.timeout(2400)  # each command has its own limit too (doc_harness.DEFAULT_TIMEOUT)
@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(doc_harness.REPO)) for d in DOCS])
def test_doc_runs_as_written(doc, tmp_path):
    runner = doc_harness.DocRunner(doc, tmp_path / "ws", log=lambda line: print(line, flush=True))
    try:
        report = runner.run()
    finally:
        doc_harness.REPORTS.append(runner.report)
    for where, why in report.skipped:
        print(f"skipped {where}: {why}")
    print(f"{doc.name}: {len(report.ran)} block(s) ran, {len(report.skipped)} skipped in {report.seconds:.0f} s")
