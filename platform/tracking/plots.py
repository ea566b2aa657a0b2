"""Loss-curve plot drawn from the run's own MLflow history (PIL only)."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw


def draw_curves(series: dict[str, list[tuple[int, float]]], path: Path, size=(640, 360)) -> Path:
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    pad = 40
    pts = [p for s in series.values() for p in s]
    if pts:
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts]
        x0, x1 = min(xs), max(xs) or 1
        y0, y1 = min(ys), max(ys)
        y1 = y1 if y1 > y0 else y0 + 1
        colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e"]
        for i, (name, s) in enumerate(series.items()):
            s = sorted(s)
            xy = [(pad + (x - x0) / max(1, x1 - x0) * (size[0] - 2 * pad),
                   size[1] - pad - (y - y0) / (y1 - y0) * (size[1] - 2 * pad)) for x, y in s]
            if len(xy) > 1:
                d.line(xy, fill=colors[i % 4], width=2)
            d.text((pad + 5, 5 + 12 * i), name, fill=colors[i % 4])
        d.text((5, size[1] - pad), f"{y0:.3g}", fill="black")
        d.text((5, pad - 10), f"{y1:.3g}", fill="black")
        d.text((size[0] - pad - 20, size[1] - 20), f"step {x1}", fill="black")
    d.rectangle([pad, pad, size[0] - pad, size[1] - pad], outline="gray")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def log_loss_curve(tracked, path: Path) -> Path:
    c = tracked.client
    series = {}
    for key in ("loss", "val_loss"):
        hist = c.get_metric_history(tracked.run_id, key)
        if hist:
            series[key] = [(m.step, m.value) for m in hist]
    draw_curves(series, path)
    tracked.log_artifact(path, "plots")
    return path
