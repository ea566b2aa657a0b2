"""`raygen submit`: run a job on a remote Ray cluster through the Ray Jobs API.

The cluster's dashboard address comes from `--address`, else RAY_ADDRESS,
else the address the job (or, for `run`, the last job) was submitted to:
`submit run` remembers it in ~/.raygen/submit.json. A cluster with Ray token
auth takes the token from `--token-file` or Ray's own variables
(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token); raygen never
prints it. A job that failed shows its last log lines and exits non-zero
(`status`, `logs --follow`, `run --follow`).
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import time
from pathlib import Path

ADDRESS_HELP = ("Ray dashboard address, e.g. http://HEAD:8265 (default: RAY_ADDRESS, else the address "
                "remembered from `raygen submit run`)")
_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")  # what Ray's own job client reads, in its order
_REMEMBERED_JOBS = 200
TAIL_LINES = 20  # log lines shown with a failed job
# never uploaded, whatever the .gitignore says (Ray honours .gitignore and .rayignore too)
UPLOAD_EXCLUDES = ["runs/", ".venv/", "venv/", ".git/", "mlruns/", "__pycache__/", "*.egg-info/", ".pytest_cache/"]
TOKEN_HELP = ("file holding the cluster's Ray auth token (clusters started with RAY_AUTH_MODE=token); "
              "default: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token")


def register(sub) -> None:
    p = sub.add_parser("submit", help="submit `raygen train|tune SPEC` to a Ray cluster; status, logs, stop")
    s = p.add_subparsers(dest="submit_command", metavar="ACTION", required=True)
    run = s.add_parser("run", help="submit a job (the current folder is uploaded as its working dir)")
    run.add_argument("spec")
    run.add_argument("--address", help=ADDRESS_HELP)
    run.add_argument("--kind", choices=["train", "tune"], default="train")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    run.add_argument("--follow", action="store_true", help="stream logs until the job ends")
    run.add_argument("--token-file", dest="ray_token_file", metavar="FILE", help=TOKEN_HELP)
    run.set_defaults(func=submit)
    lst = s.add_parser("list", help="list the cluster's jobs, oldest first")
    lst.add_argument("--address", help=ADDRESS_HELP)
    lst.add_argument("--token-file", dest="ray_token_file", metavar="FILE", help=TOKEN_HELP)
    lst.set_defaults(func=list_jobs, job_id=None)
    for name, fn, help_ in (("status", status, "show a job's status (exit 1 when it failed)"),
                            ("logs", logs, "print a job's logs"), ("stop", stop, "stop a job")):
        q = s.add_parser(name, help=help_)
        q.add_argument("job_id")
        q.add_argument("--address", help=ADDRESS_HELP)
        q.add_argument("--token-file", dest="ray_token_file", metavar="FILE", help=TOKEN_HELP)
        if name == "logs":
            q.add_argument("--follow", action="store_true")
        q.set_defaults(func=fn)


def _dashboard_url(address: str) -> str:
    """The Jobs API talks to the dashboard over HTTP. A bare HOST:PORT is taken as
    http://HOST:PORT: left bare, Ray's client would read it as a GCS address and
    wait ~45 s for a cluster to answer before failing. 'auto' (the cluster this
    machine belongs to) is passed on as is."""
    address = address.strip().rstrip("/")
    return address if "://" in address or address == "auto" else f"http://{address}"


def _first_line(err: BaseException | str) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def state_file() -> Path:
    return Path.home() / ".raygen" / "submit.json"


def _read_state() -> dict:
    try:
        state = json.loads(state_file().read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def remember(job_id: str, address: str) -> None:
    """Keep the address a job went to, so status/logs/stop need no --address."""
    state = _read_state()
    jobs = {k: v for k, v in (state.get("jobs") or {}).items() if k != job_id}
    jobs[job_id] = address
    state = {"last_address": address, "jobs": dict(list(jobs.items())[-_REMEMBERED_JOBS:])}
    path = state_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, path)
    except OSError:  # a read-only home only costs the convenience
        pass


def resolve_address(given: str | None, job_id: str | None = None) -> tuple[str, str]:
    """(address, where it came from): --address, RAY_ADDRESS, the job's remembered one, the last one."""
    from raygen.jobs.cli import UserError
    if given:
        return given, "--address"
    for var in _ENV:
        if os.environ.get(var):
            return os.environ[var], var
    state = _read_state()
    if job_id and job_id in (state.get("jobs") or {}):
        return state["jobs"][job_id], f"where {job_id} was submitted ({state_file()})"
    if state.get("last_address"):
        return state["last_address"], f"the last `raygen submit run` ({state_file()})"
    raise UserError("no Ray cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS "
                    "(`raygen submit run` remembers the address it used)")


