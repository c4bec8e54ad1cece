"""The embedded default dataset: generated scenes with a known ideal translation.

A scene is a label map of regions (bands, blobs, polygons, discs; several instances per class) and a
per-image palette giving every class a colour pair and a texture. `render(label_map, palette)` is a
pure function, so the ideal output for input A with exemplar B is `render(label_A, palette_B)`:
translation quality on this source is measurable exactly.
"""
from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

from pipeline.data.errors import DataError
from pipeline.data.maps import as_edge_map, canny_edges, distance_map, label_boundaries
from pipeline.data.sources.base import Example, ItemRef, Source

TEXTURE_KINDS = ("flat", "stripes", "checker", "dots", "gradient", "noise")  # the default draw
ALL_TEXTURES = (*TEXTURE_KINDS, "grain")  # grain: fine two-octave noise, every pixel identifiable
REGION_KINDS = ("band", "blob", "polygon", "disc")
# Edge task inputs: "regions" draws only the region boundaries (a pixel inside a region is placed by its distance to
# them alone); "photo" takes Canny edges of the rendered photo, as the CelebA-HQ edge task does, so the texture's
# own geometry is in the input and every textured pixel's match is determined by the input, not only identifiable
# in the exemplar. "classes" adds what edges cannot say, which class a region is, in the manner of CoCosNet v1's
# CelebA-HQ input: [region boundaries and Canny edges of the photo, one distance map per class (to that class's
# boundaries: where in a region a pixel lies), one mask per class (a distance map alone does not say on which side
# of the boundary the pixel is)]; data.label_nc is then 1 + 2 x the number of classes.
EDGE_KINDS = ("regions", "photo", "classes")
# Which draw fixes a class's texture: "image" draws kind and geometry anew in every image, so another image's
# regions cannot be told apart by their look and only its colours carry over; "class" gives each class one texture
# kind and geometry in every image (as grass or brick keep theirs in photos), with per-image colours and pattern
# instances, so the class of an exemplar's region is recognisable and cross-image (semantic) correspondence is
# well-posed.
TEXTURES_BY = ("image", "class")
Palette = list[dict[str, Any]]  # one entry per class id: {"color", "color2", "texture": {"kind", ...}}


# ---------------------------------------------------------------- palette and textures


def random_texture(rng: np.random.Generator, kinds: tuple[str, ...] = TEXTURE_KINDS) -> dict[str, Any]:
    """A texture kind drawn from `kinds` and its parameters; lengths are fractions of the image's shorter side."""
    kind = kinds[int(rng.integers(len(kinds)))]
    texture: dict[str, Any] = {"kind": kind}
    if kind in ("stripes", "checker", "dots"):
        texture["period"] = round(float(rng.uniform(0.06, 0.2)), 4)
        texture["angle"] = round(float(rng.uniform(0, math.pi)), 4)
    if kind == "dots":
        texture["radius"] = round(float(rng.uniform(0.2, 0.4)), 4)  # fraction of the period
    if kind == "gradient":
        texture["angle"] = round(float(rng.uniform(0, 2 * math.pi)), 4)
    if kind == "noise":
        texture["cells"] = int(rng.integers(3, 10))
        texture["seed"] = int(rng.integers(2**31))
    if kind == "grain":
        texture["cell_px"] = round(float(rng.uniform(2.5, 4.0)), 3)  # in pixels: identifiable at any image size
        texture["seed"] = int(rng.integers(2**31))
    return texture


