"""Typed conditions: what an image is generated from.

A model declares one condition kind (`model.condition_kind`): "none",
"label", "caption", "scene" or "image" (families may register more with
`register_condition_kind`). A kind knows how to read one request's value (the
HTTP body, `raygen sample --label`, a Python call), check it against the
model's `DataInfo`, and turn values into the columns a data batch has, so a
model reads a sampling condition exactly like a training batch.

`Conditions` holds one parsed value per image (None: unconditioned), so the
conditions of several requests concatenate into one batch and a batch slices
back into requests.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch

if TYPE_CHECKING:
    from raygen.models.base import DataInfo


class ConditionError(ValueError):
    """A condition value that does not fit the model; `field` names the request field."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.message, self.field = message, field


def _show(names: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


# ---------------------------------------------------------------- kinds
class ConditionKind:
    """How one kind of condition is given, checked and batched."""
    name: str = ""
    field: str = ""           # the request field that carries it (None for "none")
    description: str = ""
    json_schema: dict[str, Any] = {}

    def parse(self, value: Any, info: "DataInfo") -> Any:
        """One request's value -> the per-image value the model reads. Raises ConditionError."""
        raise NotImplementedError

    def columns(self, values: Sequence[Any], info: "DataInfo", device: torch.device | str = "cpu") -> dict[str, Any]:
        """Per-image values (None: unconditioned) -> batch columns, as the data pipeline delivers them."""
        raise NotImplementedError

    def from_batch(self, batch: dict[str, Any], info: "DataInfo") -> list[Any]:
        """A data batch -> per-image values (to condition samples on validation data)."""
        raise NotImplementedError

    def text(self, value: Any, info: "DataInfo") -> str | None:
        """One value as text, for a grid's caption and for CLIP scoring; None: not text-like."""
        return None

    def example(self, info: "DataInfo") -> Any:
        """A valid per-image value for this model's data (None: the model samples without one), for
        what must sample before any request comes: the serving memory probe, warm-ups."""
        return None


class NoneKind(ConditionKind):
    name, field, description = "none", "", "unconditional"

    def parse(self, value, info):
        raise ConditionError("this model is unconditional; leave the condition out", "condition")

    def columns(self, values, info, device="cpu"):
        return {}

    def from_batch(self, batch, info):
        return [None] * len(batch["image"])


def parse_label(value: Any, info: "DataInfo", field: str = "label") -> int:
    """A class index (int or digits) or a class name, matched case-insensitively.
    The one label parser: the CLI, the HTTP API and Python calls all use it."""
    num, names = info.num_classes, list(info.class_names)
    if num < 1:
        raise ConditionError("this model has no classes; leave the label out", field)
    if isinstance(value, bool):
        raise ConditionError(f"label must be a class index or name, got {value!r}", field)
    if isinstance(value, str):
        text = value.strip()
        if text.lstrip("-").isdigit():
            value = int(text)
        else:
            lowered = [n.lower() for n in names]
            if text.lower() in lowered:
                return lowered.index(text.lower())
            accepted = f"a class name ({_show(names)}) or " if names else ""
            raise ConditionError(f"unknown label {value!r}; give {accepted}an integer 0..{num - 1}", field)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int):
        raise ConditionError(f"label must be a class index or name, got {type(value).__name__}", field)
    if not 0 <= value < num:
        raise ConditionError(f"label {value} is out of range; this model has {num} classes (0..{num - 1})", field)
    return value


class LabelKind(ConditionKind):
    name, field = "label", "label"
    description = "class index (0..num_classes-1) or class name (any case)"
    json_schema = {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "minLength": 1}]}

    def parse(self, value, info):
        return parse_label(value, info, self.field)

    def columns(self, values, info, device="cpu"):
        # -1 marks "no label": the family decides (draw one, or use its null label)
        return {"label": torch.tensor([-1 if v is None else int(v) for v in values], dtype=torch.long, device=device)}

    def from_batch(self, batch, info):
        labels = batch.get("label")
        return [None] * len(batch["image"]) if labels is None else [int(v) for v in labels]

    def text(self, value, info):
        if value is None:
            return None
        return info.class_names[value] if value < len(info.class_names) else f"class {value}"


