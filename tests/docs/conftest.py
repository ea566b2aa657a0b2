"""The executable-docs tier (`make test-docs`): every command and snippet of
README.md and docs/**/*.md runs, at a small size, as a new user would run it.

Not part of the default run (pyproject's `norecursedirs` leaves this folder
out): it takes minutes, trains real models and starts servers. Run it in a
loopback-only network namespace, as `make test-docs` does.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))



def pytest_terminal_summary(terminalreporter):
    import doc_harness
    if not doc_harness.REPORTS:
        return
    tr = terminalreporter
    tr.section("executable docs")
    for report in doc_harness.REPORTS:
        tr.write_line(f"{report.doc.name}: {len(report.ran)} block(s) ran, {len(report.skipped)} skipped, "
                      f"{report.seconds:.0f} s")
        for where, why in report.skipped:
            tr.write_line(f"    skipped {where}: {why}")
