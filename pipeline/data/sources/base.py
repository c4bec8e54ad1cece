"""What every dataset source provides: a list of items, loading one item, and optional pairing lists."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from pipeline.data.config import as_size
from pipeline.data.errors import DataError

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass
class ItemRef:
    """One image of a dataset before it is read.

    name:       unique, key-safe id (becomes the sample key "<source>/<name>" in shards)
    path:       the photo file (named in every error about this item)
    aliases:    other spellings used by pairing lists (file name, relative path, ...)
    split_hint: "train"/"val" when the dataset defines the split, else None
    files:      the other files the item needs (annotation, pose, part masks), by role
    """

    name: str
    path: str
    aliases: tuple[str, ...] = ()
    split_hint: str | None = None
    files: dict[str, Any] = field(default_factory=dict)


@dataclass
class Example:
    """One loaded item at the target size.

    photo:     (H, W, 3) uint8 RGB
    input_map: (H, W) uint8/uint16 class ids ("ids" encoding) or (C, H, W) uint8 ("channels")
    meta:      JSON-able extras written to meta.json (the synthetic palette)
    """

    photo: np.ndarray
    input_map: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)


class Source:
    """Base class. Subclasses set the class attributes and implement items() and load()."""

    name: ClassVar[str]
    tasks: ClassVar[tuple[str, ...]]
    input_encoding: str = "ids"  # "ids": one-hot later; "channels": the map's own channels
    map_interpolation: str = "nearest"  # how a geometric distortion resamples the input map
    map_fill: tuple[float, ...] = (0,)  # map value(s) outside the frame after a distortion (per channel)

    def __init__(self, *, root, task: str, image_size: tuple[int, int], label_nc: int, seed: int = 0):
        if task not in self.tasks:
            raise DataError(f"source {self.name!r} supports tasks {self.tasks}, not {task!r} (params data.task)")
        self.root = Path(root) if root else None
        self.task = task
        self.image_size = as_size(image_size)
        self.label_nc = label_nc
        self.seed = seed

    def items(self) -> list[ItemRef]:
        """All items, sorted by name; raises DataError when the dataset is empty or misplaced."""
        raise NotImplementedError

    def load(self, item: ItemRef) -> Example:
        """Read, validate and resize one item; raises SkipSample naming the file and the problem."""
        raise NotImplementedError

    pairing_files: tuple[str, ...] = ()  # files under root in the official "name,ref1,ref2,..." format
    # Same format: the same subject in another view (DeepFashion: the same person in another pose), the official
    # --video_like pairs, which train with pixel-level supervision like a pseudo pair
    self_pair_files: tuple[str, ...] = ()

    def pairing_lists(self) -> dict[str, list[str]]:
        """Listed exemplars {listed name: [ref1, ref2, ...]} from the dataset's pairing files, or {}."""
        return read_pairing_lists(self.root, self.pairing_files)

    def self_pair_lists(self) -> dict[str, list[str]]:
        """Self pairs {listed name: [same subject, other view, ...]} from the dataset's self-pair files, or {}."""
        return read_pairing_lists(self.root, self.self_pair_files)

    @property
    def class_channels(self) -> tuple[int, int] | None:
        """The [start, stop) channels of the model's x_A that hold one mask per class (class ids are one-hot:
        all of them), or None where the input does not say which class a pixel is (edges, pose)."""
        return (0, self.label_nc) if self.input_encoding == "ids" else None

    def describe(self) -> dict[str, Any]:
        """What identifies this source's output (goes into fingerprints and the manifest)."""
        return dict(
            source=self.name,
            root=str(self.root) if self.root else None,
            task=self.task,
            image_size=list(self.image_size),
            label_nc=self.label_nc,
            seed=self.seed,
            input_encoding=self.input_encoding,
        )

    def require_root(self, layout: str) -> Path:
        if self.root is None:
            raise DataError(f"source {self.name!r} needs data.root: the dataset folder ({layout})")
        if not self.root.is_dir():
            raise DataError(f"{self.root}: dataset folder not found (expected {layout})")
        return self.root

    def check_label_nc(self, expected: int, meaning: str) -> None:
        if self.label_nc != expected:
            raise DataError(f"source {self.name!r} task {self.task!r} gives {expected} channels ({meaning}); "
                            f"set data.label_nc: {expected} (got {self.label_nc})")


_UNSAFE = re.compile(r"[^A-Za-z0-9_\-/]")


def safe_name(relative: str) -> str:
    """A key-safe item name: no dots (WebDataset splits keys at the first dot), no '#', no spaces."""
    stem = relative.replace("\\", "/")
    stem = re.sub(r"\.[A-Za-z0-9]+$", "", stem)  # drop the file extension
    return _UNSAFE.sub("_", stem).strip("/")


def find_photos(folder: Path, recursive: bool = True) -> list[Path]:
    """Photo files under `folder`, sorted (the order every later step relies on)."""
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES
                  and not p.name.startswith("."))


def unique_items(items: list[ItemRef]) -> list[ItemRef]:
    """Sort by name and refuse two files that map to the same name."""
    seen: dict[str, str] = {}
    for item in items:
        if item.name in seen:
            raise DataError(f"{item.path}: name {item.name!r} collides with {seen[item.name]} "
                            "(names drop extensions and unsafe characters); rename one of them")
        seen[item.name] = item.path
    return sorted(items, key=lambda it: it.name)


def read_pairing_list(path: Path) -> dict[str, list[str]]:
    """Official pairing list: one line per image, "name,ref1,ref2,..." (backslashes allowed)."""
    pairs: dict[str, list[str]] = {}
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: pairing list is not text ({exc})") from None
    for number, line in enumerate(lines, 1):
        fields = [f.strip().replace("\\", "/") for f in line.split(",")]
        fields = [f for f in fields if f]
        if not fields:
            continue
        if len(fields) < 2:
            raise DataError(f"{path}:{number}: expected 'name,ref1,...', got {line!r}")
        pairs[fields[0]] = fields[1:]
    return pairs


def read_pairing_lists(root: Path | None, names: tuple[str, ...]) -> dict[str, list[str]]:
    """The pairing lists among `names` that exist under root, merged (a later file wins for a name listed twice)."""
    pairs: dict[str, list[str]] = {}
    for name in names:
        if root is not None and (root / name).exists():
            pairs.update(read_pairing_list(root / name))
    return pairs


def read_name_list(path: Path) -> list[str]:
    """A split list (train.txt / val.txt): one file name or relative path per line."""
    return [line.strip().replace("\\", "/") for line in path.read_text().splitlines() if line.strip()]
