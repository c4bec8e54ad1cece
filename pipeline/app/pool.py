"""The exemplar pool: the prepared dataset's photos and maps, retrieved by the shard stage's descriptors.

The prepare stage stores one retrieval descriptor per image in data/prepared/descriptors.npy (beside index.json
and the images), and the shard stage pairs every image with its nearest other image by them. The app asks the
same question of the map on the canvas: for masks the descriptor is the class histogram, which a map has on its
own; for edge and other channel maps it also holds the photo's colour histogram, which a painted map does not
have, so only the map part (the coarse edge-density grid) is compared.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data.pairing import COLOUR_BINS, describe_example
from pipeline.data.shards import Prepared


class ExemplarPool:
    """Read-only view of a prepared dataset (data/prepared) as exemplars for a model."""

    def __init__(self, directory: str | Path):
        self.prepared = Prepared(directory)
        index = self.prepared.index
        self.source: str = self.prepared.source["source"]
        self.task: str = self.prepared.source["task"]
        self.encoding: str = index["input_encoding"]
        self.label_nc: int = int(self.prepared.source["label_nc"])
        # Descriptor dimensions a map alone determines: all of a class histogram; the grid after the colours.
        self.map_dims = slice(0, None) if self.encoding == "ids" else slice(COLOUR_BINS**3, None)

    def __len__(self) -> int:
        return len(self.prepared.items)

    def name(self, i: int) -> str:
        return self.prepared.names[i]

    def photo(self, i: int) -> np.ndarray:
        """(H, W, 3) uint8 RGB at the prepared size."""
        return self.prepared.photo(i)

    def input_map(self, i: int) -> np.ndarray:
        """(H, W) class ids or (C, H, W) uint8 channels, as the model's input reads them."""
        return self.prepared.input_map(i)

    def mismatch(self, label_nc: int) -> str | None:
        """Why this pool cannot serve a model with `label_nc` input channels (None when it can)."""
        if label_nc != self.label_nc:
            return (f"the prepared data ({self.source}, {self.task}) has {self.label_nc} input channels, "
                    f"the model takes {label_nc}")
        return None

    def nearest(self, input_map: np.ndarray, k: int) -> list[tuple[int, float]]:
        """The k pool images whose descriptors are nearest to that of `input_map` ((H, W) ids, an (H, W) grey
        edge image or (C, H, W) uint8 channels) -> [(index, distance)], nearest first; ties to the lower index."""
        if self.encoding == "channels" and input_map.ndim == 2:
            input_map = input_map[None]  # a 1-channel map as the grey image the model reads
        placeholder = np.zeros((*input_map.shape[-2:], 3), np.uint8)  # the photo part is not compared
        query = describe_example(placeholder, input_map, self.encoding, self.label_nc)[self.map_dims]
        pool = self.prepared.descriptors[:, self.map_dims].astype(np.float64)
        distance = np.sqrt(((pool - query.astype(np.float64)) ** 2).sum(axis=1))
        order = np.argsort(np.round(distance, 9), kind="stable")[:k]
        return [(int(i), float(distance[i])) for i in order]
