"""raygen models as MLflow Models: a `pyfunc` flavor, a signature, no pickles.

An export folder (raygen.exports) is logged as an MLflow Model with
models-from-code: the code is `pyfunc_model.py` beside this file (it only
names `RaygenPyfunc`), and the export folder is the model's one artifact,
`artifacts/export/` in the MLflow Model folder:

    MLmodel                 flavors.python_function: loader, artifacts.export,
                            model_config["raygen.task"]; the signature
    pyfunc_model.py         the models-from-code file (copied in)
    artifacts/export/       the raygen export: raygen-model.json, weights.safetensors
                            (safetensors only), spec.yaml, data_info.json,
                            components/<name>/
    requirements.txt, python_env.yaml, conda.yaml

`RaygenPyfunc.load_context` reads that folder with raygen's own loader, so
`mlflow.pyfunc.load_model`, `mlflow models serve` and `raygen serve/sample/
eval models:/NAME/VERSION` all load the same files.

What `predict` does depends on what the family can do (its capabilities),
chosen when the model is logged and written as `raygen.task` in the MLmodel's model_config:

- "sample": one input row per request; columns `n` (default 1), `seed`
  (default 0) and the model's condition field (`label`, `caption`, `scene`
  or `image`); sampling parameters (e.g. `temperature`) as MLflow params.
  Output: one row per image, `request` (input row), `index`, `seed` and
  `png` (PNG bytes; base64 in JSON). Image i of a request uses seed + i,
  exactly as `model.generate(n, condition=..., seed=...)`.
- "reconstruct" (an autoencoder, a codebook): column `image` (PNG/JPEG bytes)
  -> `png`.
- "score" (clip): columns `image` and `text` -> `score` (cosine similarity).
- "none": a family with none of these; predict raises a one-line error
  naming the family and what it can do.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import mlflow.pyfunc

from raygen.tracking.models import EXPORT_ARTIFACT

CODE_FILE = Path(__file__).with_name("pyfunc_model.py")
#: the model_config key naming the task
TASK_KEY = "raygen.task"
TASKS = ("sample", "reconstruct", "score", "none")
#: where the model runs: this variable ("cpu", "cuda", "cuda:1"), else CUDA when there is one
DEVICE_ENV = "RAYGEN_PYFUNC_DEVICE"
#: at most this many images (sample) or input rows per predict call
MAX_IMAGES = 256


def task_for(model) -> str:
    """What the pyfunc's predict does for this model (its first capability of sample, reconstruct, score)."""
    from raygen.models import Capability, has
    for cap in (Capability.SAMPLE, Capability.RECONSTRUCT, Capability.SCORE):
        if has(model, cap):
            return cap.value
    return "none"


# ---------------------------------------------------------------- signature
def _scalar_kind(annotation) -> str | None:
    """The MLflow param type of a scalar annotation (Optional and Literal unwrapped), else None."""
    import types
    import typing
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        kinds = {_scalar_kind(a) for a in args if a is not type(None)}
        return kinds.pop() if len(kinds) == 1 else None
    if typing.get_origin(annotation) is typing.Literal:
        return "string" if all(isinstance(a, str) for a in args) else None
    return {bool: "boolean", int: "long", float: "double", str: "string"}.get(annotation)


def _param_specs(params_cls) -> list:
    """The family's sampling parameters as MLflow params, each with its default (None: the
    model's own default). A field that is not a scalar is left out: its default is used."""
    from mlflow.types.schema import ParamSpec
    out = []
    for name, info in params_cls.model_fields.items():
        kind = _scalar_kind(info.annotation)
        if kind is not None:
            out.append(ParamSpec(name, kind, info.get_default(call_default_factory=True)))
    return out


