"""CelebAMask-HQ faces: edge -> image, edges as in CoCosNet v1.

The edge map is Canny on the photo outside the inner facial parts plus the boundaries of every part
mask (when the item has part masks). label_nc 1 gives that single map; label_nc 15 gives v1's full
input: [all edges, 13 per-part distance maps, part boundaries only].
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from pipeline.data.errors import DataError
from pipeline.data.imageio import fit, read_gray, read_photo
from pipeline.data.maps import as_edge_map, canny_edges, distance_map, label_boundaries
from pipeline.data.sources.base import (Example, ItemRef, Source, find_photos, read_name_list,
                                        safe_name, unique_items)

LAYOUT = "CelebAMask-HQ layout: CelebA-HQ-img/<id>.jpg and optionally CelebAMask-HQ-mask-anno/<k>/<id:05d>_<part>.png"
# Parts whose boundaries are drawn; Canny is kept only outside all but hair (v1's choice).
PARTS = ("skin", "l_brow", "r_brow", "l_eye", "r_eye", "l_ear", "r_ear", "nose", "u_lip", "mouth", "l_lip",
         "eye_g", "hair")
PART_FILE = re.compile(r"^(\d+)_([a-z_]+)\.png$")
PAIRING_LISTS = ("celebahq_ref.txt", "celebahq_ref_test.txt")


def index_part_masks(folder: Path) -> dict[int, dict[str, str]]:
    """{image id: {part: path}} from the annotation folder (any sub-folder layout)."""
    parts: dict[int, dict[str, str]] = {}
    if folder.is_dir():
        for path in sorted(folder.glob("**/*.png")):
            match = PART_FILE.match(path.name)
            if match and match.group(2) in PARTS:
                parts.setdefault(int(match.group(1)), {})[match.group(2)] = str(path)
    return parts


class CelebAHQEdgeSource(Source):

    pairing_files = PAIRING_LISTS
    name = "celebahq_edge"
    tasks = ("edge",)
    input_encoding = "channels"

    def __init__(self, *, root, task: str = "edge", image_size=(256, 256), label_nc: int = 1, seed: int = 0):
        super().__init__(root=root, task=task, image_size=image_size, label_nc=label_nc, seed=seed)
        if label_nc not in (1, 2 + len(PARTS)):
            raise DataError(f"celebahq_edge: data.label_nc must be 1 (edge map) or {2 + len(PARTS)} "
                            f"(CoCosNet v1 edges + part distance maps), got {label_nc}")
        if label_nc > 1:
            self.map_fill = (0,) + (255,) * len(PARTS) + (0,)  # distance maps: far outside the frame

    def items(self) -> list[ItemRef]:
        root = self.require_root(LAYOUT)
        parts = index_part_masks(root / "CelebAMask-HQ-mask-anno")
        splits = {}
        for list_name, split in (("train.txt", "train"), ("val.txt", "val")):
            if (root / list_name).exists():
                splits.update({Path(n).stem: split for n in read_name_list(root / list_name)})
        items = []
        for photo in find_photos(root / "CelebA-HQ-img", recursive=False):
            image_id = int(photo.stem) if photo.stem.isdigit() else None
            items.append(ItemRef(name=safe_name(photo.name), path=str(photo), aliases=(photo.name, photo.stem),
                                 split_hint=splits.get(photo.stem), files={"parts": parts.get(image_id, {})}))
        if not items:
            raise DataError(f"{root}: no photos found (empty dataset); expected {LAYOUT}")
        return unique_items(items)

    def load(self, item: ItemRef) -> Example:
        photo = fit(read_photo(item.path), self.image_size, "area")
        part_edges = np.zeros(self.image_size, bool)
        outside_face = np.ones(self.image_size, bool)
        distances = []
        for part in PARTS:
            boundary = np.zeros(self.image_size, bool)
            if part in item.files["parts"]:
                mask = fit(read_gray(item.files["parts"][part]), self.image_size, "nearest") >= 128
                boundary = label_boundaries(mask)
                part_edges |= boundary
                if part != "hair":
                    outside_face &= ~mask
            distances.append(distance_map(boundary))  # no such part: as far as can be stored
        edges = part_edges | (canny_edges(photo) & outside_face)
        if self.label_nc == 1:
            return Example(photo=photo, input_map=as_edge_map(edges)[None])
        channels = [as_edge_map(edges), *distances, as_edge_map(part_edges)]
        return Example(photo=photo, input_map=np.stack(channels))