class CaptionKind(ConditionKind):
    name, field = "caption", "caption"
    description = "text the image should show"
    json_schema = {"type": "string", "minLength": 1, "maxLength": 2000}

    def parse(self, value, info):
        if not isinstance(value, str) or not value.strip():
            raise ConditionError("caption must be a non-empty string", self.field)
        if len(value) > 2000:
            raise ConditionError(f"caption is {len(value)} characters; at most 2000", self.field)
        return value

    def columns(self, values, info, device="cpu"):
        return {"caption": ["" if v is None else str(v) for v in values]}  # "" is the null caption

    def from_batch(self, batch, info):
        captions = batch.get("caption")
        if captions is not None:
            return [str(c) for c in captions]
        labels, names = batch.get("label"), info.class_names
        if labels is not None and names:  # a dataset with class names but no captions
            return [names[int(i)] for i in labels]
        return [None] * len(batch["image"])

    def text(self, value, info):
        return None if value is None else str(value)


class SceneKind(ConditionKind):
    """A set of objects with named numeric fields (e.g. spheres), plus global
    fields, as the dataset's `scene` / `scene_globals` columns describe them."""
    name, field = "scene", "scene"
    description = "{objects: [{field: number, ...}, ...], globals: {field: number, ...}}"
    json_schema = {"type": "object", "required": ["objects"], "additionalProperties": False,
                   "properties": {"objects": {"type": "array", "items": {"type": "object",
                                                                         "additionalProperties": {"type": "number"}}},
                                  "globals": {"type": "object", "additionalProperties": {"type": "number"}}}}
    objects_column, globals_column = "scene", "scene_globals"

    def _fields(self, info, column):
        col = info.condition_columns.get(column)
        return list(col["fields"]) if col else []

    def parse(self, value, info):
        obj_fields = self._fields(info, self.objects_column)
        if not obj_fields:
            raise ConditionError("this model was not trained on scenes; leave 'scene' out", self.field)
        if isinstance(value, str):  # JSON text: how a table cell (an MLflow pyfunc input) carries a scene
            try:
                value = json.loads(value)
            except json.JSONDecodeError as err:
                raise ConditionError(f"scene is not valid JSON ({err})", self.field) from None
        if not isinstance(value, dict) or not isinstance(value.get("objects"), list):
            raise ConditionError(f"scene must be {self.description}", self.field)
        unknown = set(value) - {"objects", "globals"}
        if unknown:
            raise ConditionError(f"scene has unknown keys {sorted(unknown)}; it takes 'objects' and 'globals'",
                                 self.field)
        max_len = info.condition_columns[self.objects_column].get("max_len") or 0
        objects = value["objects"]
        if not objects or (max_len and len(objects) > max_len):
            raise ConditionError(f"scene.objects must hold 1..{max_len or 'any'} objects, got {len(objects)}",
                                 f"{self.field}.objects")
        obj_ranges = info.condition_columns[self.objects_column].get("ranges") or {}
        rows = [self._row(o, obj_fields, f"{self.field}.objects[{i}]", obj_ranges) for i, o in enumerate(objects)]
        glob_fields = self._fields(info, self.globals_column)
        glob_ranges = (info.condition_columns.get(self.globals_column) or {}).get("ranges") or {}
        globals_ = self._row(value.get("globals") or {}, glob_fields, f"{self.field}.globals",
                             glob_ranges) if glob_fields else []
        return (torch.tensor(rows, dtype=torch.float32), torch.tensor(globals_, dtype=torch.float32))

    @staticmethod
    def _row(obj, fields, where, ranges=None):
        """One object's numbers in field order; the field at fault is named (`scene.objects[1].radius`).
        `ranges` (field -> [low, high], from the dataset) are the values the model was trained on."""
        if not isinstance(obj, dict):
            raise ConditionError(f"{where} must be an object with fields {', '.join(fields)}", where)
        unknown = sorted(set(obj) - set(fields))
        missing = [f for f in fields if f not in obj]
        if unknown or missing:
            raise ConditionError(f"{where}: fields are {', '.join(fields)}"
                                 + (f"; unknown {unknown}" if unknown else "") + (f"; missing {missing}" if missing else ""),
                                 f"{where}.{(unknown or missing)[0]}")
        row = []
        for f in fields:
            v = obj[f]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConditionError(f"{where}.{f} must be a finite number, got {v!r}", f"{where}.{f}")
            if f in (ranges or {}):
                lo, hi = (float(b) for b in ranges[f])
                slack = 1e-6 * max(1.0, hi - lo)  # stored values are float32 roundings of the drawn ones
                if not lo - slack <= v <= hi + slack:
                    raise ConditionError(f"{where}.{f} is {v!r}, outside the trained range [{lo:g}, {hi:g}]",
                                         f"{where}.{f}")
            row.append(float(v))
        return row

    def example(self, info):
        """One object (and the globals) with every field at the middle of its trained range."""
        def middle(column):
            col = info.condition_columns.get(column) or {}
            ranges = col.get("ranges") or {}
            return {f: (sum(float(b) for b in ranges[f]) / 2 if f in ranges else 0.0) for f in col.get("fields", [])}
        if not self._fields(info, self.objects_column):
            return None
        value = {"objects": [middle(self.objects_column)]}
        if self._fields(info, self.globals_column):
            value["globals"] = middle(self.globals_column)
        return self.parse(value, info)

    def columns(self, values, info, device="cpu"):
        if any(v is None for v in values):
            raise ConditionError("every image needs a scene: this model renders scenes", self.field)
        width = len(self._fields(info, self.objects_column))
        max_len = max(v[0].shape[0] for v in values)
        scene = torch.zeros(len(values), max_len, width)
        mask = torch.zeros(len(values), max_len, dtype=torch.bool)
        for i, (rows, _) in enumerate(values):
            scene[i, :rows.shape[0]] = rows
            mask[i, :rows.shape[0]] = True
        out = {"scene": scene.to(device), "scene_mask": mask.to(device)}
        if self._fields(info, self.globals_column):
            out["scene_globals"] = torch.stack([g for _, g in values]).to(device)
        return out

    def from_batch(self, batch, info):
        scene, mask = batch["scene"], batch.get("scene_mask")
        globals_ = batch.get("scene_globals")
        out = []
        for i in range(len(scene)):
            rows = scene[i] if mask is None else scene[i][mask[i].bool()]
            out.append((rows.float().cpu(), globals_[i].float().cpu() if globals_ is not None else torch.zeros(0)))
        return out


