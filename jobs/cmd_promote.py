"""`raygen promote NAME VERSION [--if-better fid]`: point a registry alias (default `champion`)
at a model version, optionally only when its recorded metric beats the current holder's.

The metric of a version is its run's latest value of METRIC, or of `eval_METRIC`
(what `raygen eval` logs). Lower is better for fid, kid, losses, nll and bpd,
higher for anything else (`--mode` overrides). Every decision, made or refused,
is written to the candidate version's tags (`raygen.promotion.*`), so the
registry records why an alias moved or did not. A server started with
`--model models:/NAME@champion` resolves the alias when it loads.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Optional

LOWER_IS_BETTER = re.compile(r"(^|_)(fid|kid|loss|nll|bpd|mse|lpips)($|_)")


@dataclass
class Decision:
    promoted: bool
    reason: str
    alias: str
    version: int
    previous: Optional[int]


def direction(metric: str, mode: Optional[str] = None) -> str:
    """'min' or 'max': how METRIC improves."""
    if mode in ("min", "max"):
        return mode
    return "min" if LOWER_IS_BETTER.search(metric.lower()) else "max"


def version_metric(client, name: str, version: int, metric: str) -> Optional[float]:
    """The latest METRIC (or eval_METRIC) of the run that produced a model version; None if it has none."""
    run_id = client.get_model_version(name, str(version)).run_id
    if not run_id:
        return None
    metrics = client.get_run(run_id).data.metrics
    for key in (metric, f"eval_{metric}"):
        if key in metrics:
            return float(metrics[key])
    return None


def promote(tracking_uri: str, name: str, version: int, *, alias: str = "champion", if_better: Optional[str] = None,
            mode: Optional[str] = None) -> Decision:
    """Move `alias` to `version` (when `if_better` is given: only if its metric beats the current holder's)."""
    from mlflow.exceptions import MlflowException

    from raygen.tracking.store import client as make_client

    client = make_client(tracking_uri)
    try:
        client.get_model_version(name, str(version))
    except MlflowException:
        raise ValueError(f"model {name!r} has no version {version} in {tracking_uri}") from None
    try:
        previous = int(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        previous = None  # nobody holds the alias yet

    if previous == version:
        promoted, reason = False, f"version {version} is already {alias}"
    elif if_better is None or previous is None:
        promoted = True
        reason = f"promoted to {alias}" + (f" (no version held {alias})" if previous is None and if_better else "")
    else:
        way = direction(if_better, mode)
        mine = version_metric(client, name, version, if_better)
        theirs = version_metric(client, name, previous, if_better)
        if mine is None:
            raise ValueError(f"version {version} of {name!r} has no recorded {if_better!r} (nor eval_{if_better}) "
                             "in its run: evaluate it first (raygen eval) or promote without --if-better")
        if theirs is None:
            promoted = True
            reason = f"{if_better} {mine:.6g}; {alias} version {previous} has none recorded"
        else:
            promoted = mine < theirs if way == "min" else mine > theirs
            sign = ("<" if way == "min" else ">") if promoted else ("≥" if way == "min" else "≤")
            reason = (f"{if_better} {mine:.6g} {sign} {theirs:.6g} of {alias} version {previous} "
                      f"({'lower' if way == 'min' else 'higher'} is better)")
    if promoted:
        client.set_registered_model_alias(name, alias, str(version))
    tags = {"raygen.promotion.alias": alias, "raygen.promotion.result": "promoted" if promoted else "refused",
            "raygen.promotion.reason": reason, "raygen.promotion.previous": "" if previous is None else str(previous),
            "raygen.promotion.time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value)
    return Decision(promoted=promoted, reason=reason, alias=alias, version=version, previous=previous)


def register(sub) -> None:
    p = sub.add_parser(
        "promote", help="point a registry alias (champion) at a model version, optionally only if it is better",
        description="Set the MLflow registry alias (default champion) of NAME to VERSION. With --if-better METRIC "
                    "the alias moves only when the version's recorded METRIC beats the current holder's; the "
                    "decision and its reason are written to the version's tags. Servers started with "
                    "--model models:/NAME@champion load the version the alias points at.")
    p.add_argument("name", help="registered model name")
    p.add_argument("version", type=int, help="model version to promote")
    p.add_argument("--alias", default="champion", help="alias to move (default champion)")
    p.add_argument("--if-better", default=None, metavar="METRIC",
                   help="only promote when METRIC (e.g. fid) beats the current holder's")
    p.add_argument("--mode", choices=("min", "max"), default=None,
                   help="how METRIC improves (default: min for fid, kid, losses, nll, bpd; else max)")
    p.add_argument("--tracking-uri", default="sqlite:///runs/mlflow.db", help="MLflow tracking URI")
    p.set_defaults(func=run)


def run(args) -> int:
    from raygen.jobs.cli import UserError

    if not re.fullmatch(r"[A-Za-z0-9_\-]+", args.alias) or args.alias.lower() == "latest":
        raise UserError(f"--alias {args.alias!r}: letters, digits, '_' and '-' only, and not 'latest'")
    try:
        decision = promote(args.tracking_uri, args.name, args.version, alias=args.alias, if_better=args.if_better,
                           mode=args.mode)
    except ValueError as err:
        raise UserError(str(err)) from None
    verdict = "promoted" if decision.promoted else "not promoted"
    print(f"{args.name} version {decision.version}: {verdict}: {decision.reason}")
    return 0 if decision.promoted else 1
