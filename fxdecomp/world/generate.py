"""A procedurally generated world with known attributes: one object on a background.

Every image holds one object with independent, recorded attributes:

    shape      8: circle, ellipse, heart, crescent (round) | triangle, square, star, cross (angular)
    color      8: red, orange, yellow, green, blue, purple, white, black
    texture    4: plain, striped, dotted, checkered (the pattern mixes the color with a contrast
               tone; "plain" pixels are exactly the object's color)
    background 4: grass, sand (land) | water, sky (water), each with its own colors and texture
    x, y       the object's centre in pixels, uniform over the positions that keep the object
               inside the image; size its radius in pixels, uniform in RADIUS_RANGE x image size
               (0.18-0.32: objects sit anywhere, not only near the centre); every shape lies
               within 1.05 x size of the centre (the triangle's base is the widest)

Images are uint8 ``[N, S, S, 3]`` and object masks bool ``[N, S, S]``; everything is a
deterministic function of (split, seed, n, size): image i of a split depends only on
(seed, split, i // CHUNK), so the first n images of a larger set are the same images.

Splits:
- ``train`` / ``test``: all attributes independent and uniform (different random streams).
- ``spurious-train``: the binary label ``angular`` (shape in ANGULAR) and the background group
  (LAND_BACKGROUNDS = grass, sand vs WATER_BACKGROUNDS = water, sky) agree in 95% of the images:
  round objects on water backgrounds, angular objects on land backgrounds (as in Waterbirds).
- ``balanced-test``: label and background group independent; the four (label x group) groups
  hold exactly n // 4 images each (the remainder spread over the first groups).

>>> w = generate(16, seed=0, split="test")
>>> w.images.shape, w.masks.shape, w.records[0]["caption"][:2]
((16, 64, 64, 3), (16, 64, 64), 'a ')
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
import numpy as np

from fxdecomp.errors import InputError

__all__ = ["SHAPES", "ROUND", "ANGULAR", "COLORS", "COLOR_RGB", "TEXTURES", "BACKGROUNDS",
           "LAND_BACKGROUNDS", "WATER_BACKGROUNDS", "ATTRIBUTES", "SPLITS", "SPURIOUS_AGREEMENT", "RADIUS_RANGE",
           "World", "generate", "caption", "write_world", "read_labels"]

ROUND = ("circle", "ellipse", "heart", "crescent")
ANGULAR = ("triangle", "square", "star", "cross")
SHAPES = ROUND + ANGULAR
COLOR_RGB: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.08, 0.08), "orange": (1.0, 0.55, 0.0), "yellow": (0.98, 0.92, 0.1),
    "green": (0.1, 0.75, 0.2), "blue": (0.1, 0.25, 0.95), "purple": (0.6, 0.15, 0.8),
    "white": (0.97, 0.97, 0.97), "black": (0.05, 0.05, 0.05),
}
COLORS = tuple(COLOR_RGB)
TEXTURES = ("plain", "striped", "dotted", "checkered")
LAND_BACKGROUNDS = ("grass", "sand")
WATER_BACKGROUNDS = ("water", "sky")
BACKGROUNDS = LAND_BACKGROUNDS + WATER_BACKGROUNDS
#: attribute name -> its values (the categorical attributes, in caption order)
ATTRIBUTES: dict[str, tuple[str, ...]] = {"color": COLORS, "texture": TEXTURES, "shape": SHAPES,
                                          "background": BACKGROUNDS}
SPLITS = ("train", "test", "spurious-train", "balanced-test")
SPURIOUS_AGREEMENT = 0.95
#: the object's radius as a fraction of the image size (uniform in this range); its centre is
#: uniform over the positions that keep the whole object inside the image
RADIUS_RANGE = (0.18, 0.32)
_CHUNK = 512
_SPLIT_STREAM = {s: i + 1 for i, s in enumerate(SPLITS)}


@dataclass
class World:
    """Images ``[N, S, S, 3]`` uint8, object masks ``[N, S, S]`` bool and one label record per
    image (dict with shape, color, texture, background, x, y, size, angular, caption)."""
    images: np.ndarray
    masks: np.ndarray
    records: list[dict] = field(default_factory=list)
    split: str = "train"
    seed: int = 0

    def __len__(self) -> int:
        return len(self.records)

    def labels(self, attribute: str) -> list:
        """The attribute's value for every image (e.g. ``labels("color")``)."""
        return [r[attribute] for r in self.records]

    def codes(self, attribute: str) -> np.ndarray:
        """Integer codes [N] of a categorical attribute (index into ``ATTRIBUTES[attribute]``);
        ``angular`` gives 0/1."""
        if attribute == "angular":
            return np.array([int(r["angular"]) for r in self.records])
        values = ATTRIBUTES[attribute]
        return np.array([values.index(r[attribute]) for r in self.records])

    def tensor(self, mean: float = 0.5, std: float = 0.5):
        """Images as a float tensor [N, 3, S, S], (x / 255 - mean) / std (the world models'
        normalisation)."""
        import torch
        x = torch.from_numpy(self.images).permute(0, 3, 1, 2).float() / 255.0
        return (x - mean) / std