def signature_for(model, task: str | None = None):
    """The MLflow ModelSignature of `model`'s pyfunc for `task` (default: task_for(model))."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, ParamSchema, Schema

    task = task or task_for(model)
    if task == "sample":
        from raygen.models.conditions import get_kind
        columns = [ColSpec("long", "n", required=False), ColSpec("long", "seed", required=False)]
        kind = get_kind(model.condition_kind)
        if kind.field:
            # label: an index or a class name; scene: an object; image: PNG/JPEG bytes
            col_type = {"caption": "string", "image": "binary"}.get(kind.name, AnyType())
            columns.append(ColSpec(col_type, kind.field, required=False))
        outputs = Schema([ColSpec("long", "request"), ColSpec("long", "index"), ColSpec("long", "seed"),
                          ColSpec("binary", "png")])
        params = _param_specs(model.sampling_params)
        return ModelSignature(Schema(columns), outputs, ParamSchema(params) if params else None)
    if task == "reconstruct":
        return ModelSignature(Schema([ColSpec("binary", "image")]), Schema([ColSpec("binary", "png")]))
    if task == "score":
        return ModelSignature(Schema([ColSpec("binary", "image"), ColSpec("string", "text")]),
                              Schema([ColSpec("double", "score")]))
    return ModelSignature(Schema([ColSpec("long", "n", required=False)]))


# ---------------------------------------------------------------- the model
def _bad(message: str):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _cell(row: dict[str, Any], key: str) -> Any:
    """A row's value, None when the column is absent or empty (NaN/None in a DataFrame)."""
    import numpy as np
    value = row.get(key)
    if isinstance(value, np.generic):  # numpy scalars from a DataFrame: plain Python values
        value = value.item()
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


def _rows(model_input) -> list[dict[str, Any]]:
    import pandas as pd
    if isinstance(model_input, pd.DataFrame):
        return model_input.to_dict("records")
    if isinstance(model_input, dict):
        return [model_input]
    if isinstance(model_input, list) and all(isinstance(r, dict) for r in model_input):
        return list(model_input)
    raise _bad(f"raygen pyfunc input must be a DataFrame, a dict or a list of dicts, got {type(model_input).__name__}")


