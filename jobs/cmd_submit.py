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


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    from raygen.jobs.cli import UserError
    try:
        return JobSubmissionClient(address)
    except Exception as err:
        raise UserError(f"cannot reach the Ray cluster at {address} ({str(err).splitlines()[0]}); "
                        "check the dashboard address (http://HEAD:8265) and that the cluster is up (`ray up cluster.yaml`)") from None


def submit(args) -> int:
    from raygen.spec import load_spec
    load_spec(args.spec, args.set)  # fail here, not on the cluster
    entry = " ".join(["raygen", args.kind, shlex.quote(args.spec)] + [f"--set {shlex.quote(s)}" for s in args.set])
    client = _client(args.address)
    job_id = client.submit_job(entrypoint=entry, runtime_env={"working_dir": ".", "excludes": ["runs/", ".venv/", ".git/"]})
    print(f"submitted {job_id}: {entry}")
    print(f"  status: raygen submit status {job_id} --address {args.address}")
    print(f"  logs:   raygen submit logs {job_id} --address {args.address} --follow")
    if args.follow:
        args.job_id = job_id
        return logs(args)
    return 0


def status(args) -> int:
    info = _client(args.address).get_job_info(args.job_id)
    print(f"{args.job_id}: {info.status}" + (f" ({info.message})" if info.message else ""))
    return 0


def logs(args) -> int:
    client = _client(args.address)
    if not getattr(args, "follow", False):
        print(client.get_job_logs(args.job_id), end="")
        return 0
    seen = 0
    while True:  # polling keeps this free of an async client
        text = client.get_job_logs(args.job_id)
        print(text[seen:], end="", flush=True)
        seen = len(text)
        state = client.get_job_status(args.job_id)
        if state.is_terminal():
            print(f"\njob {args.job_id} ended: {state}")
            return 0 if str(state).endswith("SUCCEEDED") else 1
        time.sleep(2)


def stop(args) -> int:
    ok = _client(args.address).stop_job(args.job_id)
    print(f"{'stopping' if ok else 'already ended'}: {args.job_id}")
    return 0
