"""Helpers for the data tests (no tests here): tiny fake datasets in each on-disk layout, tiny shards."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.config import AugmentConfig, ShardConfig
from pipeline.data.prepare import prepare_dataset
from pipeline.data.shards import write_shards
from pipeline.data.sources import get_source


def smooth_photo(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A photo with structure at several scales (so Canny finds edges and JPEG has something to keep)."""
    low = rng.random((4, 4, 3)).astype(np.float32)
    photo = np.asarray(Image.fromarray((low * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC))
    photo = photo.copy()
    y0, x0 = rng.integers(0, height // 2), rng.integers(0, width // 2)
    photo[y0 : y0 + height // 3, x0 : x0 + width // 3] = rng.integers(0, 256, 3)
    return photo


def write_image(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def make_ade20k(root: Path, n_train: int = 4, n_val: int = 2, size=(40, 48), max_id: int = 150, seed: int = 0) -> Path:
    """ADEChallengeData2016 layout with blocky label maps using ids up to max_id."""
    rng = np.random.default_rng(seed)
    for folder, count, prefix in (("training", n_train, "ADE_train"), ("validation", n_val, "ADE_val")):
        for i in range(count):
            name = f"{prefix}_{i:08d}"
            write_image(root / "images" / folder / f"{name}.jpg", smooth_photo(rng, *size))
            labels = np.zeros(size, np.uint8)
            labels[: size[0] // 2] = rng.integers(1, max_id + 1)
            labels[size[0] // 2 :, : size[1] // 2] = rng.integers(1, max_id + 1)
            write_image(root / "annotations" / folder / f"{name}.png", labels)
    return root


def make_celebahq(root: Path, n: int = 4, size: int = 64, with_parts=(0, 1), seed: int = 0) -> Path:
    """CelebAMask-HQ layout; items in with_parts get skin/l_eye/hair masks."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        write_image(root / "CelebA-HQ-img" / f"{i}.jpg", smooth_photo(rng, size, size))
        if i in with_parts:
            folder = root / "CelebAMask-HQ-mask-anno" / str(i // 2000)
            skin = np.zeros((size, size), np.uint8)
            skin[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
            eye = np.zeros((size, size), np.uint8)
            eye[size // 3 : size // 3 + 4, size // 3 : size // 3 + 6] = 255
            hair = np.zeros((size, size), np.uint8)
            hair[: size // 4] = 255
            for part, mask in (("skin", skin), ("l_eye", eye), ("hair", hair)):
                write_image(folder / f"{i:05d}_{part}.png", mask)
    return root


def openpose_files(stem: Path, size: int, rng: np.random.Generator, missing_joints=(9, 10)) -> None:
    """Write <stem>_candidate.txt and <stem>_subset.txt for one person in a size x size photo."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    joints = rng.uniform(0.2 * size, 0.8 * size, (18, 2))
    candidate = np.concatenate([joints, np.ones((18, 1)), np.arange(18)[:, None]], axis=1)
    subset = np.concatenate([np.arange(18, dtype=float), [17.5, 18]])
    subset[list(missing_joints)] = -1
    np.savetxt(f"{stem}_candidate.txt", candidate)
    np.savetxt(f"{stem}_subset.txt", subset[None])


def make_deepfashion(root: Path, n: int = 4, size: int = 64, seed: int = 0) -> Path:
    """DeepFashionHD layout: img/MEN/Denim/id_x/<k>_front.jpg with pose/... OpenPose text files."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        relative = Path("MEN") / "Denim" / f"id_{i // 2:08d}" / f"0{i % 2}_1_front.jpg"
        write_image(root / "img" / relative, smooth_photo(rng, size, size))
        openpose_files(root / "pose" / relative.with_suffix(""), size, rng)
    return root


def make_folder(root: Path, n: int = 4, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n):
        write_image(root / ("a" if i % 2 else "b") / f"photo {i}.v2.png", smooth_photo(rng, 48, 64))
    return root


def tiny_shard_config(**changes) -> ShardConfig:
    values = dict(pseudo_per_image=2, samples_per_shard=8, min_shards_per_split=4, val_fraction=0.25,
                  max_skipped_fraction=0.5, num_workers=1, augment=AugmentConfig())
    values.update(changes)
    return ShardConfig(**values)


def build_shards(workdir: Path, source: str = "synthetic", shard_cfg: ShardConfig | None = None, seed: int = 0,
                 **source_cfg) -> tuple[Path, dict]:
    """prepare + shard into workdir/{prepared,shards}; -> (shard dir, manifest)."""
    cfg = dict(task="mask", image_size=32, label_nc=12, seed=seed)
    if source == "synthetic":
        cfg["num_images"] = 16
    cfg.update(source_cfg)
    prepare_dataset(get_source(source, **cfg), workdir / "prepared", progress=False)
    manifest = write_shards(workdir / "prepared", workdir / "shards", shard_cfg or tiny_shard_config(), seed=seed,
                            report_path=workdir / "reports" / "shard_report.json", progress=False)
    return workdir / "shards", manifest