def caption(color: str, texture: str, shape: str, background: str) -> str:
    """'a red striped triangle on a grass background' ('an orange ...')."""
    article = "an" if color[0] in "aeiou" else "a"
    return f"{article} {color} {texture} {shape} on a {background} background"


# ---------------------------------------------------------------------------- attributes
def _sample_attributes(rng: np.random.Generator, n: int, split: str,
                       start: int) -> dict[str, np.ndarray]:
    color = rng.integers(0, len(COLORS), n)
    texture = rng.integers(0, len(TEXTURES), n)
    if split in ("train", "test"):
        shape = rng.integers(0, len(SHAPES), n)
        background = rng.integers(0, len(BACKGROUNDS), n)
    else:
        if split == "spurious-train":
            angular = rng.random(n) < 0.5
            agree = rng.random(n) < SPURIOUS_AGREEMENT
            land = np.where(agree, angular, ~angular)
        else:                                         # balanced-test: exact group sizes
            group = (np.arange(start, start + n) % 4)
            angular, land = group // 2 == 1, group % 2 == 1
        shape = np.where(angular, len(ROUND), 0) + rng.integers(0, len(ROUND), n)
        within = rng.integers(0, 2, n)
        background = np.where(land, within, len(LAND_BACKGROUNDS) + within)
    return {"color": color, "texture": texture, "shape": shape, "background": background}


