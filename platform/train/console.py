"""What a training run shows on the console, and where the rest goes.

Quiet by default: the console shows the driver's own lines, one progress
line per log step (a progress bar on a TTY) and the rank-0 messages the
training loop and its hooks `say`. Library chatter (Ray, DeepSpeed, torch
and MLflow logs and warnings) goes to the run's log file,
`runs/<name>/run.log`, and shows on the console with `--verbose` too.

How the lines travel: rank 0 of the worker group appends JSON events to
`runs/<name>/progress.jsonl`; the driver follows that file and renders each
event once (Ray forwarding worker output would show every line twice, next
to Ray's own). Each worker's stdout and stderr (file descriptors 1 and 2, so
C++ warnings too) go to run.log. Outside a Ray worker (tests, benchmarks,
notebooks) nothing is redirected and `say` / `progress` print directly.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

RUN_LOG = "run.log"
PROGRESS_FILE = "progress.jsonl"
PREFIX = "[raygen]"

#: where `say` and `progress` send their events; None: print them here
_sink: Callable[[dict[str, Any]], None] | None = None


# ---------------------------------------------------------------- the worker side
def say(message: str) -> None:
    """A line meant for the user's console. Call it on rank 0 only (a
    message of another rank belongs in the log: print it)."""
    if _sink is not None:
        _sink({"kind": "message", "text": message})
    else:
        print(f"{PREFIX} {message}", flush=True)


def progress(step: int, total: int, fields: dict[str, float], log: bool = True) -> None:
    """One progress event: step of total, with loss, lr, img/s, eta... A log
    step's event becomes a line; the others only move a progress bar."""
    if _sink is not None:
        _sink({"kind": "progress", "step": step, "total": total, "log": log, **fields})
    elif log:
        print(f"{PREFIX} {format_progress(step, total, fields)}", flush=True)


def bar_wanted() -> bool:
    """Whether events between log steps have a progress bar to move (a driver follows them)."""
    return isinstance(_sink, ProgressWriter)


def format_progress(step: int, total: int, fields: dict[str, Any]) -> str:
    return " ".join([f"step {step}/{total}", format_fields(fields)]).strip()


def format_fields(fields: dict[str, Any]) -> str:
    parts = []
    if fields.get("loss") is not None:
        parts.append(f"loss {fields['loss']:.4f}")
    if fields.get("lr"):
        parts.append(f"lr {fields['lr']:.2e}")
    for key, value in fields.items():
        if key not in ("loss", "lr", "images_per_s", "eta_s") and isinstance(value, (int, float)):
            parts.append(f"{key} {value:.4g}")
    if fields.get("images_per_s") is not None:
        parts.append(f"img/s {fields['images_per_s']:.0f}")
    if fields.get("eta_s") is not None:
        parts.append(f"eta {fields['eta_s']:.0f}s")
    return " ".join(parts)


class ProgressWriter:
    """Appends events to progress.jsonl, one JSON line each (rank 0 only)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, event: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({**event, "time": time.time()}) + "\n")


@contextlib.contextmanager
def worker_console(run_dir: Path, rank: int, progress: bool) -> Iterator[None]:
    """Inside a Ray Train worker: stdout/stderr (fd 1 and 2) into run.log;
    on rank 0, `say` and `progress` into progress.jsonl for the driver."""
    global _sink
    previous = _sink
    if rank == 0 and progress:
        _sink = ProgressWriter(Path(run_dir) / PROGRESS_FILE)
    elif rank == 0:
        _sink = lambda event: None  # noqa: E731  (progress off: nothing for the console)
    else:
        _sink = None  # other ranks' messages are printed, so they land in run.log
    try:
        with redirect_fds(Path(run_dir) / RUN_LOG):
            yield
    finally:
        _sink = previous


@contextlib.contextmanager
def redirect_fds(path: Path, fds: tuple[int, ...] = (1, 2), python_streams: bool = True) -> Iterator[None]:
    """Point file descriptors (stdout, stderr) at `path` (appended), so the
    output of C++ code and of every Python handler ends up there too; with
    `python_streams`, sys.stdout / sys.stderr write there as well when
    something had replaced them by streams of their own (not on fd 1 / 2)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    path.parent.mkdir(parents=True, exist_ok=True)
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    saved = {fd: os.dup(fd) for fd in fds}
    streams = {1: "stdout", 2: "stderr"}
    replaced = {}
    try:
        for fd in fds:
            os.dup2(target, fd)
            if python_streams and fd in streams and not _writes_to(getattr(sys, streams[fd]), fd):
                replaced[streams[fd]] = getattr(sys, streams[fd])
                setattr(sys, streams[fd], os.fdopen(os.dup(fd), "w", buffering=1, errors="replace"))
        yield
    finally:
        for name, original in replaced.items():
            with contextlib.suppress(Exception):
                getattr(sys, name).close()
            setattr(sys, name, original)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        os.close(target)


def _writes_to(stream, fd: int) -> bool:
    try:
        return stream.fileno() == fd
    except Exception:  # a stream of its own (pytest's capture, a notebook)
        return False