def _int(row: dict[str, Any], key: str, default: int, low: int, high: int, where: str) -> int:
    value = _cell(row, key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise _bad(f"{where}.{key} must be an integer, got {value!r}")
    value = int(value)
    if not low <= value <= high:
        raise _bad(f"{where}.{key} must be {low}..{high}, got {value}")
    return value


class RaygenPyfunc(mlflow.pyfunc.PythonModel):
    """The pyfunc of every raygen model; its state is the export folder in the model's artifacts."""

    # the input schema is the explicit signature (signature_for), not predict's type hints:
    # MLflow's hint-based wrapping of predict is left out
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        import torch

        from raygen.exports import load_exported
        device = os.environ.get(DEVICE_ENV) or ("cuda" if torch.cuda.is_available() else "cpu")
        self.loaded = load_exported(context.artifacts[EXPORT_ARTIFACT])
        self.model = self.loaded.model.to(device)
        self.task = (context.model_config or {}).get(TASK_KEY) or task_for(self.model)

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        if self.task == "sample":
            return self._sample(_rows(model_input), params or {})
        if self.task == "reconstruct":
            return self._reconstruct(_rows(model_input))
        if self.task == "score":
            return self._score(_rows(model_input))
        from raygen.models.capabilities import VERBS
        can = ", ".join(VERBS[c] for c in sorted(self.model.capabilities, key=lambda c: c.value))
        raise _bad(f"raygen model of family {self.model.family!r} has no pyfunc predict: it can {can}, but not "
                   "sample, reconstruct or score; load it with raygen.exports.load_generator instead")

    # ------------------------------------------------------------ tasks
    def _sample(self, rows: list[dict[str, Any]], params: dict[str, Any]):
        import pandas as pd

        from raygen.images import png_bytes, to_uint8
        from raygen.models.conditions import ConditionError, get_kind
        from raygen.models.sampling import MAX_SEED, SamplingParamsError, parse_params

        field = get_kind(self.model.condition_kind).field
        try:
            given = {k: v for k, v in params.items() if v is not None}  # None: the model's default
            sampling = parse_params(self.model.sampling_params, given, strict=False)
        except SamplingParamsError as err:
            raise _bad(f"params.{err.field}: {err.message}" if err.field else err.message) from None
        requests = []
        for i, row in enumerate(rows):
            where = f"row {i}"
            unknown = sorted(k for k in row if k not in ("n", "seed", field) and _cell(row, k) is not None)
            if unknown:
                accepted = ", ".join(k for k in ("n", "seed", field) if k)
                raise _bad(f"{where}: unknown column(s) {unknown}; this model takes: {accepted}")
            n = _int(row, "n", 1, 1, MAX_IMAGES, where)
            seed = _int(row, "seed", 0, 0, MAX_SEED - n + 1, where)
            requests.append((n, seed, _cell(row, field) if field else None))
        if sum(n for n, _, _ in requests) > MAX_IMAGES:
            raise _bad(f"at most {MAX_IMAGES} images per predict call; asked for {sum(n for n, _, _ in requests)}")
        out = []
        for i, (n, seed, condition) in enumerate(requests):
            try:
                images = self.model.generate(n, condition=condition, seed=seed, params=sampling)
            except (ConditionError, SamplingParamsError) as err:
                raise _bad(f"row {i}.{err.field}: {err.message}" if err.field else err.message) from None
            for j, image in enumerate(to_uint8(images)):
                out.append({"request": i, "index": j, "seed": seed + j, "png": png_bytes(image)})
        return pd.DataFrame(out, columns=["request", "index", "seed", "png"])

    def _images(self, rows: list[dict[str, Any]]):
        import torch

        from raygen.models.conditions import ConditionError, get_kind
        if not rows or len(rows) > MAX_IMAGES:
            raise _bad(f"give 1..{MAX_IMAGES} rows with an 'image' column (PNG or JPEG bytes), got {len(rows)}")
        kind = get_kind("image")
        out = []
        for i, row in enumerate(rows):
            value = _cell(row, "image")
            if value is None:
                raise _bad(f"row {i}.image is missing: give PNG or JPEG bytes (base64 in JSON)")
            try:
                out.append(kind.parse(value, self.model.data_info))
            except ConditionError as err:
                raise _bad(f"row {i}.image: {err.message}") from None
        device = next((t.device for t in (*self.model.parameters(), *self.model.buffers())), torch.device("cpu"))
        return torch.stack(out).to(device)

    def _reconstruct(self, rows: list[dict[str, Any]]):
        import pandas as pd
        import torch

        from raygen.images import png_bytes, to_uint8
        with torch.no_grad():
            images = self.model.reconstruct(self._images(rows))
        return pd.DataFrame({"png": [png_bytes(im) for im in to_uint8(images)]})

    def _score(self, rows: list[dict[str, Any]]):
        import pandas as pd
        import torch
        texts = []
        for i, row in enumerate(rows):
            text = _cell(row, "text")
            if not isinstance(text, str) or not text.strip():
                raise _bad(f"row {i}.text must be a non-empty string, got {text!r}")
            texts.append(text)
        with torch.no_grad():
            scores = self.model.score(self._images(rows), texts)
        return pd.DataFrame({"score": [float(s) for s in scores]})


# ---------------------------------------------------------------- logging
def pip_requirements() -> list[str]:
    """What loading the model needs. raygen itself must be installed where it is
    served (`mlflow models serve --env-manager local` from raygen's environment)."""
    from importlib.metadata import PackageNotFoundError, version
    out = []
    for dist in ("raygen", "mlflow", "torch", "safetensors", "pillow", "numpy", "pandas", "pydantic", "pyyaml"):
        try:
            out.append(f"{dist}=={version(dist).split('+')[0]}")
        except PackageNotFoundError:
            out.append(dist)
    return out


def save_pyfunc(export_dir: str | Path, path: str | Path, **kwargs) -> Path:
    """Write the MLflow Model of an export folder to a local `path` (no tracking store)."""
    import warnings
    kwargs = {**pyfunc_log_kwargs(export_dir), **kwargs}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")  # the signature is given
        mlflow.pyfunc.save_model(path=str(path), **kwargs)
    return Path(path)


def _load(export_dir):
    from raygen.exports import load_exported
    return load_exported(export_dir)


def pyfunc_log_kwargs(export_dir: str | Path) -> dict[str, Any]:
    """The arguments of mlflow's Model.log / pyfunc.log_model for an export folder."""
    loaded = _load(export_dir)
    task = task_for(loaded.model)
    # the folder is copied to artifacts/<its name>/; MLmodel's artifacts.export names that path
    return {"python_model": str(CODE_FILE), "artifacts": {EXPORT_ARTIFACT: str(Path(export_dir).resolve())},
            "signature": signature_for(loaded.model, task), "model_config": {TASK_KEY: task},
            "pip_requirements": pip_requirements(),
            "metadata": {"raygen_family": loaded.spec.model.family, "raygen_task": task}}