def random_palette(rng: np.random.Generator, num_classes: int, kinds: tuple[str, ...] = TEXTURE_KINDS,
                   class_textures: list[dict[str, Any]] | None = None) -> Palette:
    """Per-image appearance of every class: two colours mixed by a texture pattern.

    class_textures: one texture per class kept in every image (see TEXTURES_BY); their pattern seeds are redrawn.
    """
    palette = []
    for class_id in range(num_classes):
        color = rng.integers(0, 256, 3)
        color2 = np.clip(color + rng.integers(-110, 111, 3), 0, 255)
        if class_textures is None:
            texture = random_texture(rng, kinds)
        else:
            texture = dict(class_textures[class_id])
            if "seed" in texture:  # the same statistics, another instance of the pattern
                texture["seed"] = int(rng.integers(2**31))
        if texture["kind"] == "grain":  # fine grain needs contrast in brightness: a much darker or lighter shade
            color2 = np.rint(color * 0.25 if color.mean() > 127 else color + (255 - color) * 0.75)
        palette.append({"color": [int(c) for c in color], "color2": [int(c) for c in color2], "texture": texture})
    return palette


def texture_pattern(texture: dict[str, Any], ys: np.ndarray, xs: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Mixing weight in [0, 1] of color2 at pixels (ys, xs) of an image of `shape` (H, W). -> (N,) float32."""
    side = float(min(shape))
    kind = texture["kind"]
    if kind == "flat":
        return np.zeros(ys.shape, np.float32)
    if kind == "noise":
        grid = np.random.default_rng(texture["seed"]).random((texture["cells"], texture["cells"]), dtype=np.float32)
        field = cv2.resize(grid, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)
        return np.clip(field[ys, xs], 0.0, 1.0)
    if kind == "grain":  # value noise with cells of cell_px pixels plus one at twice that, equally weighted
        rng = np.random.default_rng(texture["seed"])
        field = np.zeros(shape, np.float32)
        for scale in (1, 2):
            cells = [max(2, math.ceil(n / (texture["cell_px"] * scale))) for n in shape]
            grid = rng.random(cells, dtype=np.float32)
            field += cv2.resize(grid, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC) / 2
        return np.clip(field[ys, xs], 0.0, 1.0)
    angle = texture["angle"]
    along = (xs * math.cos(angle) + ys * math.sin(angle)).astype(np.float32)
    if kind == "gradient":
        return np.clip(0.5 + along / (1.5 * side), 0.0, 1.0)  # along spans about +-side
    period = texture["period"] * side
    across = (-xs * math.sin(angle) + ys * math.cos(angle)).astype(np.float32)
    if kind == "stripes":
        return 0.5 + 0.5 * np.sin(2 * math.pi * along / period)
    if kind == "checker":
        return ((np.floor(along / period) + np.floor(across / period)) % 2).astype(np.float32)
    if kind == "dots":
        du = (along / period) % 1.0 - 0.5
        dv = (across / period) % 1.0 - 0.5
        return (np.sqrt(du * du + dv * dv) < texture["radius"]).astype(np.float32)
    raise ValueError(f"unknown texture kind {kind!r}")


def render(label_map: np.ndarray, palette: Palette) -> np.ndarray:
    """Draw the photo of a scene. label_map (H, W) ints < len(palette) -> (H, W, 3) uint8 RGB.

    Pure and deterministic: textures are anchored to image coordinates, not to regions, so the same
    palette renders any label map consistently.
    """
    if label_map.ndim != 2:
        raise ValueError(f"label_map must be (H, W), got {label_map.shape}")
    if label_map.size and int(label_map.max()) >= len(palette):
        raise ValueError(f"label id {int(label_map.max())} has no palette entry (palette has {len(palette)})")
    photo = np.zeros((*label_map.shape, 3), np.float32)
    for class_id in np.unique(label_map):
        ys, xs = np.nonzero(label_map == class_id)
        entry = palette[int(class_id)]
        weight = texture_pattern(entry["texture"], ys, xs, label_map.shape)[:, None]
        photo[ys, xs] = (1 - weight) * np.float32(entry["color"]) + weight * np.float32(entry["color2"])
    return np.clip(np.rint(photo), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- layout


def _band(rng, h, w):
    """A wavy horizontal strip across the whole image (ground, water, a road)."""
    centre, thickness = rng.uniform(0.15, 0.85) * h, rng.uniform(0.1, 0.3) * h
    amplitude, wavelength, phase = rng.uniform(0, 0.08) * h, rng.uniform(0.5, 1.5) * w, rng.uniform(0, 2 * math.pi)
    xs = np.linspace(-1, w, 32)
    wave = centre + amplitude * np.sin(2 * math.pi * xs / wavelength + phase)
    top = np.stack([xs, wave - thickness / 2], 1)
    bottom = np.stack([xs[::-1], (wave + thickness / 2)[::-1]], 1)
    return np.concatenate([top, bottom])


def _blob(rng, h, w):
    """A smooth star-shaped outline: a circle whose radius wobbles with a few harmonics."""
    side = min(h, w)
    cy, cx, radius = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.1, 0.28) * side
    theta = np.linspace(0, 2 * math.pi, 64, endpoint=False)
    r = np.ones_like(theta)
    for k in (2, 3, 4):
        r += rng.uniform(0, 0.18) * np.sin(k * theta + rng.uniform(0, 2 * math.pi))
    return np.stack([cx + radius * r * np.cos(theta), cy + radius * r * np.sin(theta)], 1)


def _polygon(rng, h, w):
    """3-7 vertices at sorted random angles around a centre: a simple (non-crossing) polygon."""
    side = min(h, w)
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    n = int(rng.integers(3, 8))
    theta = np.sort(rng.uniform(0, 2 * math.pi, n))
    r = rng.uniform(0.08, 0.3, n) * side
    return np.stack([cx + r * np.cos(theta), cy + r * np.sin(theta)], 1)


def random_layout(rng: np.random.Generator, size: tuple[int, int], num_classes: int,
                  min_regions: int, max_regions: int) -> np.ndarray:
    """A scene's label map (H, W) uint8: background 0 with regions of classes 1..num_classes-1 drawn on top."""
    h, w = size
    labels = np.zeros(size, np.uint8)
    chosen = rng.choice(np.arange(1, num_classes), size=min(num_classes - 1, int(rng.integers(3, 7))), replace=False)
    num_regions = int(rng.integers(min_regions, max_regions + 1))
    kinds = ["band"] * int(rng.integers(0, 3))  # bands first: they are the scene's large layers
    kinds += [REGION_KINDS[int(rng.integers(1, len(REGION_KINDS)))] for _ in range(max(0, num_regions - len(kinds)))]
    for kind in kinds:
        class_id = int(rng.choice(chosen))  # repeats give several instances of a class
        if kind == "disc":
            centre = (int(rng.uniform(0, w) * 16), int(rng.uniform(0, h) * 16))
            radius = int(rng.uniform(0.06, 0.2) * min(h, w) * 16)
            cv2.circle(labels, centre, radius, class_id, thickness=-1, lineType=cv2.LINE_8, shift=4)
            continue
        outline = {"band": _band, "blob": _blob, "polygon": _polygon}[kind](rng, h, w)
        points = np.rint(outline * 16).astype(np.int32)[None]  # shift=4: sub-pixel vertices
        cv2.fillPoly(labels, points, class_id, lineType=cv2.LINE_8, shift=4)
    return labels


# ---------------------------------------------------------------- source


class SyntheticSource(Source):
    """Generated scenes, deterministic from (seed, index). Tasks: mask -> image, edge -> image."""

    name = "synthetic"
    tasks = ("mask", "edge")

    def __init__(self, *, root=None, task: str = "mask", image_size=(64, 64), label_nc: int = 12, seed: int = 0,
                 num_images: int = 320, min_regions: int = 4, max_regions: int = 9, num_classes: int | None = None,
                 textures: list[str] | tuple[str, ...] = TEXTURE_KINDS, edges: str = "regions",
                 textures_by: str = "image"):
        super().__init__(root=None, task=task, image_size=image_size, label_nc=label_nc, seed=seed)
        self.num_classes = num_classes if num_classes is not None else (label_nc if task == "mask" else 12)
        if self.num_classes < 9:
            raise DataError(f"synthetic source needs at least 8 classes plus background (num_classes >= 9), "
                            f"got {self.num_classes}")
        if self.num_classes > 256:
            raise DataError(f"synthetic source supports at most 256 classes, got {self.num_classes}")
        if task == "mask" and label_nc != self.num_classes:
            raise DataError(f"synthetic mask task: data.label_nc ({label_nc}) must equal the number of classes "
                            f"({self.num_classes}, background included)")
        if textures_by not in TEXTURES_BY:
            raise DataError(f"synthetic: textures_by must be one of {list(TEXTURES_BY)}, got {textures_by!r}")
        if edges not in EDGE_KINDS:
            raise DataError(f"synthetic: edges must be one of {list(EDGE_KINDS)}, got {edges!r}")
        if task == "edge":
            if edges == "classes":
                self.check_label_nc(1 + 2 * self.num_classes, "edges, a distance map and a mask per class")
                self.map_fill = (0,) + (255,) * self.num_classes + (0,) * self.num_classes  # distances: far
            else:
                self.check_label_nc(1, "an edge map")
            self.input_encoding = "channels"
        if not 1 <= min_regions <= max_regions:
            raise DataError(f"synthetic: need 1 <= min_regions <= max_regions, got {min_regions}, {max_regions}")
        if num_images < 2:
            raise DataError(f"synthetic: num_images must be >= 2 (exemplars are other images), got {num_images}")
        unknown = sorted(set(textures) - set(ALL_TEXTURES))
        if unknown or not textures:
            raise DataError(f"synthetic: textures must be a non-empty list of {list(ALL_TEXTURES)}, got {list(textures)}")
        self.num_images, self.min_regions, self.max_regions = num_images, min_regions, max_regions
        self.textures, self.edges, self.textures_by = tuple(textures), edges, textures_by
        self.class_textures = None
        if textures_by == "class":
            rng = np.random.default_rng([seed, 2**32 - 1])  # apart from every image's [seed, index] stream
            self.class_textures = [random_texture(rng, self.textures) for _ in range(self.num_classes)]

    @property
    def class_channels(self) -> tuple[int, int] | None:
        if self.task == "edge" and self.edges == "classes":  # [edges, a distance map per class, a mask per class]
            return 1 + self.num_classes, 1 + 2 * self.num_classes
        return super().class_channels

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "num_images": self.num_images, "min_regions": self.min_regions,
                "max_regions": self.max_regions, "num_classes": self.num_classes, "textures": list(self.textures),
                **({"edges": self.edges} if self.task == "edge" else {}),
                **({"textures_by": self.textures_by} if self.textures_by != "image" else {})}

    def items(self) -> list[ItemRef]:
        return [ItemRef(name=f"{i:06d}", path=f"synthetic:{i}", files={"index": i}) for i in range(self.num_images)]

    def scene(self, index: int) -> tuple[np.ndarray, Palette]:
        """(label map (H, W) uint8, palette) of image `index`."""
        rng = np.random.default_rng([self.seed, index])
        labels = random_layout(rng, self.image_size, self.num_classes, self.min_regions, self.max_regions)
        return labels, random_palette(rng, self.num_classes, self.textures, self.class_textures)

    def load(self, item: ItemRef) -> Example:
        labels, palette = self.scene(item.files["index"])
        photo = render(labels, palette)
        if self.task == "mask":
            input_map = labels
        elif self.edges == "classes":
            classes = range(self.num_classes)
            distances = [distance_map(label_boundaries(labels == c)) for c in classes]
            masks = [as_edge_map(labels == c) for c in classes]
            input_map = np.stack([as_edge_map(label_boundaries(labels) | canny_edges(photo)), *distances, *masks])
        else:
            edges = label_boundaries(labels) if self.edges == "regions" else canny_edges(photo)
            input_map = as_edge_map(edges)[None]
        return Example(photo=photo, input_map=input_map, meta={"palette": palette})
