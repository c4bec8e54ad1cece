"""Prepare stage: read a source, validate and resize every item, record skips and retrieval descriptors.

Output (data/prepared/):
    items/<i>.photo.png, items/<i>.input.png, items/<i>.json   one finished item (json written last)
    items/<i>.skip.json                                           one skipped item: file and reason
    descriptors.npy                                               (N, D) float32 retrieval descriptors
    index.json                                                    items, skips, listed and self pairs, source
Resumable: finished items are reused when the fingerprint (source settings, item names, code) matches.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from tqdm import tqdm

from pipeline.data.config import DataConfig
from pipeline.data.errors import DataError, SkipSample
from pipeline.data.imageio import (atomic_write_bytes, atomic_write_json, encode_map, encode_npy, encode_photo_png,
                                   read_json)
from pipeline.data.pairing import describe_example, resolve_listed
from pipeline.data.sources import get_source
from pipeline.data.sources.base import ItemRef, Source
from pipeline.params import section

FORMAT = "cocosnet-prepared/1"
CODE_DIR = Path(__file__).resolve().parent


def code_version() -> str:
    """sha256 of the data package's Python files (but the loader, which writes nothing): outputs made
    by other code are not reused."""
    digest = hashlib.sha256()
    for path in sorted(p for p in CODE_DIR.rglob("*.py") if p.name != "loader.py"):
        digest.update(path.relative_to(CODE_DIR).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def reset_if_stale(out_dir: Path, expected: str, owned: tuple[str, ...]) -> None:
    """Remove our earlier outputs (names in `owned`) when they were made with other settings."""
    marker = out_dir / "fingerprint.json"
    if marker.exists() and read_json(marker).get("fingerprint") == expected:
        return
    for name in owned:
        target = out_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    atomic_write_json(marker, {"fingerprint": expected})


def prepare_item(source: Source, item: ItemRef, items_dir: Path, stem: str) -> dict[str, Any]:
    """Load one item and write its files; a finished earlier run of the same item is reused."""
    done, skipped = items_dir / f"{stem}.json", items_dir / f"{stem}.skip.json"
    for path in (done, skipped):
        if path.exists():
            record = read_json(path)
            if record.get("name") == item.name:
                return record
    try:
        example = source.load(item)
    except SkipSample as skip:
        record = {"name": item.name, "skipped": True, "file": skip.file, "reason": skip.reason}
        atomic_write_json(skipped, record, durable=False)
        return record
    expected = source.image_size
    if example.photo.shape != (*expected, 3) or example.input_map.shape[-2:] != expected:
        raise DataError(f"{item.path}: source {source.name} produced photo {example.photo.shape} and map "
                        f"{example.input_map.shape}, expected size {expected} (a source bug)")
    atomic_write_bytes(items_dir / f"{stem}.photo.png", encode_photo_png(example.photo), durable=False)
    atomic_write_bytes(items_dir / f"{stem}.input.png", encode_map(example.input_map), durable=False)
    descriptor = describe_example(example.photo, example.input_map, source.input_encoding, source.label_nc)
    record = {"name": item.name, "path": item.path, "split_hint": item.split_hint, "meta": example.meta,
              "photo": f"items/{stem}.photo.png", "input": f"items/{stem}.input.png",
              "descriptor": [float(v) for v in descriptor]}
    atomic_write_json(done, record, indent=None, durable=False)
    return record


def resolve_pairs(pairs: dict[str, list[str]], items: list[ItemRef],
                  valid: set[str]) -> tuple[dict[str, list[str]], int]:
    """A source's pairing or self-pair lists resolved to valid item names (and how many names matched nothing)."""
    if not pairs:
        return {}, 0
    aliases: dict[str, str] = {}
    for item in items:
        if item.name in valid:
            for spelling in (item.name, *item.aliases):
                aliases.setdefault(spelling, item.name)
    return resolve_listed(pairs, aliases)


def prepare_dataset(source: Source, out_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Run the prepare stage for `source` into out_dir. -> the index written to out_dir/index.json."""
    out_dir = Path(out_dir)
    items = source.items()
    if not items:
        raise DataError(f"source {source.name}: no items (empty dataset)")
    expected = fingerprint({"format": FORMAT, "source": source.describe(), "items": [it.name for it in items],
                            "code": code_version()})
    out_dir.mkdir(parents=True, exist_ok=True)
    reset_if_stale(out_dir, expected, owned=("items", "index.json", "descriptors.npy"))
    items_dir = out_dir / "items"
    items_dir.mkdir(exist_ok=True)

    records, skipped = [], []
    for number, item in enumerate(tqdm(items, desc=f"prepare {source.name}", unit="img", disable=not progress)):
        record = prepare_item(source, item, items_dir, f"{number:07d}")
        (skipped if record.get("skipped") else records).append(record)
    if not records:
        reasons = "; ".join(f"{s['file']}: {s['reason']}" for s in skipped[:3])
        raise DataError(f"source {source.name}: all {len(skipped)} items were skipped (e.g. {reasons})")

    valid = {r["name"] for r in records}
    listed, unmatched = resolve_pairs(source.pairing_lists(), items, valid)
    self_pairs, self_unmatched = resolve_pairs(source.self_pair_lists(), items, valid)
    descriptors = np.array([r.pop("descriptor") for r in records], np.float32)
    atomic_write_bytes(out_dir / "descriptors.npy", encode_npy(descriptors))
    index = {
        "format": FORMAT,
        "fingerprint": expected,
        "source": source.describe(),
        "input_encoding": source.input_encoding,
        "input_channels": source.label_nc if source.input_encoding == "channels" else 1,
        "map_interpolation": source.map_interpolation,
        "map_fill": list(getattr(source, "map_fill", [0])),
        "class_channels": list(source.class_channels) if source.class_channels else None,
        "items": records,
        "skipped": [{"file": s["file"], "reason": s["reason"], "stage": "prepare"} for s in skipped],
        "listed_pairs": listed,
        "listed_unmatched": unmatched,
        "self_pairs": self_pairs,
        "self_unmatched": self_unmatched,
    }
    atomic_write_json(out_dir / "index.json", index, indent=None)
    return index


def run_prepare(params: Mapping[str, Any], out_dir: str | Path = "data/prepared") -> dict[str, Any]:
    """The prepare stage: the `data:` section of params.yaml -> out_dir. -> the index."""
    cfg = DataConfig.from_params(section(params, "data"))
    return prepare_dataset(get_source(cfg.source, **cfg.source_kwargs()), out_dir)
