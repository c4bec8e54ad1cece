"""The painted input map: class names and colours, map <-> canvas image, bucket fill, edges of a photo.

A map on the canvas is (H, W) class ids at the model's size; the canvas shows it `scale` times larger with one
colour per class, and strokes are painted with exactly those colours. Edge models have two classes, "no edge"
(black) and "edge" (white), and their map is the grey edge image the model reads.
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.data.imageio import fit
from pipeline.data.maps import as_edge_map, canny_edges

# ADE20K scene parsing (SceneParse150): id k >= 1 is ADE20K_NAMES[k - 1]; 0 is unlabelled.
ADE20K_NAMES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)
# What class 0 is in each source's label maps.
ZERO_CLASS = {"ade20k": "unlabelled", "synthetic": "background"}
MAX_CLASSES = 256  # distinct_colours keeps this many colours apart


@dataclass(frozen=True)
class Classes:
    """What can be painted: names[k] and colours[k] (uint8 RGB) of class k. edge: the two-class edge palette."""

    names: tuple[str, ...]
    colours: np.ndarray
    edge: bool = False

    def __len__(self) -> int:
        return len(self.names)

    @property
    def hex(self) -> list[str]:
        return ["#%02x%02x%02x" % tuple(int(v) for v in c) for c in self.colours]

    def label(self, k: int) -> str:
        return f"{k} {self.names[k]}"


def distinct_colours(n: int) -> np.ndarray:
    """(n, 3) uint8 colours, all different for n <= MAX_CLASSES: class 0 black, then hues spaced by the golden
    angle at three saturation / brightness levels, so neighbouring ids look different."""
    colours = [(0, 0, 0)]
    for k in range(1, n):
        hue = (k * 0.618033988749895) % 1.0
        saturation, value = ((0.85, 0.95), (0.55, 0.8), (1.0, 0.6))[k % 3]
        colours.append(tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue, saturation, value)))
    return np.array(colours, np.uint8)


def classes_for(label_nc: int, task: str, source: str | None = None) -> Classes:
    """The paintable classes of a model: edges for 1-channel edge models, else label_nc named classes."""
    if task == "edge":
        return Classes(("no edge", "edge"), np.array([[0, 0, 0], [255, 255, 255]], np.uint8), edge=True)
    if label_nc > MAX_CLASSES:
        raise ValueError(f"the painter offers at most {MAX_CLASSES} classes, the model has {label_nc}")
    names = [f"class {k}" for k in range(label_nc)]
    if source in ZERO_CLASS:
        names[0] = ZERO_CLASS[source]
    if source == "ade20k":
        names[1 : 1 + len(ADE20K_NAMES)] = ADE20K_NAMES[: label_nc - 1]
    return Classes(tuple(names), distinct_colours(label_nc))


# ---------------------------------------------------------------- map <-> canvas


def canvas_scale(size: tuple[int, int], target: int = 512) -> int:
    """Integer upscaling that makes the canvas about `target` pixels on its longer side (at least 1)."""
    return max(1, round(target / max(size)))


def render(ids: np.ndarray, classes: Classes, scale: int = 1) -> np.ndarray:
    """(H, W) class ids -> (H*scale, W*scale, 3) uint8 RGB, one colour per class (nearest upscaling)."""
    rgb = classes.colours[np.clip(ids, 0, len(classes) - 1)]
    return np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1) if scale > 1 else rgb


def decode(canvas: np.ndarray | None, classes: Classes, size: tuple[int, int]) -> np.ndarray:
    """A painted canvas (h, w, 3) RGB or (h, w, 4) RGBA -> (H, W) class ids at `size`.

    Every pixel takes the class of the nearest class colour (strokes use the exact colours; anything else,
    e.g. a resampled upload, rounds to the closest class); transparent pixels (an erased or cleared canvas) are
    class 0. The canvas is centre-cropped and resized to `size` by nearest neighbour, like any map.
    """
    if canvas is None:
        return np.zeros(size, np.int64)
    rgb = canvas[..., :3].astype(np.int64)
    codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    unique, inverse = np.unique(codes.reshape(-1), return_inverse=True)
    colours = np.stack([unique >> 16, (unique >> 8) & 255, unique & 255], axis=1)
    distance = ((colours[:, None, :] - classes.colours[None].astype(np.int64)) ** 2).sum(axis=2)
    ids = distance.argmin(axis=1)[inverse].reshape(codes.shape)
    if canvas.shape[-1] == 4:
        ids[canvas[..., 3] < 128] = 0
    return fit(ids.astype(np.int32), size, "nearest").astype(np.int64)


def model_map(ids: np.ndarray, classes: Classes) -> np.ndarray:
    """Class ids -> the map the model reads: ids themselves, or for edge models the 0/255 grey edge image."""
    if classes.edge:
        return as_edge_map(ids > 0)
    return ids.astype(np.uint8 if len(classes) <= 256 else np.int32)


def ids_of_map(array: np.ndarray, classes: Classes, size: tuple[int, int]) -> np.ndarray:
    """A loaded map -> class ids at `size`: (H, W) ids, a grey edge image, or (1, H, W) edge channels."""
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise ValueError(f"a map to paint on must be (H, W) class ids or a grey edge image, got shape {array.shape}")
    if classes.edge:
        array = (array > 127).astype(np.int32)
    elif array.size and int(array.max()) >= len(classes):
        raise ValueError(f"class id {int(array.max())} is outside 0..{len(classes) - 1} (the model's classes)")
    return fit(array.astype(np.int32), size, "nearest").astype(np.int64)


def bucket_fill(ids: np.ndarray, y: int, x: int, new_class: int) -> np.ndarray:
    """Give the 4-connected region of equal class around (y, x) the class `new_class` -> a new (H, W) map."""
    region = (ids == ids[y, x]).astype(np.uint8)
    _, components = cv2.connectedComponents(region, connectivity=4)
    filled = ids.copy()
    filled[components == components[y, x]] = new_class
    return filled


def photo_edges(photo: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The edge map of a photo as the `folder` source makes it (fit, then Canny) -> (H, W) ids 0 / 1."""
    return canny_edges(fit(photo, size, "area")).astype(np.int64)
