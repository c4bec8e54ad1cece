"""Dataset sources: each turns a dataset on disk (or a generator) into validated, resized examples.

    source = get_source("synthetic", task="mask", image_size=(64, 64), label_nc=12, seed=0)
    for item in source.items():
        example = source.load(item)   # Example(photo, input_map, meta) or raises SkipSample
"""
from __future__ import annotations

from typing import Any

from pipeline.data.errors import DataError
from pipeline.data.sources.ade20k import ADE20KSource
from pipeline.data.sources.base import Example, ItemRef, Source
from pipeline.data.sources.celebahq_edge import CelebAHQEdgeSource
from pipeline.data.sources.deepfashion import DeepFashionSource
from pipeline.data.sources.folder import FolderSource
from pipeline.data.sources.synthetic import SyntheticSource

SOURCES: dict[str, type[Source]] = {
    cls.name: cls for cls in (SyntheticSource, ADE20KSource, CelebAHQEdgeSource, DeepFashionSource, FolderSource)
}


def get_source(name: str, **cfg: Any) -> Source:
    """Build source `name` from keyword settings (root, task, image_size, label_nc, seed, source knobs)."""
    if name not in SOURCES:
        raise DataError(f"unknown data source {name!r}; choose one of {sorted(SOURCES)}")
    try:
        return SOURCES[name](**cfg)
    except TypeError as exc:  # an unknown knob in params.yaml's data.<source> section
        raise DataError(f"source {name!r}: bad settings ({exc})") from None


__all__ = ["Example", "ItemRef", "Source", "SOURCES", "get_source"]