class ImageKind(ConditionKind):
    """An input image (reconstruct, upscale, render from an image): a tensor
    [C, H, W] in [0, 1], or base64 PNG/JPEG bytes over HTTP."""
    name, field = "image", "image"
    description = "an image: base64-encoded PNG or JPEG"
    json_schema = {"type": "string", "contentEncoding": "base64", "minLength": 1}

    def parse(self, value, info):
        if isinstance(value, torch.Tensor):
            image = value.float()
        elif isinstance(value, (str, bytes)):
            image = decode_image(value, self.field)
        else:
            raise ConditionError("image must be a base64-encoded PNG or JPEG", self.field)
        if image.dim() != 3:
            raise ConditionError(f"image must be [C, H, W], got shape {tuple(image.shape)}", self.field)
        return _fit_image(image, info)

    def columns(self, values, info, device="cpu"):
        if any(v is None for v in values):
            raise ConditionError("every image needs an input image: this model works from images", self.field)
        return {"image": torch.stack(list(values)).to(device)}

    def from_batch(self, batch, info):
        return [img.float().cpu() for img in batch["image"]]

    def example(self, info):
        return torch.full((info.channels, info.height, info.width), 0.5)


def decode_image(value: str | bytes, field: str = "image") -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError
    try:
        raw = base64.b64decode(value, validate=True) if isinstance(value, str) else bytes(value)
    except (binascii.Error, ValueError):
        raise ConditionError("image is not valid base64", field) from None
    try:
        img = Image.open(io.BytesIO(raw))
        img.load()
    except (UnidentifiedImageError, OSError) as err:
        raise ConditionError(f"image could not be decoded as PNG or JPEG ({err})", field) from None
    if img.width * img.height > 4096 * 4096:
        raise ConditionError(f"image is {img.width}x{img.height}; at most 4096x4096", field)
    import numpy as np
    arr = np.asarray(img.convert("RGB" if img.mode not in ("L", "I;16") else "L"), dtype=np.float32) / 255.0
    t = torch.from_numpy(arr)
    return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1)


