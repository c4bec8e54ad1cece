"""The shard contract (DESIGN.md): sample keys, member names, the manifest; shared by the writer and the loader.

One WebDataset sample per image, with `pseudo_per_image` pseudo exemplars (k = 0 .. pseudo_per_image - 1):

    __key__               "<source>/<name>"
    input.png             x_A: class ids (uint8/uint16) or channels stacked vertically ((C*H, W) uint8)
    image.jpg             x_B
    exemplar.jpg          y_B, the real exemplar;        exemplar_input.png    its map y_A
    pseudo.<k>.jpg        pseudo exemplar k;             pseudo_input.<k>.png  its map
    pseudo_flow.<k>.npy   (2, H, W) float16: (y, x) in pseudo.<k>.jpg of each x_B pixel, NaN where invalid
    self.jpg              only where the dataset lists one: the sample's self pair (the same subject in another
                          view, the official --video_like reference; a real photo, so no flow)
    self_input.png        its map
    meta.json             source, task, size, label_nc, pairing ("listed"/"retrieved": how the real exemplar was
                          chosen), self_pair (its item name or null), augmentation (one entry per pseudo
                          exemplar), synthetic palettes

manifest.json beside the shards lists them (name, samples, sha256, bytes) per split, with the image size, class
count, map encoding and pairing statistics (pairing.self_pairs: samples per split with a self pair): the one
record of them downstream. Format 2 (before self pairs) is still read: its samples have no self pair.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

from pipeline.data.errors import DataError
from pipeline.data.imageio import read_json

SHARD_FORMAT = "cocosnet-wds/3"
READABLE_FORMATS = ("cocosnet-wds/2", SHARD_FORMAT)  # 2: the same without self pairs
COMMON_MEMBERS = ("input.png", "image.jpg", "exemplar.jpg", "exemplar_input.png", "meta.json")
SELF_MEMBERS = ("self.jpg", "self_input.png")  # (photo, map) of the self pair, where a sample has one


def pseudo_members(k: int) -> tuple[str, str, str]:
    """Pseudo exemplar k's members: (photo, map, flow)."""
    return f"pseudo.{k}.jpg", f"pseudo_input.{k}.png", f"pseudo_flow.{k}.npy"


def member_names(pseudo_per_image: int, self_pair: bool = False) -> tuple[str, ...]:
    """All members of a sample (with or without a self pair)."""
    pseudo = tuple(m for k in range(pseudo_per_image) for m in pseudo_members(k))
    return COMMON_MEMBERS + pseudo + (SELF_MEMBERS if self_pair else ())


def require_self_pairs(manifest: dict[str, Any], where: str | Path, split: str) -> None:
    """video_like training needs self pairs: fail, naming the manifest, when no sample of the split has one
    (format 2 predates them)."""
    if not manifest.get("pairing", {}).get("self_pairs", {}).get(split, 0):
        raise DataError(f"{where}: video_like needs self pairs, and no {split!r} sample has one (pairing.self_pairs): "
                        "give the dataset its self-pair list (DeepFashion: deepfashion_self_pair.txt) and re-run the "
                        "prepare and shard stages, or set train.video_like: false")


def require_class_channels(manifest: dict[str, Any], where: str | Path) -> None:
    """loss.class_nce reads each pixel's class from the maps: fail, naming the manifest, when they do not hold it
    (edge and pose inputs; shards written before the manifest recorded class_channels)."""
    if not manifest.get("class_channels"):
        raise DataError(f"{where}: loss.class_nce needs inputs that say each pixel's class, and these shards "
                        f"({manifest.get('source')}, task {manifest.get('task')}) have no class_channels: use class-id "
                        "maps (task mask) or the synthetic edge task with edges: classes, or set loss.class_nce: 0")


def sample_key(source: str, name: str) -> str:
    return f"{source}/{name}"


def stable_hash(*parts: Any) -> int:
    """A 63-bit integer from the parts' text: the same on every machine and run (unlike hash())."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def read_manifest(shard_dir_or_manifest: str | Path) -> tuple[dict[str, Any], Path]:
    """-> (manifest, folder of the shards). Accepts the shard folder or its manifest.json."""
    path = Path(shard_dir_or_manifest)
    manifest_path = path / "manifest.json" if path.is_dir() else path
    manifest = read_json(manifest_path)
    if manifest.get("format") not in READABLE_FORMATS:
        raise DataError(f"{manifest_path}: format {manifest.get('format')!r} is not a shard manifest this code reads "
                        f"({', '.join(READABLE_FORMATS)}); re-run the shard stage")
    return manifest, manifest_path.parent


# ---------------------------------------------------------------- shards against their manifest entries


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


VERIFY = ("full", "size", "none")


@functools.lru_cache(maxsize=None)
def verify_shard(url: str, version: tuple[int, int], sha256: str, size: int, verify: str) -> None:
    """Check a shard against its manifest entry once per process and file version (mtime, size): "size" compares
    the byte count, "full" also the sha256 (one read of the file: a flipped byte or another shard under this name)."""
    if verify != "none" and version[1] != size:
        raise DataError(f"{url}: {version[1]} bytes, the manifest says {size}: the shard is truncated or was replaced "
                        f"(re-run `dvc repro shard`)")
    if verify == "full" and (digest := sha256_file(url)) != sha256:
        raise DataError(f"{url}: sha256 {digest[:16]}... differs from the manifest's {sha256[:16]}...: "
                        f"the shard is corrupt or another file took its name (re-run `dvc repro shard`)")


def verify_split(shards: str | Path, split: str, verify: str = "full") -> None:
    """Verify every shard of a split now (verify_shard): the training driver does it before it starts Ray, so that
    a bad shard fails the run once instead of a worker that Ray would restart."""
    manifest, shard_dir = read_manifest(shards)
    for entry in manifest["splits"].get(split, {}).get("shards", []):
        path = shard_dir / entry["name"]
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise DataError(f"{path}: listed in the manifest but missing (re-run `dvc repro shard`)") from None
        verify_shard(str(path), (stat.st_mtime_ns, stat.st_size), entry["sha256"], entry["bytes"], verify)
