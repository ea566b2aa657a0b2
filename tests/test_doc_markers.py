"""The executable-docs markers, checked without running anything (fast).

`make test-docs` runs every block of README.md and docs/**/*.md; this
checks in the default suite that each block is one the harness can run or
carries a skip with its reason, and that the marker grammar does what
docs/contributing.md says.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "docs"))
import doc_harness as h  # noqa: E402

DOC = h.REPO / "docs" / "example.md"  # a name for parsed text; never written


def blocks(text: str) -> list[h.Block]:
    return h.parse_doc(DOC, text)


def test_every_doc_block_runs_or_says_why_not():
    docs = h.doc_files()
    assert h.REPO / "README.md" in docs and h.REPO / "docs" / "models" / "seqimg.md" in docs
    problems = [why for doc in docs for b in h.parse_doc(doc) if (why := h.unrunnable(b))]
    assert not problems, "\n".join(problems)


def test_an_unlabelled_block_without_a_marker_is_refused():
    (b,) = blocks("Text.\n\n```\nsome output\n```\n")
    why = h.unrunnable(b)
    assert why and "docs/example.md:3" in why and "skip: REASON" in why
    (b,) = blocks("<!-- doctest: skip: the output of the command above -->\n```\nsome output\n```\n")
    assert h.unrunnable(b) is None and b.directives.skip == "the output of the command above"


@pytest.mark.parametrize("marker, message", [
    ("<!-- doctest: skip: -->", "needs a reason"),
    ("<!-- doctest: skip `pip install`: -->", "needs a reason"),
    ("<!-- doctest: skipp: typo -->", "unknown doctest marker"),
    ("<!-- doctest: timeout: soon -->", "timeout must be seconds"),
    ("<!-- doctest: --set 'unbalanced -->", "quotation"),
])
def test_bad_markers_fail_with_the_line(marker, message):
    with pytest.raises((h.DocError, ValueError), match=message):
        blocks(f"{marker}\n```bash\nraygen data list\n```\n")


def test_a_marker_must_sit_right_before_its_block():
    with pytest.raises(h.DocError, match="example.md:1: doctest marker is not right before a code block"):
        blocks("<!-- doctest: skip: x -->\nSome prose.\n\n```bash\nraygen data list\n```\n")
    with pytest.raises(h.DocError, match="not followed by a code block"):
        blocks("```bash\nraygen data list\n```\n<!-- doctest: skip: x -->\n")


def test_markers_inside_a_code_block_are_text():
    (b,) = blocks("<!-- doctest: skip: shows markers -->\n```markdown\n<!-- doctest: nonsense -->\n```\n")
    assert b.directives.skip == "shows markers" and "nonsense" in b.text


def test_shrink_overrides_reach_train_and_tune_only():
    (b,) = blocks("<!-- doctest: --set train.steps=2 -->\n<!-- doctest: timeout: 90 -->\n"
                  "<!-- doctest: skip `pip`: installs -->\n```bash\nraygen train a.yaml\npip install x\n```\n")
    d = b.directives
    assert dict(d.add) == {"raygen train": "--set train.steps=2", "raygen tune": "--set train.steps=2"}
    assert d.timeout == 90 and d.skip_prefixes == [("pip", "installs")]


def test_commands_join_continuations_and_drop_comments():
    text = ("curl -s localhost:8000/v1/generate -H 'content-type: application/json' \\\n"
            "     -d '{\"n\": 4}'            # JSON with '#' in a comment\n"
            "\n# a whole-line comment\n"
            "raygen data prepare 'shards/*.parquet' --out data/imported\n")
    assert h.commands(text) == [
        "curl -s localhost:8000/v1/generate -H 'content-type: application/json' -d '{\"n\": 4}'",
        "raygen data prepare 'shards/*.parquet' --out data/imported",
    ]


def test_added_arguments_go_before_pipes_and_redirects():
    assert h.add_args("raygen spec schema > s.json", "--x 1") == "raygen spec schema --x 1 > s.json"
    assert h.add_args("raygen train a.yaml | tee log", "--set a=1") == "raygen train a.yaml --set a=1 | tee log"
    assert h.add_args("raygen train 'a|b.yaml'", "--set a=1") == "raygen train 'a|b.yaml' --set a=1"


def test_servers_are_recognised_with_their_port():
    assert h.server_of("raygen serve --model runs/q") == (8000, "/healthz")
    assert h.server_of("raygen serve --model runs/q --port 8123") == (8123, "/healthz")
    assert h.server_of("raygen ui") == (5000, "/")
    assert h.server_of("raygen sample runs/q") is None


# ------------------------------------------------------------------ running (no Ray: small shell docs)
def run_doc(tmp_path: Path, text: str) -> h.Report:
    doc = tmp_path / "doc.md"
    doc.write_text(text)
    return h.DocRunner(doc, tmp_path / "ws", log=lambda line: None).run()


def test_blocks_run_in_order_in_one_workspace(tmp_path):
    report = run_doc(tmp_path, (
        "```bash\necho one > a.txt   # a comment\n```\n\n"
        "<!-- doctest: setup: echo zero > z.txt -->\n"
        "<!-- doctest: add `cat a.txt`: z.txt -->\n"
        "<!-- doctest: skip `rm`: would delete the evidence -->\n"
        "```bash\ncat a.txt > both.txt\nrm a.txt\n```\n\n"
        "```python\nfrom pathlib import Path\nassert Path('both.txt').read_text() == 'one\\nzero\\n'\n```\n\n"
        "```json\n{\"n\": 1}\n```\n"))
    assert len(report.ran) == 4
    assert report.skipped == [(f"{tmp_path / 'doc.md'}:8 `rm a.txt`", "would delete the evidence")]
    assert (tmp_path / "ws" / "a.txt").is_file() and (tmp_path / "ws" / "jobs").is_symlink()


def test_a_failing_command_names_the_doc_line_and_its_output(tmp_path):
    with pytest.raises(h.BlockFailed, match=r"doc.md:3: command exited 2: ls no-such-file\n.*no-such-file"):
        run_doc(tmp_path, "Text.\n\n```bash\necho fine\nls no-such-file\necho never\n```\n")


def test_a_block_it_cannot_run_fails_the_doc(tmp_path):
    with pytest.raises(h.DocError, match="doc.md:1: a code block with no language cannot run"):
        run_doc(tmp_path, "```\noutput of something\n```\n")


@pytest.mark.slow
def test_a_server_serves_the_next_block_and_is_then_stopped(tmp_path, monkeypatch):
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setitem(h.SERVERS, "python -m http.server", (port, "/"))
    url = f"http://127.0.0.1:{port}/"
    report = run_doc(tmp_path, (
        f"```bash\npython -m http.server {port} --bind 127.0.0.1\n```\n\n"
        f"```bash\ncurl -s {url} -o listing.html\n```\n\n"
        f"```bash\n! curl -s {url}\n```\n"))
    assert len(report.ran) == 3  # the last block passes only if the server was stopped after the second
    assert "jobs/" in (tmp_path / "ws" / "listing.html").read_text()  # it listed the workspace


def test_the_worked_example_in_families_md_is_the_plugin_family():
    """docs/families.md shows the plugin's model file whole; it must not drift from the tested package."""
    doc = (h.REPO / "docs" / "families.md").read_text()
    model = (h.REPO / "tests" / "plugin_family" / "raygen_plugin_demo" / "model.py").read_text()
    assert f"```python\n{model}\n\n# ---- its registry entry" in doc
