"""ADE20K scene parsing (ADEChallengeData2016): mask -> image, 150 classes plus 0 = unlabelled."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data.errors import DataError, SkipSample
from pipeline.data.imageio import fit, read_label_png, read_photo
from pipeline.data.sources.base import (Example, ItemRef, Source, find_photos, safe_name,
                                        unique_items)

LAYOUT = "ADEChallengeData2016 layout: images/{training,validation}/*.jpg and annotations/{training,validation}/*.png"
SPLITS = (("training", "train"), ("validation", "val"))
PAIRING_LISTS = ("ade20k_ref.txt", "ade20k_ref_test.txt")  # CoCosNet's lists: "name.jpg,ref1.jpg,..."


class ADE20KSource(Source):
    """Class ids are stored as they are (0 = unlabelled); label_nc counts them all (151 for ADE20K)."""

    pairing_files = PAIRING_LISTS

    name = "ade20k"
    tasks = ("mask",)

    def __init__(self, *, root, task: str = "mask", image_size=(256, 256), label_nc: int = 151, seed: int = 0):
        super().__init__(root=root, task=task, image_size=image_size, label_nc=label_nc, seed=seed)
        if not 2 <= label_nc <= 65536:
            raise DataError(f"ade20k: data.label_nc must be in [2, 65536] (151 = 150 classes + unlabelled), "
                            f"got {label_nc}")

    def items(self) -> list[ItemRef]:
        root = self.require_root(LAYOUT)
        items = []
        for folder, split in SPLITS:
            for photo in find_photos(root / "images" / folder, recursive=False):
                items.append(ItemRef(
                    name=safe_name(f"{folder}/{photo.name}"),
                    path=str(photo),
                    aliases=(photo.name, photo.stem, f"images/{folder}/{photo.name}"),
                    split_hint=split,
                    files={"annotation": str(root / "annotations" / folder / f"{photo.stem}.png")},
                ))
        if not items:
            raise DataError(f"{root}: no images found (empty dataset); expected {LAYOUT}")
        return unique_items(items)

    def load(self, item: ItemRef) -> Example:
        photo = read_photo(item.path)
        annotation = item.files["annotation"]
        if not Path(annotation).exists():
            raise SkipSample(annotation, f"missing annotation for photo {item.path}")
        labels = read_label_png(annotation)
        if labels.shape != photo.shape[:2]:
            raise SkipSample(annotation, f"annotation size {labels.shape[1]}x{labels.shape[0]} does not match "
                                         f"photo {item.path} size {photo.shape[1]}x{photo.shape[0]}")
        if labels.size and int(labels.max()) >= self.label_nc:
            raise SkipSample(annotation, f"label id {int(labels.max())} >= label_nc {self.label_nc}")
        dtype = np.uint8 if self.label_nc <= 256 else np.uint16
        return Example(photo=fit(photo, self.image_size, "area"),
                       input_map=fit(labels.astype(dtype), self.image_size, "nearest"))
