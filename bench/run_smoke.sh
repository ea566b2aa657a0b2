#!/usr/bin/env bash
# Every benchmark in bench/ in its --smoke mode (seconds to a minute each), so
# none can rot unnoticed: `make bench-smoke`, which CI runs after `make test`.
# A new benchmark needs a --smoke mode (tiny sizes, still printing its ratio line).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
tmp=$(mktemp -d /tmp/rg-bench-XXXXXX)  # Ray's session files and scratch data: short paths, removed after
trap 'rm -rf "$tmp"' EXIT
export RAY_TMPDIR=$tmp TMPDIR=$tmp RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 \
       RAY_DATA_DISABLE_PROGRESS_BARS=1 MLFLOW_DISABLE_TELEMETRY=true
for script in bench/*.py; do
  echo "== $script --smoke"
  start=$(date +%s)
  "$PY" "$script" --smoke
  echo "== $script: ok in $(( $(date +%s) - start ))s"
done