# ---------------------------------------------------------------- the driver side
#: loggers whose records are library chatter: the run's log file, not the console
LIBRARY_LOGGERS = ("ray", "mlflow", "alembic", "deepspeed", "torch", "urllib3", "filelock", "py.warnings",
                   "DeepSpeed", "fsspec", "git", "databricks")


@contextlib.contextmanager
def library_logs_to(path: Path, verbose: bool) -> Iterator[None]:
    """Library log records and Python warnings go to `path`; to the console
    too when verbose. Restored on exit."""
    import importlib

    for module in ("ray", "mlflow"):  # they configure their loggers on import: import first, then reroute
        with contextlib.suppress(ImportError):
            importlib.import_module(module)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved = []
    # the libraries' top loggers, and any logger of theirs with handlers of its own (ray.data has)
    names = list(LIBRARY_LOGGERS) + sorted(
        name for name, logger in list(logging.root.manager.loggerDict.items())
        if isinstance(logger, logging.Logger) and logger.handlers and name not in LIBRARY_LOGGERS
        and any(name.startswith(prefix + ".") for prefix in LIBRARY_LOGGERS))
    for name in names:
        logger = logging.getLogger(name)
        saved.append((logger, list(logger.handlers), logger.propagate))
        logger.handlers = [handler] + (list(logger.handlers) if verbose else [])
        logger.propagate = False
    was_capturing = getattr(logging, "_warnings_showwarning", None) is not None
    logging.captureWarnings(True)
    try:
        yield
    finally:
        if not was_capturing:
            logging.captureWarnings(False)
        for logger, handlers, propagate in saved:
            logger.handlers, logger.propagate = handlers, propagate
        handler.close()


@contextlib.contextmanager
def stderr_to(path: Path, enabled: bool = True) -> Iterator[None]:
    """C-level stderr of this process into `path` for a block (ray.init's
    C++ warnings, say); Python's sys.stderr keeps writing to the console."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    console = os.dup(2)
    keep = sys.stderr
    sys.stderr = os.fdopen(os.dup(console), "w", buffering=1)
    try:
        with redirect_fds(path, fds=(2,), python_streams=False):
            yield
    finally:
        sys.stderr.close()
        sys.stderr = keep
        os.close(console)


class ConsoleFollower:
    """On the driver: renders progress.jsonl as it grows (a tqdm bar on a TTY,
    plain lines otherwise) and, when verbose, echoes run.log too."""

    def __init__(self, run_dir: Path, *, total: int, verbose: bool = False, out: TextIO | None = None,
                 tty: bool | None = None, poll_s: float = 0.25):
        self.progress_path = Path(run_dir) / PROGRESS_FILE
        self.log_path = Path(run_dir) / RUN_LOG
        self.total, self.verbose, self.poll_s = total, verbose, poll_s
        self.out = out or sys.stdout
        self.tty = self.out.isatty() if tty is None else tty
        # only what this run appends: a resumed run's folder holds earlier events
        self._offsets = {p: (p.stat().st_size if p.is_file() else 0) for p in (self.progress_path, self.log_path)}
        self._partial = {p: b"" for p in self._offsets}
        self._bar = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lines_shown = 0

    def __enter__(self) -> "ConsoleFollower":
        self._thread = threading.Thread(target=self._run, name="raygen-console", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.poll()  # whatever arrived last
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.poll()
            except Exception as err:  # never let the console kill a run
                self._write(f"{PREFIX} (console: {type(err).__name__}: {err})")

    def _new_lines(self, path: Path) -> list[str]:
        if not path.is_file():
            return []
        with open(path, "rb") as f:
            f.seek(self._offsets[path])
            data = f.read()
        self._offsets[path] += len(data)
        data = self._partial[path] + data
        *lines, self._partial[path] = data.split(b"\n")
        return [line.decode("utf-8", "replace") for line in lines]

    def poll(self) -> None:
        if self.verbose:
            for line in self._new_lines(self.log_path):
                self._write(line)
        for line in self._new_lines(self.progress_path):
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            self.show(event)

    def show(self, event: dict[str, Any]) -> None:
        if event.get("kind") == "message":
            self._write(f"{PREFIX} {event.get('text', '')}")
        elif event.get("kind") == "progress":
            step, total = int(event["step"]), int(event.get("total") or self.total)
            fields = {k: v for k, v in event.items() if k not in ("kind", "step", "total", "time", "log")}
            if self.tty:
                self._update_bar(step, total, fields)
            elif event.get("log", True):  # one line per log step
                self._write(f"{PREFIX} {format_progress(step, total, fields)}")

    def _update_bar(self, step: int, total: int, fields: dict[str, Any]) -> None:
        from tqdm import tqdm
        if self._bar is None:
            self._bar = tqdm(total=total, initial=0, unit="step", file=self.out, dynamic_ncols=True,
                             leave=True, desc="training")
        self._bar.n = step
        shown = {k: v for k, v in fields.items() if k != "eta_s"}  # tqdm shows its own
        self._bar.set_postfix_str(format_fields(shown), refresh=False)
        self._bar.refresh()

    def _write(self, line: str) -> None:
        self.lines_shown += 1
        if self._bar is not None:
            self._bar.write(line, file=self.out)
        else:
            self.out.write(line + "\n")
            self.out.flush()