@contextlib.contextmanager
def _without_address_env():
    # Ray's client lets RAY_ADDRESS override the address it is given; ours is already resolved.
    saved = {var: os.environ.pop(var) for var in _ENV if var in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _client(address: str, source: str = "--address"):
    from ray.job_submission import JobSubmissionClient

    from raygen.jobs.cli import UserError
    url = _dashboard_url(address)
    from raygen.train.cluster import is_auth_refusal, needs_token_message, redact
    try:
        with _without_address_env():
            return JobSubmissionClient(url)
    except Exception as err:
        origin = "" if source == "--address" else f" (from {source})"
        if is_auth_refusal(err):
            raise UserError(needs_token_message(f"the Ray cluster at {url}{origin}", err)) from None
        raise UserError(f"cannot reach the Ray cluster at {url}{origin} ({redact(_first_line(err))}); "
                        "check the dashboard address (http://HEAD:8265) and that the cluster is up (`ray up cluster.yaml`)") from None


def _job_client(args):
    return _client(*resolve_address(args.address, args.job_id))


def _call(what: str, fn, *args, **kwargs):
    """A Jobs API call; a refused request (unknown job id, cluster gone) is a user error, not a traceback."""
    from raygen.jobs.cli import UserError
    from raygen.train.cluster import is_auth_refusal, needs_token_message, redact
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, OSError) as err:  # the SDK raises RuntimeError for non-200 replies; requests' errors are OSErrors
        if is_auth_refusal(err):
            raise UserError(f"{what} failed: " + needs_token_message("the cluster", err)) from None
        raise UserError(f"{what} failed: {redact(_first_line(err))}") from None


def _spec_in_upload(spec: str) -> str:
    """The spec as a path inside the uploaded working directory (the current folder)."""
    from raygen.jobs.cli import UserError
    here = Path.cwd().resolve()
    path = Path(spec).resolve()
    if not path.is_relative_to(here):
        raise UserError(f"{spec} is outside the current folder {here}, which is what the job uploads; "
                        "run `raygen submit run` from a folder that holds the spec")
    return str(path.relative_to(here))


def submit(args) -> int:
    from raygen.spec import load_spec
    load_spec(args.spec, args.set)  # fail here, not on the cluster
    spec = _spec_in_upload(args.spec)
    entry = " ".join(["raygen", args.kind, shlex.quote(spec)] + [f"--set {shlex.quote(s)}" for s in args.set])
    address, source = resolve_address(args.address)
    client = _client(address, source)
    job_id = _call("submitting the job", client.submit_job, entrypoint=entry,
                   runtime_env={"working_dir": ".", "excludes": UPLOAD_EXCLUDES})
    remember(job_id, address)
    print(f"submitted {job_id} to {_dashboard_url(address)}: {entry}")
    print(f"  status: raygen submit status {job_id}")
    print(f"  logs:   raygen submit logs {job_id} --follow")
    if args.follow:
        args.job_id, args.address = job_id, address
        return logs(args)
    return 0


def _state(status) -> str:
    """'FAILED' from JobStatus.FAILED (a str enum) or the plain string."""
    return str(getattr(status, "value", status)).rsplit(".", 1)[-1]


def _ended_badly(status) -> bool:
    return _state(status) in ("FAILED", "STOPPED")


def _show_failure(client, job_id: str, info=None, with_tail: bool = True) -> None:
    """Why a job ended badly: Ray's one-line reason and (unless they were just
    streamed) the last log lines, on stderr."""
    import sys
    from raygen.train.cluster import redact
    info = info or _call(f"status of {job_id}", client.get_job_info, job_id)
    text = _call(f"logs of {job_id}", client.get_job_logs, job_id) if with_tail else ""
    tail = [line for line in text.splitlines() if line.strip()][-TAIL_LINES:]
    reason = _first_line(info.message) if info.message else "no reason given"
    print(f"job {job_id} {_state(info.status)}: {redact(reason)}", file=sys.stderr)
    if tail:
        print(f"last {len(tail)} log lines:", file=sys.stderr)
        print(redact("\n".join("  " + line for line in tail)), file=sys.stderr)


def status(args) -> int:
    client = _job_client(args)
    info = _call(f"status of {args.job_id}", client.get_job_info, args.job_id)
    if _ended_badly(info.status):
        _show_failure(client, args.job_id, info)
        return 1
    print(f"{args.job_id}: {_state(info.status)}" + (f" ({_first_line(info.message)})" if info.message else ""))
    return 0


def list_jobs(args) -> int:
    address, source = resolve_address(args.address)
    jobs = _call("listing jobs", _client(address, source).list_jobs)
    if not jobs:
        print(f"no jobs on {_dashboard_url(address)}")
        return 0
    rows = [(j.submission_id or j.job_id or "?", _state(j.status),
             time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.start_time / 1000)) if j.start_time else "-",
             j.entrypoint or "") for j in sorted(jobs, key=lambda j: j.start_time or 0)]
    widths = [max(len(r[i]) for r in rows + [("JOB", "STATUS", "STARTED", "")]) for i in range(3)]
    for row in [("JOB", "STATUS", "STARTED", "ENTRYPOINT"), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3])
    return 0


def logs(args) -> int:
    client = _job_client(args)
    if not getattr(args, "follow", False):
        print(_call(f"logs of {args.job_id}", client.get_job_logs, args.job_id), end="")
        return 0
    seen = 0
    while True:  # polling keeps this free of an async client
        text = _call(f"logs of {args.job_id}", client.get_job_logs, args.job_id)
        print(text[seen:], end="", flush=True)
        seen = len(text)
        state = _call(f"status of {args.job_id}", client.get_job_status, args.job_id)
        if state.is_terminal():
            if _ended_badly(state):
                print(flush=True)
                _show_failure(client, args.job_id, with_tail=False)  # the log was just streamed
                return 1
            print(f"\njob {args.job_id} ended: {_state(state)}")
            return 0
        time.sleep(2)


def stop(args) -> int:
    ok = _call(f"stopping {args.job_id}", _job_client(args).stop_job, args.job_id)
    print(f"{'stopping' if ok else 'already ended'}: {args.job_id}")
    return 0
