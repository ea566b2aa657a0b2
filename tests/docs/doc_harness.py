"""Executable docs: find the code blocks of README.md and docs/**.md, read
their `<!-- doctest: ... -->` markers, and run them.

What a block does, by its fence's language:

    bash/sh/shell   each command runs in its own `bash -c`, in order, in the doc's workspace
    python          runs as a script in the workspace
    yaml            a job spec (or part of one): `raygen spec validate` must accept it
    json            must parse
    anything else   cannot run: it needs `skip: REASON` (or `synopsis`)

Markers, one per HTML comment, on the lines right before a block:

    <!-- doctest: skip: REASON -->            do not run the block, and say why
    <!-- doctest: skip `PREFIX`: REASON -->   do not run the block's commands that start with PREFIX
    <!-- doctest: --set k=v --set k2=v2 -->   append these to the block's `raygen train|tune` commands
    <!-- doctest: add `PREFIX`: ARGS -->      append ARGS to the block's commands that start with PREFIX
    <!-- doctest: setup: COMMAND -->          run this shell command first (in the workspace)
    <!-- doctest: timeout: SECONDS -->        per-command limit for this block
    <!-- doctest: synopsis -->                a usage summary: every --option named must exist in
                                              `raygen ... --help`

Servers (`raygen serve`, `raygen ui`, `serve run`) start in the background,
are probed until they answer, keep running through the next block that runs
(so a `curl` block can follow), and are then stopped by pid.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LANGS = {"bash": "shell", "sh": "shell", "shell": "shell", "console": "shell",
         "python": "python", "py": "python", "yaml": "yaml", "yml": "yaml", "json": "json"}
DEFAULT_TIMEOUT = 600  # per command: generous, for a loaded CI machine; it catches hangs, not slowness
SHORTHAND_TARGETS = ("raygen train", "raygen tune")
# Everything a doc's workspace sees of the checkout, as symlinks.
WORKSPACE_LINKS = ("jobs", "serving", "bench", "docs", "platform", "tests", "cluster.yaml", "README.md",
                   "pyproject.toml", "setup.py", "Makefile")

_MARKER = re.compile(r"^\s*<!--\s*doctest:(.*?)-->\s*$")
_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([^`\s]*)[^`]*$")
_PREFIXED = re.compile(r"^(skip|add)\s+`([^`]+)`\s*:\s*(.*)$", re.S)


class DocError(Exception):
    """A doc or its markers are wrong: the message names file and line."""


@dataclass
class Directives:
    skip: str | None = None
    skip_prefixes: list[tuple[str, str]] = field(default_factory=list)
    add: list[tuple[str, str]] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)
    timeout: float | None = None
    synopsis: bool = False


@dataclass
class Block:
    doc: Path
    line: int           # 1-based line of the opening fence
    lang: str           # the fence's info word, lower case ("" for none)
    text: str
    directives: Directives

    @property
    def kind(self) -> str:
        return LANGS.get(self.lang, "none")

    @property
    def where(self) -> str:
        try:
            return f"{self.doc.relative_to(REPO)}:{self.line}"
        except ValueError:
            return f"{self.doc}:{self.line}"


def doc_files(repo: Path = REPO) -> list[Path]:
    """README.md, docs/*.md and docs/<any folder>/*.md (a new family's doc joins by existing)."""
    return [repo / "README.md", *sorted((repo / "docs").rglob("*.md"))]


# ------------------------------------------------------------------ parsing
def parse_directive(text: str, where: str) -> Directives:
    d = Directives()
    body = text.strip()
    if body.startswith("--"):
        shlex.split(body)  # fails here on unbalanced quotes, not in the middle of a run
        d.add = [(target, body) for target in SHORTHAND_TARGETS]
        return d
    m = _PREFIXED.match(body)
    if m:
        kind, prefix, rest = m.group(1), m.group(2).strip(), m.group(3).strip()
        if not rest:
            raise DocError(f"{where}: `{kind} `{prefix}`:` needs {'a reason' if kind == 'skip' else 'arguments'}")
        if kind == "skip":
            d.skip_prefixes.append((prefix, rest))
        else:
            shlex.split(rest)
            d.add.append((prefix, rest))
        return d
    name, sep, rest = body.partition(":")
    name, rest = name.strip(), rest.strip()
    if name == "skip" and sep:
        if not rest:
            raise DocError(f"{where}: `skip:` needs a reason, e.g. <!-- doctest: skip: needs a multi-node cluster -->")
        d.skip = rest
    elif name == "setup" and sep and rest:
        d.setup.append(rest)
    elif name == "timeout" and sep:
        try:
            d.timeout = float(rest)
        except ValueError:
            raise DocError(f"{where}: timeout must be seconds, got {rest!r}") from None
    elif body == "synopsis":
        d.synopsis = True
    else:
        raise DocError(f"{where}: unknown doctest marker {body!r}; use skip: REASON, skip `PREFIX`: REASON, "
                       "--set ..., add `PREFIX`: ARGS, setup: COMMAND, timeout: SECONDS or synopsis")
    return d


def _merge(into: Directives, d: Directives) -> None:
    into.skip = d.skip or into.skip
    into.skip_prefixes += d.skip_prefixes
    into.add += d.add
    into.setup += d.setup
    into.timeout = d.timeout or into.timeout
    into.synopsis = into.synopsis or d.synopsis


def parse_doc(path: Path, text: str | None = None) -> list[Block]:
    """The fenced blocks of a markdown file with the markers right before each."""
    lines = (path.read_text() if text is None else text).splitlines()
    rel = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    blocks: list[Block] = []
    pending: Directives | None = None
    pending_line = 0
    i = 0
    while i < len(lines):
        line = lines[i]
        marker = _MARKER.match(line)
        fence = _FENCE.match(line)
        if marker:
            pending = pending or Directives()
            pending_line = pending_line or i + 1
            _merge(pending, parse_directive(marker.group(1), f"{rel}:{i + 1}"))
        elif fence:
            indent, ticks, lang = fence.group(1), fence.group(2), fence.group(3).lower()
            body, j = [], i + 1
            while j < len(lines):
                close = lines[j].strip()
                if close.startswith(ticks[0] * len(ticks)) and set(close) == {ticks[0]}:
                    break
                body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
                j += 1
            else:
                raise DocError(f"{rel}:{i + 1}: code block never closed")
            blocks.append(Block(path, i + 1, lang, "\n".join(body) + "\n", pending or Directives()))
            pending, pending_line = None, 0
            i = j
        elif line.strip() and "<!-- doctest" in line:
            raise DocError(f"{rel}:{i + 1}: a doctest marker must be a whole line: <!-- doctest: ... -->")
        elif line.strip() and pending is not None:
            raise DocError(f"{rel}:{pending_line}: doctest marker is not right before a code block "
                           "(only blank lines and other markers may come between)")
        i += 1
    if pending is not None:
        raise DocError(f"{rel}:{pending_line}: doctest marker is not followed by a code block")
    return blocks


def unrunnable(block: Block) -> str | None:
    """Why the harness cannot run a block that carries no skip, else None."""
    if block.directives.skip or block.directives.synopsis:
        return None
    if block.kind == "none":
        lang = f"'{block.lang}'" if block.lang else "no language"
        return (f"{block.where}: a code block with {lang} cannot run; label it bash/python/yaml/json, "
                "or mark it <!-- doctest: skip: REASON --> (or <!-- doctest: synopsis -->)")
    if block.kind == "shell" and not commands(block.text):
        return f"{block.where}: a shell block with no command; mark it <!-- doctest: skip: REASON -->"
    return None


# ------------------------------------------------------------------ shell text
def _scan(line: str):
    """Yield (index, char, quoted) over a shell line, tracking quotes."""
    quote = None
    escaped = False
    for i, ch in enumerate(line):
        if escaped:
            escaped = False
            yield i, ch, True
            continue
        if ch == "\\" and quote != "'":
            escaped = True
            yield i, ch, True
            continue
        if quote:
            if ch == quote:
                quote = None
            yield i, ch, True
            continue
        if ch in "'\"":
            quote = ch
            yield i, ch, True
            continue
        yield i, ch, False


def strip_comment(line: str) -> str:
    for i, ch, quoted in _scan(line):
        if ch == "#" and not quoted and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def commands(text: str) -> list[str]:
    """Logical command lines: continuations joined, comments and blank lines dropped."""
    out, current = [], ""
    for raw in text.splitlines():
        line = strip_comment(raw).strip()
        if line.endswith("\\"):
            current += line[:-1].rstrip() + " "
            continue
        current += line
        if current.strip():
            out.append(current.strip())
        current = ""
    if current.strip():
        out.append(current.strip())
    return out


def add_args(command: str, args: str) -> str:
    """Insert args where the first simple command ends (before a pipe, redirect, `&&` or `;`)."""
    for i, ch, quoted in _scan(command):
        if not quoted and ch in "|&;<>":
            return command[:i].rstrip() + " " + args + " " + command[i:]
    return command + " " + args


# ------------------------------------------------------------------ running
class BlockFailed(AssertionError):
    pass


@dataclass
class Server:
    command: str
    proc: subprocess.Popen
    port: int
    log: Path
    started_by: Block


SERVERS = {  # command prefix -> (default port, path that answers 200 once it is up)
    "raygen serve": (8000, "/healthz"),
    "raygen ui": (5000, "/"),
    "serve run": (8000, "/healthz"),
}


def server_of(command: str) -> tuple[int, str] | None:
    for prefix, (port, path) in SERVERS.items():
        if command == prefix or command.startswith(prefix + " "):
            m = re.search(r"--port[ =](\d+)", command)
            return (int(m.group(1)) if m else port), path
    return None


@dataclass
class Report:
    doc: Path
    ran: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


REPORTS: list[Report] = []  # the docs that ran in this session, for the terminal summary


class DocRunner:
    """Runs one doc's blocks in order in a fresh workspace."""

    def __init__(self, doc: Path, workspace: Path, *, python: str = sys.executable, log=print):
        self.doc = doc
        self.ws = workspace
        self.log = log
        self.servers: list[Server] = []
        self.report = Report(doc)
        self.meta = workspace / ".doctest"
        self.meta.mkdir(parents=True, exist_ok=True)
        # Ray's socket paths must stay short: its temp folder sits directly under the temp root.
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="rgd-"))
        self.env = self._environment(Path(python))
        self._link_checkout(Path(python))

    # -- set-up
    def _environment(self, python: Path) -> dict[str, str]:
        shims = self.meta / "bin"
        shims.mkdir(exist_ok=True)
        # curl -s exits 0 on an HTTP error: a doc's request that fails must fail the block.
        curl = shutil.which("curl") or "/usr/bin/curl"
        (shims / "curl").write_text(f'#!/bin/sh\nexec {shlex.quote(curl)} --fail-with-body "$@"\n')
        (shims / "curl").chmod(0o755)
        home = self.ws / ".home"
        (home).mkdir(exist_ok=True)
        tmp = self.ws / ".tmp"
        tmp.mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RAY_", "PYTEST_", "MLFLOW_", "RAYGEN_")) and k not in ("VIRTUAL_ENV", "PYTHONPATH")}
        if "TORCH_EXTENSIONS_DIR" in os.environ:
            env["TORCH_EXTENSIONS_DIR"] = os.environ["TORCH_EXTENSIONS_DIR"]
        env.update({
            "PATH": os.pathsep.join([str(shims), str(python.parent), env.get("PATH", "/usr/bin:/bin")]),
            "VIRTUAL_ENV": str(python.parent.parent),
            "HOME": str(home), "TMPDIR": str(tmp), "RAY_TMPDIR": str(self.ray_tmp),
            # the user's own cache, not the private HOME's: DeepSpeed compiles its ops
            # there once (~35 s), and every doc and run after reuses them
            "XDG_CACHE_HOME": os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache"),
            "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
            "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "MLFLOW_DISABLE_TELEMETRY": "true",
            "TOKENIZERS_PARALLELISM": "false", "RAYGEN_NO_PROGRESS": "1", "PYTHONUNBUFFERED": "1",
            # every process this doc starts inherits it, so cleanup finds exactly those
            "RAYGEN_DOCTEST_RUN": self.ray_tmp.name,
        })
        return env

    def _link_checkout(self, python: Path) -> None:
        for name in WORKSPACE_LINKS:
            if (REPO / name).exists():
                (self.ws / name).symlink_to(REPO / name)
        (self.ws / ".venv").symlink_to(python.parent.parent)  # docs name .venv/bin/python

    # -- the doc
    def run(self) -> Report:
        start = time.monotonic()
        try:
            for block in parse_doc(self.doc):
                self.run_block(block)
        finally:
            self.close()
            self.report.seconds = time.monotonic() - start
        return self.report

    def run_block(self, block: Block) -> None:
        d = block.directives
        if d.skip:
            self.report.skipped.append((block.where, d.skip))
            return
        why = unrunnable(block)
        if why:
            raise DocError(why)
        self.log(f"--- {block.where} ({block.lang or 'synopsis'})")
        for command in d.setup:
            self._run(block, command, what="setup")
        runner = {"shell": self._shell, "python": self._python, "yaml": self._yaml, "json": self._json}
        if d.synopsis:
            self._synopsis(block)
        else:
            runner[block.kind](block)
        self.report.ran.append(block.where)
        # servers started before this block served it; those it started serve the next one
        for server in [s for s in self.servers if s.started_by is not block]:
            self._stop(server)

    def _shell(self, block: Block) -> None:
        for command in commands(block.text):
            skip = next((why for prefix, why in block.directives.skip_prefixes if command.startswith(prefix)), None)
            if skip:
                self.report.skipped.append((f"{block.where} `{command}`", skip))
                continue
            for prefix, args in block.directives.add:
                if command == prefix or command.startswith(prefix + " "):
                    command = add_args(command, args)
            if server_of(command):
                self._start_server(block, command)
            else:
                self._run(block, command)

    def _python(self, block: Block) -> None:
        script = self.meta / f"block-{block.line}.py"
        script.write_text(block.text)
        self._run(block, f"python {shlex.quote(str(script))}", shown="python <the block>")

    def _yaml(self, block: Block) -> None:
        spec = self.meta / f"block-{block.line}.yaml"
        spec.write_text(block.text)
        self._run(block, f"raygen spec validate {shlex.quote(str(spec))}", shown="raygen spec validate <the block>")

    def _json(self, block: Block) -> None:
        try:
            json.loads(block.text)
        except ValueError as err:
            raise BlockFailed(f"{block.where}: the JSON block does not parse: {err}") from None

    def _synopsis(self, block: Block) -> None:
        entries: list[str] = []
        for line in block.text.splitlines():
            if line.startswith("raygen "):
                entries.append(line)
            elif line[:1].isspace() and entries:
                entries[-1] += " " + line.strip()
        if not entries:
            raise DocError(f"{block.where}: a synopsis block names no `raygen ...` command")
        for entry in entries:
            words = []
            for token in entry.split()[1:]:
                if not re.fullmatch(r"[a-z][a-z0-9-]*", token):
                    break
                words.append(token)
            help_text = self._run(block, "raygen " + " ".join(words) + " --help", shown=f"raygen {' '.join(words)} --help")
            named = sorted(set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", entry)))
            missing = [o for o in named if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", help_text)]
            if missing:
                raise BlockFailed(f"{block.where}: `raygen {' '.join(words)}` has no option {', '.join(missing)} "
                                  "(the synopsis names it; see --help)")

    # -- processes
    def _run(self, block: Block, command: str, *, what: str = "command", shown: str | None = None) -> str:
        timeout = block.directives.timeout or DEFAULT_TIMEOUT
        self.log(f"$ {shown or command}")
        t0 = time.monotonic()
        proc = subprocess.Popen(["bash", "-c", command], cwd=self.ws, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, _ = proc.communicate()
            raise BlockFailed(f"{block.where}: {what} ran past its {timeout:g} s limit: {shown or command}\n"
                              f"{_tail(out)}") from None
        self.log(f"  ({time.monotonic() - t0:.1f} s, exit {proc.returncode})")
        if proc.returncode != 0:
            raise BlockFailed(f"{block.where}: {what} exited {proc.returncode}: {shown or command}\n{_tail(out)}")
        return out

    def _start_server(self, block: Block, command: str) -> None:
        port, path = server_of(command)
        for other in [s for s in self.servers if s.port == port]:
            self._stop(other)
        log = self.meta / f"server-{block.line}-{len(self.servers)}.log"
        self.log(f"$ {command} &   (probing http://127.0.0.1:{port}{path})")
        t0 = time.monotonic()
        handle = log.open("w")
        proc = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=self.ws, env=self.env, stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True)
        handle.close()
        server = Server(command, proc, port, log, block)
        self.servers.append(server)
        limit = block.directives.timeout or DEFAULT_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise BlockFailed(f"{block.where}: server exited {proc.returncode} before answering: {command}\n"
                                  f"{_tail(log.read_text())}")
            if _answers(f"http://127.0.0.1:{port}{path}"):
                break
            if time.monotonic() - t0 > limit:
                raise BlockFailed(f"{block.where}: server did not answer http://127.0.0.1:{port}{path} within "
                                  f"{limit:g} s: {command}\n{_tail(log.read_text())}")
            time.sleep(1)
        self.log(f"  (up in {time.monotonic() - t0:.1f} s)")

    def _stop(self, server: Server) -> None:
        self.servers.remove(server)
        if server.proc.poll() is None:
            server.proc.send_signal(signal.SIGTERM)  # raygen serve/ui shut down cleanly on SIGTERM
            try:
                server.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        _kill_group(server.proc)

    def close(self) -> None:
        for server in list(self.servers):
            self._stop(server)
        # Ray processes outlive their driver for a moment: stop those this doc
        # started (they carry its RAYGEN_DOCTEST_RUN or name its Ray temp folder).
        deadline = time.monotonic() + 30
        while (pids := _started_here(self.ray_tmp)) and time.monotonic() < deadline:
            for pid in pids:
                _signal(pid, signal.SIGTERM if time.monotonic() < deadline - 20 else signal.SIGKILL)
            time.sleep(1)
        for pid in _started_here(self.ray_tmp):
            _signal(pid, signal.SIGKILL)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except Exception:
        return False


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop a command and what it started in its own session (by its process group id)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=10)
            time.sleep(0.5)
        except subprocess.TimeoutExpired:
            pass


def _started_here(ray_tmp: Path) -> list[int]:
    """Processes a doc started: its marker in their environment (Ray workers
    rename themselves, so the command line alone misses them), or its Ray
    temp folder on their command line."""
    marker = f"RAYGEN_DOCTEST_RUN={ray_tmp.name}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0") or str(ray_tmp).encode() in cmdline:
            found.append(int(entry.name))
    return found
