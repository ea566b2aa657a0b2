"""Procedural scenes of spheres (seed 002): the dataset of the scene-to-image
family, and the renderer that makes it.

Each record stores the image and its scene: `scene` holds one fixed-width
row per sphere (SPHERE_FIELDS) and `scene_globals` the light and background
(GLOBAL_FIELDS). `render_spheres` is a pure numpy function of those values,
so the stored parameters reproduce the stored image exactly.
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from raygen.data.errors import DataError
from raygen.data.images import as_size, to_channels_array, to_pil
from raygen.data.manifest import ExtraColumn
from raygen.data.registry import DatasetBuilder, PrepareRequest, SourcePlan, record_rng, register, split_counts
from raygen.data.shards import Record

SPHERE_FIELDS = ["x", "y", "z", "radius", "r", "g", "b", "diffuse", "specular", "shininess"]
GLOBAL_FIELDS = ["light_x", "light_y", "light_z", "ambient",
                 "bg_top_r", "bg_top_g", "bg_top_b", "bg_bottom_r", "bg_bottom_g", "bg_bottom_b"]
#: half-width of the image plane at distance 1 (pinhole camera at the origin looking along +z)
FOCAL_HALF_WIDTH = 0.5
SUPERSAMPLE = 2


@dataclass
class Scene:
    spheres: np.ndarray   # [N, len(SPHERE_FIELDS)]
    globals: np.ndarray   # [len(GLOBAL_FIELDS)]

    @classmethod
    def from_record(cls, row: Mapping[str, Any]) -> "Scene":
        """From a record's extra columns (`scene`, `scene_globals`)."""
        return cls(np.asarray(row["scene"], np.float32).reshape(-1, len(SPHERE_FIELDS)),
                   np.asarray(row["scene_globals"], np.float32).reshape(len(GLOBAL_FIELDS)))


def random_scene(rng: np.random.Generator, max_spheres: int = 4) -> Scene:
    n = int(rng.integers(1, max_spheres + 1))
    rows = []
    for _ in range(n):
        z = rng.uniform(3.0, 6.0)
        # keep centres inside the view: |x| <= 0.8 of the half-width at depth z
        x, y = rng.uniform(-0.8, 0.8, size=2) * FOCAL_HALF_WIDTH * z
        radius = rng.uniform(0.3, 0.9)
        r, g, b = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.5, 1.0), rng.uniform(0.6, 1.0))
        rows.append([x, y, z, radius, r, g, b, rng.uniform(0.5, 0.9), rng.uniform(0.1, 0.8), rng.uniform(8, 64)])
    light = np.array([rng.uniform(-1, 1), rng.uniform(0.3, 1.0), rng.uniform(-1.0, -0.2)])
    light /= np.linalg.norm(light)
    top, bottom = rng.uniform(0.0, 0.35, size=3), rng.uniform(0.0, 0.25, size=3)
    glob = np.concatenate([light, [rng.uniform(0.05, 0.2)], top, bottom])
    # Store float32: the image is rendered from exactly the values that get stored.
    return Scene(np.asarray(rows, np.float32), glob.astype(np.float32))


#: the range random_scene draws each field from (x, y: the widest, at z = 6); light is a unit vector
SPHERE_RANGES = {"x": [-2.4, 2.4], "y": [-2.4, 2.4], "z": [3.0, 6.0], "radius": [0.3, 0.9], "r": [0.0, 1.0],
                 "g": [0.0, 1.0], "b": [0.0, 1.0], "diffuse": [0.5, 0.9], "specular": [0.1, 0.8],
                 "shininess": [8.0, 64.0]}
GLOBAL_RANGES = {"light_x": [-1.0, 1.0], "light_y": [0.0, 1.0], "light_z": [-1.0, 0.0], "ambient": [0.05, 0.2],
                 **{f"bg_top_{c}": [0.0, 0.35] for c in "rgb"}, **{f"bg_bottom_{c}": [0.0, 0.25] for c in "rgb"}}


def scene_columns(max_spheres: int) -> dict[str, ExtraColumn]:
    """The extra columns a spheres dataset stores (fields and their ranges travel to the model's DataInfo)."""
    return {
        "scene": ExtraColumn(kind="sequence", width=len(SPHERE_FIELDS), max_len=max_spheres,
                             fields=SPHERE_FIELDS, description="one row per sphere, camera space",
                             ranges=SPHERE_RANGES),
        "scene_globals": ExtraColumn(kind="vector", width=len(GLOBAL_FIELDS), fields=GLOBAL_FIELDS,
                                     description="directional light, ambient, background gradient",
                                     ranges=GLOBAL_RANGES),
    }


def _plane_coords(n: int, side: int) -> np.ndarray:
    """Supersampled pixel centres along an axis of `n` pixels on the image
    plane, in units where the shorter image side (`side` pixels) spans -1..1."""
    R = n * SUPERSAMPLE
    c = (np.arange(R) + 0.5) / R * 2.0 - 1.0
    return c if n == side else c * (n / side)


