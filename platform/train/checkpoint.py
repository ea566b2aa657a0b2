"""Atomic, resumable checkpoints.

A checkpoint is a folder `step-NNNNNNNN` under the run's `checkpoints/`. It is
written as a hidden temporary folder and renamed into place only after a
`COMPLETE` marker is inside it, so a crash mid-save never leaves a folder that
looks loadable. Tensors load with `weights_only=True` or from safetensors.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

MARKER = "COMPLETE"
PREFIX = "step-"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def is_complete(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(".") and (path / MARKER).is_file()


def list_checkpoints(root: str | Path) -> list[Path]:
    """Completed checkpoints under `root` (a checkpoints folder or a run folder), oldest first."""
    root = Path(root)
    if (root / "checkpoints").is_dir():
        root = root / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and is_complete(p)]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def find_latest_checkpoint(root: str | Path) -> Path | None:
    root = Path(root)
    if is_complete(root) and root.name.startswith(PREFIX):
        return root
    found = list_checkpoints(root)
    return found[-1] if found else None


# ------------------------------------------------------------------ RNG state
def capture_rng() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_meta": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": random.getstate()[1],
        "python_gauss": random.getstate()[2],
    }


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, pos, has_gauss, gauss = state["numpy_meta"]
    np.random.set_state((name, state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate((3, tuple(state["python"]), state["python_gauss"]))


# ------------------------------------------------------------------ hook state
HOOKS_DIR = "hooks"
#: files of checkpoints written before hook state was generic, by the hook key that now owns them
LEGACY_HOOK_FILES = {"ema": "ema.safetensors"}


def save_hook_state(folder: Path, key: str, state: dict[str, Any]) -> None:
    """A hook's state as files, no pickles: tensors into `hooks/<key>.safetensors`,
    everything else (plain JSON values) into `hooks/<key>.json`."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if torch.is_tensor(v)}
    plain = {k: v for k, v in state.items() if not torch.is_tensor(v)}
    out = folder / HOOKS_DIR
    out.mkdir(parents=True, exist_ok=True)
    if tensors:
        save_file(tensors, str(out / f"{key}.safetensors"))
    if plain:
        try:
            text = json.dumps(plain, indent=2, allow_nan=True)
        except TypeError as err:
            raise TypeError(f"hook state '{key}': every value must be a tensor or plain JSON data ({err})") from None
        (out / f"{key}.json").write_text(text)


def load_hook_state(folder: Path, key: str) -> dict[str, Any] | None:
    """What `save_hook_state` wrote for `key` (or a legacy file it replaces); None when nothing was saved."""
    from safetensors.torch import load_file

    tensors_file, json_file = folder / HOOKS_DIR / f"{key}.safetensors", folder / HOOKS_DIR / f"{key}.json"
    if not tensors_file.is_file() and not json_file.is_file():
        legacy = LEGACY_HOOK_FILES.get(key)
        if legacy and (folder / legacy).is_file():
            return dict(load_file(str(folder / legacy)))
        return None
    state: dict[str, Any] = {}
    if tensors_file.is_file():
        state.update(load_file(str(tensors_file)))
    if json_file.is_file():
        state.update(json.loads(json_file.read_text()))
    return state


def save_torch(obj: Any, path: Path) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_torch(path: Path) -> Any:
    # weights_only: a checkpoint never runs code when it is loaded.
    return torch.load(path, map_location="cpu", weights_only=True)


class CheckpointManager:
    """Where checkpoints go, how many are kept, which one is best."""

    def __init__(self, root: str | Path, keep_last: int = 2, best_metric: str | None = None, best_mode: str = "min"):
        self.root = Path(root)
        self.keep_last = keep_last
        self.best_metric = best_metric
        self.best_mode = best_mode

    def temp_dir(self, step: int) -> Path:
        return self.root / f".{checkpoint_name(step)}.tmp"

    def begin(self, step: int) -> Path:
        """Called by rank 0 only: a fresh temporary folder for this step."""
        tmp = self.temp_dir(step)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, step: int, state: dict[str, Any], metrics: dict[str, float] | None = None) -> Path:
        """Called by rank 0 once every rank has written into the temp folder."""
        tmp = self.temp_dir(step)
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
        with open(tmp / MARKER, "w") as f:
            f.write(json.dumps({"step": step}))
            f.flush()
            os.fsync(f.fileno())
        final = self.root / checkpoint_name(step)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        self._update_best(final, step, metrics or {})
        self._prune()
        return final

    @property
    def best_file(self) -> Path:
        return self.root / "best.json"

    def best(self) -> dict | None:
        return json.loads(self.best_file.read_text()) if self.best_file.is_file() else None

    def _update_best(self, path: Path, step: int, metrics: dict[str, float]) -> None:
        if not self.best_metric or self.best_metric not in metrics:
            return
        value = float(metrics[self.best_metric])
        best = self.best()
        better = best is None or (value < best["value"] if self.best_mode == "min" else value > best["value"])
        if better:
            tmp = self.best_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"step": step, "path": path.name, "metric": self.best_metric, "value": value}))
            os.replace(tmp, self.best_file)

    def _prune(self) -> None:
        best = self.best()
        keep_best = best["path"] if best else None
        done = list_checkpoints(self.root)
        for path in done[:-self.keep_last]:
            if path.name != keep_best:
                shutil.rmtree(path, ignore_errors=True)

    def clean_stale(self) -> None:
        """Remove temporary folders a crashed save left behind (never loadable)."""
        for stale in self.root.glob(f".{PREFIX}*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
