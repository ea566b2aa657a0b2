"""A finished sweep's results: the table (console, CSV, markdown), the
parallel-coordinates plot and every trial's metric-against-step curves (PNG),
and the best trial's full spec (`raygen tune best`)."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

RESULTS = "results.json"
BASE_SPEC = "spec.yaml"
#: metrics shown in the table beside the objective, when trials report them
SHOWN = ("val_loss", "fid", "fid_stderr", "kid", "clip_score", "images_per_s", "step")


def table_columns(rows: list[dict[str, Any]], objectives: list[str]) -> tuple[list[str], list[str]]:
    """(searched keys, metric columns) of the table."""
    keys = sorted({k for r in rows for k in r["overrides"]})
    metrics = list(dict.fromkeys([*objectives, *(m for m in SHOWN if any(m in r["metrics"] for r in rows))]))
    return keys, metrics


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return str(value)


def table_rows(rows: list[dict[str, Any]], objectives: list[str], best: int | None) -> tuple[list[str], list[list[str]]]:
    keys, metrics = table_columns(rows, objectives)
    header = ["trial", *keys, *metrics, "status"]
    body = []
    for i, r in enumerate(rows):
        status = "best" if i == best else ("error: " + r["error"] if r.get("error") else r.get("status", "done"))
        body.append([r["trial_id"], *(_cell(r["overrides"].get(k)) for k in keys),
                     *(_cell(r["metrics"].get(m)) for m in metrics), status])
    return header, body


def to_csv(header: list[str], body: list[list[str]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(body)
    return out.getvalue()


def to_markdown(header: list[str], body: list[list[str]]) -> str:
    def esc(c: str) -> str:
        return c.replace("|", "\\|")
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(esc, row)) + " |" for row in body]
    return "\n".join(lines) + "\n"


def to_console(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in body]
    return "\n".join(lines)


def parallel_coordinates(rows: list[dict[str, Any]], keys: list[str], metric: str, path: Path) -> Path:
    """One line per trial across the searched keys and the objective, each axis
    scaled to [0, 1] (log scale for positive axes spanning over 20x, categories
    by rank); colour is the objective."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes = [*keys, metric]
    done = [r for r in rows if isinstance(r["metrics"].get(metric), (int, float))]

    def column(name: str) -> list[Any]:
        return [r["metrics"][metric] if name == metric else r["overrides"].get(name) for r in done]

    scaled, labels = {}, {}
    for name in axes:
        values = column(name)
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            v = [float(x) for x in values]
            lo, hi = min(v), max(v)
            if lo > 0 and hi / lo > 20:
                v, lo, hi = [math.log10(x) for x in v], math.log10(lo), math.log10(hi)
            scaled[name] = [(x - lo) / (hi - lo) if hi > lo else 0.5 for x in v]
            labels[name] = (_cell(min(map(float, values))), _cell(max(map(float, values))))
        else:
            cats = sorted({str(x) for x in values})
            scaled[name] = [cats.index(str(x)) / max(1, len(cats) - 1) for x in values]
            labels[name] = (cats[0], cats[-1]) if cats else ("", "")
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(axes)), 4), dpi=100)
    scores = column(metric)
    cmap = plt.get_cmap("viridis")
    lo, hi = (min(scores), max(scores)) if scores else (0, 1)
    for i in range(len(done)):
        c = cmap((scores[i] - lo) / (hi - lo) if hi > lo else 0.5)
        ax.plot(range(len(axes)), [scaled[a][i] for a in axes], color=c, marker="o", alpha=0.8)
    ax.set_xticks(range(len(axes)), axes, rotation=15, fontsize=8)
    for j, a in enumerate(axes):
        ax.axvline(j, color="gray", lw=0.5)
        ax.annotate(labels[a][0], (j, -0.06), ha="center", fontsize=7)
        ax.annotate(labels[a][1], (j, 1.03), ha="center", fontsize=7)
    ax.set_yticks([])
    ax.set_ylim(-0.1, 1.1)
    ax.set_title(f"{len(done)} trials; colour: {metric}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def metric_curves(histories: dict[str, list[tuple[float, float]]], metric: str, path: Path) -> Path:
    """`metric` against the training step, one line per trial."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for name, points in sorted(histories.items()):
        points = sorted(p for p in points if math.isfinite(p[1]))
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    if histories:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def best_spec(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The best trial's full spec: the sweep's spec with the trial's values and no tune section
    (`raygen train best.yaml` trains it)."""
    from raygen.spec.loader import apply_overrides, parse_spec, spec_to_dict
    raw = apply_overrides({k: v for k, v in base.items() if k != "tune"}, overrides)
    return spec_to_dict(parse_spec(raw))


def load_sweep(run: str, tracking_uri: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(base spec, results) of a sweep: RUN is its folder or its MLflow parent run id."""
    import yaml

    folder = Path(run)
    if folder.is_dir():
        if not (folder / RESULTS).is_file():
            raise FileNotFoundError(f"{folder} holds no {RESULTS}: is it a finished sweep's folder (runs/NAME-tune)?")
        return yaml.safe_load((folder / BASE_SPEC).read_text()), json.loads((folder / RESULTS).read_text())
    import re
    if not re.fullmatch(r"[0-9a-f]{32}", run):
        raise FileNotFoundError(f"{run!r} is neither a sweep folder nor an MLflow run id (32 hex digits)")
    from raygen.tracking.store import client
    c = client(tracking_uri or "sqlite:///runs/mlflow.db")
    try:
        c.get_run(run)
    except Exception:
        raise FileNotFoundError(f"{run!r} is neither a sweep folder nor an MLflow run in {tracking_uri}") from None
    local = Path(c.download_artifacts(run, RESULTS))
    spec_file = Path(c.download_artifacts(run, BASE_SPEC))
    return yaml.safe_load(spec_file.read_text()), json.loads(local.read_text())