# ---------------------------------------------------------------------------- rendering
def _shape_masks(shape: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-tests on coordinates in units of the radius (u right, v down) -> bool [B, S, S]."""
    out = np.zeros(u.shape, bool)
    tests = {
        "circle": lambda u, v: u * u + v * v <= 1.0,
        "ellipse": lambda u, v: u * u + (v / 0.55) ** 2 <= 1.0,
        "heart": _heart,
        "crescent": lambda u, v: (u * u + v * v <= 1.0)
        & ((u - 0.55) ** 2 + (v + 0.1) ** 2 > 0.8 ** 2),
        "triangle": lambda u, v: (v <= 0.8) & (np.abs(u) <= (v + 1.0) / 1.8 * 1.05),
        "square": lambda u, v: (np.abs(u) <= 0.8) & (np.abs(v) <= 0.8),
        "star": _star,
        "cross": lambda u, v: ((np.abs(u) <= 0.32) & (np.abs(v) <= 0.95))
        | ((np.abs(v) <= 0.32) & (np.abs(u) <= 0.95)),
    }
    for k, name in enumerate(SHAPES):
        sel = shape == k
        if sel.any():
            out[sel] = tests[name](u[sel], v[sel])
    return out


def _heart(u, v):
    x, y = u * 1.15, -(v * 1.15) + 0.25
    return (x * x + y * y - 1.0) ** 3 - x * x * y ** 3 <= 0.0


def _star(u, v):
    theta = np.arctan2(v, u) + np.pi / 2
    period = 2 * np.pi / 5
    t = np.abs(((theta % period) / period) - 0.5) * 2          # 1 at a point, 0 between
    radius = 0.42 + 0.58 * t ** 1.5
    return np.sqrt(u * u + v * v) <= radius


def _texture_masks(texture: np.ndarray, xx: np.ndarray, yy: np.ndarray,
                   phase: np.ndarray) -> np.ndarray:
    """Pattern pixels (bool [B, S, S]) in image coordinates; plain has none."""
    px, py = xx + phase[:, None, None, 0], yy + phase[:, None, None, 1]
    striped = ((px + py) // 4) % 2 == 0
    dx, dy = (px % 8) - 3.5, (py % 8) - 3.5
    dotted = dx * dx + dy * dy <= 2.6 ** 2
    checkered = ((px // 5) + (py // 5)) % 2 == 0
    t = texture[:, None, None]
    return ((t == 1) & striped) | ((t == 2) & dotted) | ((t == 3) & checkered)


def _smooth_noise(rng, b: int, size: int, cells: int) -> np.ndarray:
    """Value noise [B, S, S] in [0, 1]: a random grid of ``cells`` x ``cells`` bilinearly
    upsampled."""
    grid = rng.random((b, cells + 1, cells + 1), dtype=np.float32)
    t = np.linspace(0, cells, size, dtype=np.float32)
    i0 = np.minimum(t.astype(int), cells - 1)
    f = t - i0
    rows = grid[:, i0] * (1 - f)[None, :, None] + grid[:, i0 + 1] * f[None, :, None]
    return rows[:, :, i0] * (1 - f)[None, None, :] + rows[:, :, i0 + 1] * f[None, None, :]


def _backgrounds(rng, background: np.ndarray, size: int, xx, yy, draws: int) -> np.ndarray:
    b = len(background)
    out = np.empty((b, size, size, 3), np.float32)
    # draws are made for a whole chunk (``draws`` images) so that image i never depends on n
    fine = rng.standard_normal((draws, size, size), dtype=np.float32)[:b]
    smooth = _smooth_noise(rng, draws, size, 6)[:b]
    phase = rng.uniform(0, 2 * np.pi, (draws, 1, 1)).astype(np.float32)[:b]
    for k, name in enumerate(BACKGROUNDS):
        sel = background == k
        if not sel.any():
            continue
        f, s, ph = fine[sel], smooth[sel], phase[sel]
        if name == "grass":          # dark green with vertical blade streaks
            blades = 0.5 + 0.5 * np.sin(xx[None] * 2.3 + ph + 3 * s)
            lum = 0.75 + 0.35 * blades + 0.12 * f
            base = np.array([0.22, 0.5, 0.12], np.float32)
        elif name == "sand":         # pale tan, fine grain and soft dunes
            lum = 0.9 + 0.12 * s + 0.07 * f
            base = np.array([0.88, 0.78, 0.55], np.float32)
        elif name == "water":        # deep blue, horizontal waves
            waves = 0.5 + 0.5 * np.sin(yy[None] * 1.1 + 2.5 * np.sin(xx[None] * 0.25 + ph))
            lum = 0.7 + 0.45 * waves + 0.04 * f
            base = np.array([0.05, 0.28, 0.55], np.float32)
        else:                        # sky: light blue gradient with white clouds
            grad = 1.0 - 0.35 * (yy[None] / size)
            clouds = np.clip((s - 0.55) * 4, 0, 1)
            sky = np.array([0.45, 0.68, 0.95], np.float32) * grad[..., None]
            out[sel] = sky * (1 - clouds[..., None]) + 0.97 * clouds[..., None]
            continue
        out[sel] = base * lum[..., None]
    return out


def _render_chunk(seed: int, split: str, chunk: int, n: int, size: int):
    rng = np.random.default_rng([seed, _SPLIT_STREAM[split], chunk])
    start = chunk * _CHUNK
    # every draw is made for the whole chunk and then cut to n: image i never depends on n
    attrs = {k: v[:n] for k, v in _sample_attributes(rng, _CHUNK, split, start).items()}
    radius = rng.uniform(*RADIUS_RANGE, _CHUNK) * size
    cx = rng.uniform(radius + 1, size - radius - 1)[:n]
    cy = rng.uniform(radius + 1, size - radius - 1)[:n]
    radius = radius[:n]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    u = (xx[None] - cx[:, None, None]) / radius[:, None, None]
    v = (yy[None] - cy[:, None, None]) / radius[:, None, None]
    mask = _shape_masks(attrs["shape"], u, v)
    img = _backgrounds(rng, attrs["background"], size, xx, yy, _CHUNK)
    rgb = np.array([COLOR_RGB[c] for c in COLORS], np.float32)[attrs["color"]]      # [n, 3]
    lum = rgb @ np.array([0.3, 0.59, 0.11], np.float32)
    contrast = np.where(lum[:, None] > 0.45, 0.0, 1.0).astype(np.float32)           # [n, 1]
    pattern_rgb = 0.45 * rgb + 0.55 * contrast
    phase = rng.integers(0, 8, (_CHUNK, 2)).astype(np.float32)[:n]
    pattern = _texture_masks(attrs["texture"], xx[None], yy[None], phase) & mask
    obj = np.where(pattern[..., None], pattern_rgb[:, None, None], rgb[:, None, None])
    img = np.where(mask[..., None], obj, img)
    images = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
    records = []
    for i in range(n):
        s, c = SHAPES[attrs["shape"][i]], COLORS[attrs["color"][i]]
        t, b = TEXTURES[attrs["texture"][i]], BACKGROUNDS[attrs["background"][i]]
        records.append({"shape": s, "color": c, "texture": t, "background": b,
                        "x": round(float(cx[i]), 2), "y": round(float(cy[i]), 2),
                        "size": round(float(radius[i]), 2), "angular": s in ANGULAR,
                        "caption": caption(c, t, s, b)})
    return images, mask, records


def generate(n: int, seed: int = 0, split: str = "train", size: int = 64,
             workers: int = 1, progress: bool = False) -> World:
    """n images of ``split`` (see the module docstring), deterministic in (seed, split, size).

    workers > 1 renders chunks of 512 images in that many processes (same result)."""
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; choose one of {SPLITS}")
    if n < 1:
        raise InputError(f"n must be >= 1, got {n}")
    if size < 16:
        raise InputError(f"size must be >= 16 pixels, got {size}")
    jobs = [(seed, split, c, min(_CHUNK, n - c * _CHUNK), size)
            for c in range((n + _CHUNK - 1) // _CHUNK)]
    if workers > 1 and len(jobs) > 1:
        from multiprocessing import get_context
        with get_context("spawn").Pool(workers) as pool:
            parts = pool.starmap(_render_chunk, jobs)
    else:
        parts = []
        it = jobs
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(jobs, desc=f"world {split}", unit="chunk", leave=False)
        for job in it:
            parts.append(_render_chunk(*job))
    images = np.concatenate([p[0] for p in parts])
    masks = np.concatenate([p[1] for p in parts])
    records = [r for p in parts for r in p[2]]
    return World(images, masks, records, split, seed)


# ---------------------------------------------------------------------------- files
LABEL_COLUMNS = ("file", "shape", "color", "texture", "background", "x", "y", "size", "angular",
                 "mask_file", "caption")


def write_world(world: World, out: str | Path, progress: bool = True) -> Path:
    """Write ``images/NNNNNN.png``, ``masks/NNNNNN.png`` and ``labels.csv`` under ``out``;
    returns the labels.csv path."""
    from PIL import Image
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    width = max(6, len(str(len(world) - 1)))
    it = range(len(world))
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="writing PNGs", unit="img")
    rows = []
    for i in it:
        name = f"{i:0{width}d}.png"
        Image.fromarray(world.images[i], "RGB").save(out / "images" / name, compress_level=1)
        Image.fromarray(world.masks[i].astype(np.uint8) * 255, "L").save(
            out / "masks" / name, compress_level=1)
        rows.append({"file": f"images/{name}", "mask_file": f"masks/{name}",
                     **{k: world.records[i][k] for k in LABEL_COLUMNS
                        if k not in ("file", "mask_file")}})
    path = out / "labels.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LABEL_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_labels(path: str | Path) -> list[dict]:
    """The rows of a ``labels.csv`` written by ``write_world`` (x, y, size as floats)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("x", "y", "size"):
            r[k] = float(r[k])
        r["angular"] = r["angular"] == "True"
    return rows