def render_spheres(scene: Scene | Mapping[str, Any], resolution) -> np.ndarray:
    """Ray-trace a scene to an HxWx3 uint8 image (pure numpy, deterministic).

    Pinhole camera at the origin looking along +z; a directional light with
    Lambert diffuse, Blinn-Phong specular highlights and hard shadows; a
    vertical background gradient; 2x2 supersampling against jagged edges.
    `resolution` is one int or (height, width): the shorter side keeps the
    square image's field of view and the longer side sees more of the scene.
    """
    if not isinstance(scene, Scene):
        scene = Scene.from_record(scene)
    sph = scene.spheres.astype(np.float64)
    glob = scene.globals.astype(np.float64)
    height, width = as_size(resolution)
    side = min(height, width)
    u, v = np.meshgrid(_plane_coords(width, side), -_plane_coords(height, side))   # v points up
    d = np.stack([u * FOCAL_HALF_WIDTH, v * FOCAL_HALF_WIDTH, np.ones_like(u)], axis=-1)
    d /= np.linalg.norm(d, axis=-1, keepdims=True)

    centers, radii = sph[:, 0:3], sph[:, 3]
    # ray/sphere from the origin: t = d.c - sqrt((d.c)^2 - (|c|^2 - r^2))
    dc = np.einsum("hwk,nk->nhw", d, centers)
    disc = dc ** 2 - (np.sum(centers ** 2, axis=1) - radii ** 2)[:, None, None]
    t = np.where(disc > 0, dc - np.sqrt(np.maximum(disc, 0)), np.inf)
    t = np.where(t > 1e-6, t, np.inf)
    nearest = np.argmin(t, axis=0)
    t_hit = np.take_along_axis(t, nearest[None], 0)[0]
    hit = np.isfinite(t_hit)

    light = glob[0:3] / np.linalg.norm(glob[0:3])
    ambient = glob[3]
    # the gradient is a function of the ray's direction (part of the scene, like the spheres), so a taller
    # image continues it past the square's top and bottom (clipped to the colour range below)
    bg = glob[7:10][None, None] + (glob[4:7] - glob[7:10])[None, None] * ((v + 1) / 2)[..., None]
    img = bg.copy()
    if hit.any():
        dh, th, k = d[hit], t_hit[hit], nearest[hit]
        p = dh * th[:, None]
        normal = (p - centers[k]) / radii[k][:, None]
        p_off = p + 1e-4 * normal
        # shadow ray towards the light: blocked if it meets any sphere in front
        oc = centers[None] - p_off[:, None]                      # [M, N, 3]
        b = oc @ light
        disc_s = b ** 2 - (np.sum(oc ** 2, -1) - radii[None] ** 2)
        blocked = (disc_s > 0) & (b - np.sqrt(np.maximum(disc_s, 0)) > 1e-6)
        lit = ~blocked.any(axis=1)
        diff = np.maximum(normal @ light, 0.0) * lit
        half = light[None] - dh
        half /= np.linalg.norm(half, axis=1, keepdims=True)
        spec = np.maximum(np.sum(normal * half, 1), 0.0) ** sph[k, 9] * lit * (diff > 0)
        albedo = sph[k, 4:7]
        color = albedo * (ambient + sph[k, 7] * diff)[:, None] + (sph[k, 8] * spec)[:, None]
        img[hit] = color
    img = np.clip(img, 0.0, 1.0)
    img = img.reshape(height, SUPERSAMPLE, width, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.round(img * 255.0).astype(np.uint8)


@register
class Spheres(DatasetBuilder):
    name = "spheres"
    summary = "procedural spheres scenes (seed 002) with their scene parameters for scene-to-image"
    default_resolution = 32
    default_channels = 3
    default_count = 2000

    @dataclass(kw_only=True)
    class Options:
        max_spheres: int = 4

    def plan(self, req: PrepareRequest, opts) -> SourcePlan:
        if not 1 <= opts.max_spheres <= 32:
            raise DataError(f"spheres option max_spheres: {opts.max_spheres} must be between 1 and 32")
        res, ch = req.resolution, req.channels
        counts = split_counts(req.count, req.val_fraction)

        def records(split: str):
            for i in range(counts[split]):
                scene = random_scene(record_rng(req.seed, split, i), opts.max_spheres)
                img = render_spheres(scene, res)
                if ch == 1:
                    img = to_channels_array(to_pil(img), 1)
                yield Record(image=img, extras={"scene": scene.spheres, "scene_globals": scene.globals})

        return SourcePlan(resolution=res, channels=ch, splits=counts, records=records,
                          extra_columns=scene_columns(opts.max_spheres),
                          source="procedural: raygen spheres renderer (render_spheres)")
