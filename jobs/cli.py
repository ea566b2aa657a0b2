"""The `raygen` command line. Each command lives in its own `cmd_*` module
that adds a subparser and names the function that runs it."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# Command modules; each has `register(subparsers)`.
COMMAND_MODULES = (
    "raygen.jobs.cmd_spec",
    "raygen.jobs.cmd_data",
    "raygen.jobs.cmd_train",
    "raygen.jobs.cmd_tune",
    "raygen.jobs.cmd_eval",
    "raygen.jobs.cmd_sample",
    "raygen.jobs.cmd_export",
    "raygen.jobs.cmd_metrics",
    "raygen.jobs.cmd_serve",
    "raygen.jobs.cmd_promote",
    "raygen.jobs.cmd_submit",
    "raygen.jobs.cmd_ui",
)


class UserError(Exception):
    """An error whose message is meant for the user as is (no traceback)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raygen", description="Train, tune, track and serve image generators on Ray.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _quiet_environment() -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # MLflow's download bars are chatter
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _token_auth(args) -> None:
    """`--token-file` (or a token in Ray's variables): set up before anything imports Ray."""
    from raygen.train.cluster import ClusterError, token_auth
    try:
        token_auth(getattr(args, "ray_token_file", None))  # not `raygen serve --token-file`: its HTTP token
    except ClusterError as err:
        raise UserError(str(err)) from None


def main(argv: list[str] | None = None) -> int:
    _quiet_environment()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from raygen.data.errors import DataError
    from raygen.exports import ModelLoadError
    from raygen.spec.errors import SpecError
    from raygen.storage import StorageError
    known = (UserError, SpecError, DataError, ModelLoadError, StorageError)
    try:
        _token_auth(args)
        return int(args.func(args) or 0)
    except known as err:
        print(f"raygen {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # `python -m raygen.jobs.cli` runs this file as __main__: use the package's
    # own module so its error classes are the ones `main` catches.
    from raygen.jobs.cli import main as package_main
    sys.exit(package_main())
