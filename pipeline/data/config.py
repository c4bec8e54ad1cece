"""Typed configuration of the data stages, read from the `data:` and `shard:` sections of params.yaml."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from pipeline.params import from_mapping

TASKS = ("mask", "edge", "pose")


def as_size(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """An image size as (H, W) from an int (square) or a pair."""
    if isinstance(value, int):
        size = (value, value)
    elif isinstance(value, (list, tuple)) and len(value) == 2:
        size = (int(value[0]), int(value[1]))
    else:
        raise ValueError(f"image_size must be an int or [H, W], got {value!r}")
    if min(size) < 8:
        raise ValueError(f"image_size must be at least 8 pixels per side, got {value!r}")
    return size


@dataclass(frozen=True)
class DataConfig:
    """Which dataset, which task, at which size. Source-specific knobs live in `data.<source>:`."""

    source: str = "synthetic"
    root: str | None = None  # dataset folder of a real source; unused by synthetic
    task: str = "mask"  # mask | edge | pose
    image_size: int | tuple[int, int] = (64, 64)  # (H, W) of everything written to shards (an int: square)
    label_nc: int = 12  # channels of x_A: classes incl. 0 for masks, 1 for edges, 20 for pose
    seed: int = 0
    source_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", as_size(self.image_size))
        if self.task not in TASKS:
            raise ValueError(f"data.task must be one of {TASKS}, got {self.task!r}")
        if self.label_nc < 1:
            raise ValueError(f"data.label_nc must be >= 1, got {self.label_nc}")

    @classmethod
    def from_params(cls, data: Mapping[str, Any]) -> "DataConfig":
        """`data:` section -> DataConfig; the `data.<source>` sub-section becomes source_options."""
        data = dict(data)
        source = data.get("source", cls.source)
        nested = {k: data.pop(k) for k in list(data) if isinstance(data[k], dict)}
        options = nested.pop(source, {}) or {}
        # Sections of the other sources are allowed (switching source is a one-line change).
        return from_mapping(cls, {**data, "source_options": options}, "data")

    def source_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for pipeline.data.sources.get_source."""
        return dict(
            root=self.root,
            task=self.task,
            image_size=self.image_size,
            label_nc=self.label_nc,
            seed=self.seed,
            **self.source_options,
        )


@dataclass(frozen=True)
class AugmentConfig:
    """Pseudo-exemplar distortion. Geometric parts move photo and map together; photometric: photo only."""

    flip_prob: float = 0.5
    rotate_deg: float = 15.0  # uniform in [-rotate_deg, rotate_deg]
    scale: tuple[float, float] = (0.9, 1.1)
    translate: float = 0.06  # fraction of the image side, each direction
    shear_deg: float = 5.0
    elastic_prob: float = 0.5
    elastic_rms: float = 0.012  # RMS elastic displacement as a fraction of the image side
    elastic_sigma: float = 0.1  # smoothness of the elastic field, fraction of the image side
    color_prob: float = 0.8
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.04
    blur_prob: float = 0.3
    blur_sigma: tuple[float, float] = (0.3, 1.2)

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", tuple(float(v) for v in self.scale))
        object.__setattr__(self, "blur_sigma", tuple(float(v) for v in self.blur_sigma))
        for name in ("flip_prob", "elastic_prob", "color_prob", "blur_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"shard.augment.{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"shard.augment.scale must be 0 < lo <= hi, got {self.scale}")


@dataclass(frozen=True)
class ShardConfig:
    """How prepared images become WebDataset shards."""

    pseudo_per_image: int = 4  # pseudo exemplars stored per image sample; the loader takes a new one each epoch
    samples_per_shard: int = 64
    min_shards_per_split: int = 4  # at least ranks x loader workers, so no reader starves
    val_fraction: float = 0.1  # for images whose dataset gives no split
    retrieval_top_k: int = 5  # nearest training images listed per image (retrieval_<split>.txt beside the shards)
    max_skipped_fraction: float = 0.05  # of all images; above it the stage fails
    jpeg_quality: int = 95
    num_workers: int = 2  # processes writing shards (1 = in-process)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        if isinstance(self.augment, Mapping):
            object.__setattr__(self, "augment", from_mapping(AugmentConfig, self.augment, "shard.augment"))
        if self.pseudo_per_image < 1:
            raise ValueError(f"shard.pseudo_per_image must be >= 1, got {self.pseudo_per_image}")
        if self.samples_per_shard < 1 or self.min_shards_per_split < 1 or self.retrieval_top_k < 1:
            raise ValueError("shard.samples_per_shard, shard.min_shards_per_split and shard.retrieval_top_k must be >= 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"shard.val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 <= self.max_skipped_fraction <= 1.0:
            raise ValueError(f"shard.max_skipped_fraction must be in [0, 1], got {self.max_skipped_fraction}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"shard.jpeg_quality must be in [1, 100], got {self.jpeg_quality}")

    @classmethod
    def from_params(cls, shard: Mapping[str, Any]) -> "ShardConfig":
        return from_mapping(cls, dict(shard), "shard")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
