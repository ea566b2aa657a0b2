"""`raygen submit`: run a job on a remote Ray cluster through the Ray Jobs API."""
from __future__ import annotations

import shlex
import time


def register(sub) -> None:
    p = sub.add_parser("submit", help="submit `raygen train|tune SPEC` to a Ray cluster; status, logs, stop")
    s = p.add_subparsers(dest="submit_command", metavar="ACTION", required=True)
    run = s.add_parser("run", help="submit a job (the current folder is uploaded as its working dir)")
    run.add_argument("spec")
    run.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://HEAD:8265")
    run.add_argument("--kind", choices=["train", "tune"], default="train")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    run.add_argument("--follow", action="store_true", help="stream logs until the job ends")
    run.set_defaults(func=submit)
    for name, fn, help_ in (("status", status, "show a job's status"), ("logs", logs, "print a job's logs"),
                            ("stop", stop, "stop a job")):
        q = s.add_parser(name, help=help_)
        q.add_argument("job_id")
        q.add_argument("--address", required=True)
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


def _first_line(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    from raygen.jobs.cli import UserError
    url = _dashboard_url(address)
    try:
        return JobSubmissionClient(url)
    except Exception as err:
        raise UserError(f"cannot reach the Ray cluster at {url} ({_first_line(err)}); "
                        "check the dashboard address (http://HEAD:8265) and that the cluster is up (`ray up cluster.yaml`)") from None


def _call(what: str, fn, *args, **kwargs):
    """A Jobs API call; a refused request (unknown job id, cluster gone) is a user error, not a traceback."""
    from raygen.jobs.cli import UserError
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, OSError) as err:  # the SDK raises RuntimeError for non-200 replies; requests' errors are OSErrors
        raise UserError(f"{what} failed: {_first_line(err)}") from None


def submit(args) -> int:
    from raygen.spec import load_spec
    load_spec(args.spec, args.set)  # fail here, not on the cluster
    entry = " ".join(["raygen", args.kind, shlex.quote(args.spec)] + [f"--set {shlex.quote(s)}" for s in args.set])
    client = _client(args.address)
    job_id = _call("submitting the job", client.submit_job, entrypoint=entry,
                   runtime_env={"working_dir": ".", "excludes": ["runs/", ".venv/", ".git/"]})
    print(f"submitted {job_id}: {entry}")
    print(f"  status: raygen submit status {job_id} --address {args.address}")
    print(f"  logs:   raygen submit logs {job_id} --address {args.address} --follow")
    if args.follow:
        args.job_id = job_id
        return logs(args)
    return 0


def status(args) -> int:
    info = _call(f"status of {args.job_id}", _client(args.address).get_job_info, args.job_id)
    print(f"{args.job_id}: {info.status}" + (f" ({info.message})" if info.message else ""))
    return 0


def logs(args) -> int:
    client = _client(args.address)
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
            print(f"\njob {args.job_id} ended: {state}")
            return 0 if str(state).endswith("SUCCEEDED") else 1
        time.sleep(2)


def stop(args) -> int:
    ok = _call(f"stopping {args.job_id}", _client(args.address).stop_job, args.job_id)
    print(f"{'stopping' if ok else 'already ended'}: {args.job_id}")
    return 0