def _fit_image(image: torch.Tensor, info: "DataInfo") -> torch.Tensor:
    """Bring an input image to the model's channels and size."""
    import torch.nn.functional as F
    c = info.channels
    if image.shape[0] != c:
        image = image.mean(0, keepdim=True) if c == 1 else image[:1].expand(c, -1, -1) if image.shape[0] == 1 \
            else image[:c]
    if tuple(image.shape[-2:]) != (info.height, info.width):
        image = F.interpolate(image[None], size=(info.height, info.width), mode="bilinear", antialias=True,
                              align_corners=False)[0]
    return image.clamp(0, 1).contiguous()


CONDITION_KINDS: dict[str, ConditionKind] = {}


def register_condition_kind(kind: ConditionKind) -> ConditionKind:
    if kind.name in CONDITION_KINDS and type(CONDITION_KINDS[kind.name]) is not type(kind):
        raise ValueError(f"condition kind {kind.name!r} is registered twice")
    CONDITION_KINDS[kind.name] = kind
    return kind


for _kind in (NoneKind(), LabelKind(), CaptionKind(), SceneKind(), ImageKind()):
    register_condition_kind(_kind)


def get_kind(name: str) -> ConditionKind:
    if name not in CONDITION_KINDS:
        raise KeyError(f"unknown condition kind {name!r}; registered: {', '.join(sorted(CONDITION_KINDS))}")
    return CONDITION_KINDS[name]


def condition_fields() -> dict[str, ConditionKind]:
    """Request field -> kind, for every kind that has a field."""
    return {k.field: k for k in CONDITION_KINDS.values() if k.field}


# ---------------------------------------------------------------- a batch of conditions
@dataclass(frozen=True)
class Conditions:
    """One parsed condition value per image (None: unconditioned)."""
    kind: str
    values: tuple

    @property
    def n(self) -> int:
        return len(self.values)

    def __len__(self) -> int:
        return len(self.values)

    @classmethod
    def none(cls, n: int) -> "Conditions":
        return cls("none", (None,) * n)

    @classmethod
    def repeat(cls, kind: str, value: Any, n: int) -> "Conditions":
        return cls(kind, (value,) * n)

    @classmethod
    def parse(cls, kind: str, values: Iterable[Any], info: "DataInfo") -> "Conditions":
        """Raw values (one per image; None leaves that image unconditioned) checked against the model's data."""
        k = get_kind(kind)
        return cls(kind, tuple(None if v is None else k.parse(v, info) for v in values))

    @classmethod
    def from_batch(cls, kind: str, batch: dict[str, Any], info: "DataInfo") -> "Conditions":
        return cls(kind, tuple(get_kind(kind).from_batch(batch, info)))

    @classmethod
    def cat(cls, parts: Sequence["Conditions"]) -> "Conditions":
        kinds = {p.kind for p in parts}
        if len(kinds) != 1:
            raise ValueError(f"cannot batch conditions of different kinds: {sorted(kinds)}")
        return cls(parts[0].kind, tuple(v for p in parts for v in p.values))

    def __getitem__(self, index: slice) -> "Conditions":
        return Conditions(self.kind, self.values[index])

    def texts(self, info: "DataInfo") -> list[str] | None:
        """Each image's condition as text (a class name, a caption; "" where unconditioned), for
        grid captions and CLIP scores; None when the kind is not text-like (none, scene, image)."""
        kind = get_kind(self.kind)
        texts = [kind.text(v, info) for v in self.values]
        if all(t is None for t in texts):
            return None
        return ["" if t is None else t for t in texts]

    def columns(self, info: "DataInfo", device: torch.device | str = "cpu") -> dict[str, Any]:
        """The batch columns a data batch of this kind has ("label", "caption", "scene", ...)."""
        return get_kind(self.kind).columns(self.values, info, device)
