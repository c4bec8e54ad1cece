"""WebDataset shards -> batches of model-ready tensors, split across Ray ranks and DataLoader workers.

    loader = make_loader("data/shards", batch_size=8, split="train", image_size=64, label_nc=12)
    for batch in loader:   # one epoch; iterating again starts the next epoch (or call set_epoch)
        batch["input_map"]     (B, label_nc, H, W) float   x_A: one-hot classes, or the map's channels in [0, 1]
        batch["image"]         (B, 3, H, W) float          x_B in [-1, 1]
        batch["exemplar"]      (B, 3, H, W) float          y_B: the pseudo exemplar or the real one
        batch["exemplar_map"]  (B, label_nc, H, W) float   y_A: the exemplar's own map
        batch["is_pseudo"]     (B,) bool                   which of the two this sample uses
        batch["flow"]          (B, 2, H, W) float          (y, x) in the pseudo exemplar of each x_B pixel
        batch["flow_valid"]    (B, 1, H, W) bool           False where the pixel left the frame or not pseudo
        batch["key"]           list[str];   batch["meta"]  list[dict] (the synthetic palette lives here)
    mode="both" adds "pseudo", "pseudo_map", "real_exemplar", "real_exemplar_map" (for evaluation).

Finite mode: shards are split by rank (RANK/WORLD_SIZE, as Ray sets them) then by DataLoader worker,
so one epoch over all ranks reads every sample exactly once. Infinite mode resamples shards with
replacement and cuts each rank's epoch to the same number of batches (what DDP needs).
Nothing from a shard is unpickled: members are decoded as JPEG, PNG, NPY (allow_pickle=False), JSON.
"""
from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_iterator

from pipeline.data.config import as_size
from pipeline.data.errors import DataError
from pipeline.data.imageio import decode_jpeg, decode_map, decode_npy, read_json
from pipeline.data.shards import FORMAT, stable_hash

REQUIRED = ("input.png", "image.jpg", "exemplar.jpg", "exemplar_input.png", "pseudo.jpg", "pseudo_input.png",
            "pseudo_flow.npy", "meta.json")
MODES = ("train", "both")


# ---------------------------------------------------------------- manifest


def read_manifest(shard_dir_or_manifest: str | Path) -> tuple[dict[str, Any], Path]:
    """-> (manifest, folder of the shards). Accepts the shard folder or its manifest.json."""
    path = Path(shard_dir_or_manifest)
    manifest_path = path / "manifest.json" if path.is_dir() else path
    manifest = read_json(manifest_path)
    if manifest.get("format") != FORMAT:
        raise DataError(f"{manifest_path}: not a shard manifest of format {FORMAT}")
    return manifest, manifest_path.parent


def rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """This process's rank among `world_size` readers: arguments first, else RANK/WORLD_SIZE (Ray, torchrun)."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    return rank, world_size


def epoch_shard_order(paths: list[str], seed: int, epoch: int, shuffle: bool) -> list[str]:
    """All shards in this epoch's order: the same on every rank, so rank slices partition them."""
    order = list(paths)
    if shuffle:
        random.Random(stable_hash(seed, "shards", epoch)).shuffle(order)
    return order


# ---------------------------------------------------------------- pipeline stages (run in each worker)


class ShardList(IterableDataset):
    """Yields {"url": path} for the shards this rank and worker read in one epoch."""

    def __init__(self, paths: list[str], rank: int, world_size: int, seed: int, epoch: int, shuffle: bool,
                 resampled: bool):
        super().__init__()
        self.paths, self.rank, self.world_size = list(paths), rank, world_size
        self.seed, self.epoch, self.shuffle, self.resampled = seed, epoch, shuffle, resampled

    def __iter__(self) -> Iterator[dict[str, str]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if self.resampled:  # independent draws with replacement per rank and worker, forever
            rng = random.Random(stable_hash(self.seed, "resample", self.epoch, self.rank, worker))
            while True:
                yield {"url": rng.choice(self.paths)}
        order = epoch_shard_order(self.paths, self.seed, self.epoch, self.shuffle)
        for url in order[self.rank :: self.world_size][worker::workers]:
            yield {"url": url}


def read_tar_samples(shards: Iterator[dict[str, str]]) -> Iterator[dict[str, Any]]:
    """Shard urls -> raw samples {"__key__", "__url__", member suffix: bytes}; each file closed when done."""
    for shard in shards:
        url = shard["url"]
        with open(url, "rb") as stream:
            files = ({**member, "__url__": url} for member in tar_file_iterator(stream))
            yield from group_by_keys(files)


def shuffle_samples(samples: Iterator[dict], buffer_size: int, seed: int) -> Iterator[dict]:
    """Seeded buffer shuffle (reproducible, unlike a shuffle drawing from the global RNG)."""
    rng = random.Random(seed)
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        k = rng.randrange(buffer_size)
        yield buffer[k]
        buffer[k] = sample
    rng.shuffle(buffer)
    yield from buffer


class ShuffleStage:
    """Picklable pipeline stage around shuffle_samples whose seed differs per worker."""

    def __init__(self, buffer_size: int, seed: int, epoch: int, rank: int):
        self.buffer_size, self.seed, self.epoch, self.rank = buffer_size, seed, epoch, rank

    def __call__(self, samples: Iterator[dict]) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info else 0
        return shuffle_samples(samples, self.buffer_size, stable_hash(self.seed, "buffer", self.epoch, self.rank, worker))


def uses_pseudo(key: str, real_exemplar_prob: float, seed: int, epoch: int) -> bool:
    """Per-sample choice of pair, a function of (seed, epoch, key) only: the same whichever worker reads it."""
    if real_exemplar_prob <= 0:
        return True
    if real_exemplar_prob >= 1:
        return False
    u = stable_hash(seed, "pair", epoch, key) / 2**63
    return u >= real_exemplar_prob


class SampleDecoder:
    """Raw sample (bytes) -> compact arrays (uint8 images, integer/uint8 maps, float16 flow)."""

    def __init__(self, *, encoding: str, channels: int, mode: str, real_exemplar_prob: float, seed: int,
                 epoch: int, shard_size: tuple[int, int], out_size: tuple[int, int]):
        self.encoding, self.channels, self.mode = encoding, channels, mode
        self.real_exemplar_prob, self.seed, self.epoch = real_exemplar_prob, seed, epoch
        self.shard_size, self.out_size = shard_size, out_size

    def image(self, data: bytes, where: str) -> np.ndarray:
        rgb = decode_jpeg(data, where)
        if rgb.shape[:2] != self.shard_size:
            raise DataError(f"{where}: image is {rgb.shape[:2]}, manifest says {self.shard_size}")
        if self.out_size != self.shard_size:
            rgb = cv2.resize(rgb, self.out_size[::-1], interpolation=cv2.INTER_AREA)
        return np.ascontiguousarray(rgb.transpose(2, 0, 1))

    def input_map(self, data: bytes, where: str) -> np.ndarray:
        array = decode_map(data, self.encoding, self.channels, where)
        if array.shape[-2:] != self.shard_size:
            raise DataError(f"{where}: map is {array.shape[-2:]}, manifest says {self.shard_size}")
        if self.out_size != self.shard_size:
            if self.encoding == "ids":
                array = cv2.resize(array, self.out_size[::-1], interpolation=cv2.INTER_NEAREST)
            else:
                array = np.stack([cv2.resize(c, self.out_size[::-1], interpolation=cv2.INTER_LINEAR) for c in array])
        return array.astype(np.int32) if array.dtype == np.uint16 else array  # torch lacks full uint16 support

    def flow(self, data: bytes, where: str) -> np.ndarray:
        flow = decode_npy(data, where)
        if flow.dtype != np.float16 or flow.shape != (2, *self.shard_size):
            raise DataError(f"{where}: flow must be float16 (2, {self.shard_size[0]}, {self.shard_size[1]}), "
                            f"got {flow.dtype} {flow.shape}")
        if self.out_size == self.shard_size:
            return flow
        # Positions scale with the image (pixel centres: p' = (p + 0.5) * s - 0.5); invalid stays NaN.
        h, w = self.shard_size
        scale = np.array([self.out_size[0] / h, self.out_size[1] / w], np.float32)[:, None, None]
        scaled = (flow.astype(np.float32) + 0.5) * scale - 0.5
        return np.stack([cv2.resize(c, self.out_size[::-1], interpolation=cv2.INTER_NEAREST)
                         for c in scaled]).astype(np.float16)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        key, url = sample["__key__"], sample.get("__url__", "?")
        where = f"{url}: sample {key}"
        missing = [m for m in REQUIRED if m not in sample]
        if missing:
            raise DataError(f"{where}: missing members {missing}")
        pseudo = uses_pseudo(key, self.real_exemplar_prob, self.seed, self.epoch)
        out: dict[str, Any] = {"key": key, "is_pseudo": pseudo,
                               "meta": json.loads(sample["meta.json"]),
                               "image": self.image(sample["image.jpg"], f"{where} image.jpg"),
                               "input_map": self.input_map(sample["input.png"], f"{where} input.png")}
        both = self.mode == "both"
        if pseudo or both:
            out["pseudo"] = self.image(sample["pseudo.jpg"], f"{where} pseudo.jpg")
            out["pseudo_map"] = self.input_map(sample["pseudo_input.png"], f"{where} pseudo_input.png")
            out["flow"] = self.flow(sample["pseudo_flow.npy"], f"{where} pseudo_flow.npy")
        else:
            out["flow"] = np.full((2, *self.out_size), np.nan, np.float16)
        if not pseudo or both:
            out["real_exemplar"] = self.image(sample["exemplar.jpg"], f"{where} exemplar.jpg")
            out["real_exemplar_map"] = self.input_map(sample["exemplar_input.png"], f"{where} exemplar_input.png")
        out["exemplar"] = out["pseudo"] if pseudo else out["real_exemplar"]
        out["exemplar_map"] = out["pseudo_map"] if pseudo else out["real_exemplar_map"]
        if not both:
            for extra in ("pseudo", "pseudo_map", "real_exemplar", "real_exemplar_map"):
                out.pop(extra, None)
        return out


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack per-sample arrays into compact tensors (cheap to pass from worker to main process)."""
    batch: dict[str, Any] = {"key": [s["key"] for s in samples], "meta": [s["meta"] for s in samples],
                             "is_pseudo": torch.tensor([s["is_pseudo"] for s in samples], dtype=torch.bool)}
    for name in samples[0]:
        if name not in batch and not name.startswith("__"):  # wds.map re-adds __key__
            batch[name] = torch.from_numpy(np.stack([s[name] for s in samples]))
    return batch


# ---------------------------------------------------------------- main process: model-ready tensors


def map_to_float(maps: torch.Tensor, encoding: str, label_nc: int) -> torch.Tensor:
    """(B, H, W) ids -> one-hot (B, label_nc, H, W); (B, C, H, W) uint8 channels -> float in [0, 1]."""
    if encoding == "ids":
        one_hot = torch.zeros(maps.shape[0], label_nc, *maps.shape[1:], dtype=torch.float32)
        return one_hot.scatter_(1, maps.long().unsqueeze(1), 1.0)
    return maps.float().div_(255.0)


def image_to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


def to_model_batch(raw: dict[str, Any], encoding: str, label_nc: int) -> dict[str, Any]:
    batch = {"key": raw["key"], "meta": raw["meta"], "is_pseudo": raw["is_pseudo"]}
    for name in ("image", "exemplar", "pseudo", "real_exemplar"):
        if name in raw:
            batch[name] = image_to_float(raw[name])
    for name in ("input_map", "exemplar_map", "pseudo_map", "real_exemplar_map"):
        if name in raw:
            if encoding == "ids" and int(raw[name].max()) >= label_nc:
                raise DataError(f"samples {raw['key']}: class id {int(raw[name].max())} >= label_nc {label_nc}")
            batch[name] = map_to_float(raw[name], encoding, label_nc)
    flow = raw["flow"].float()
    valid = torch.isfinite(flow).all(dim=1, keepdim=True) & raw["is_pseudo"].view(-1, 1, 1, 1)
    batch["flow"] = torch.nan_to_num(flow, nan=0.0) * valid
    batch["flow_valid"] = valid
    return batch


def _worker_init(_: int) -> None:
    cv2.setNumThreads(1)  # one decoding thread per worker process; the workers are the parallelism


class ShardLoader:
    """Iterable of batch dicts over one split. Each iter() is one epoch; the epoch number seeds shuffling
    and the pseudo/real choice, and advances after every iter() unless set with set_epoch()."""

    def __init__(self, manifest: dict[str, Any], shard_dir: Path, *, batch_size: int, split: str,
                 image_size: tuple[int, int], label_nc: int, real_exemplar_prob: float, infinite: bool,
                 epoch_samples: int | None, num_workers: int, seed: int, mode: str, shuffle: bool,
                 shuffle_buffer: int, rank: int, world_size: int):
        info = manifest["splits"].get(split)
        if not info or not info["shards"]:
            raise DataError(f"{shard_dir}: no {split!r} shards in the manifest")
        self.paths = [str(shard_dir / s["name"]) for s in info["shards"]]
        self.counts = {str(shard_dir / s["name"]): s["samples"] for s in info["shards"]}
        missing = [p for p in self.paths if not Path(p).exists()]
        if missing:
            raise DataError(f"shards listed in {shard_dir}/manifest.json are missing: {missing[:3]}")
        self.encoding, self.channels = manifest["input_encoding"], manifest["input_channels"]
        self.shard_size, self.image_size = tuple(manifest["image_size"]), image_size
        self.label_nc, self.batch_size, self.split = label_nc, batch_size, split
        self.real_exemplar_prob, self.infinite, self.num_workers = real_exemplar_prob, infinite, num_workers
        self.seed, self.mode, self.shuffle, self.shuffle_buffer = seed, mode, shuffle, shuffle_buffer
        self.rank, self.world_size = rank, world_size
        self.total_samples = info["samples"]
        self.epoch_samples = epoch_samples or math.ceil(self.total_samples / world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rank_shards(self, epoch: int) -> list[str]:
        return epoch_shard_order(self.paths, self.seed, epoch, self.shuffle)[self.rank :: self.world_size]

    def workers(self) -> int:
        """DataLoader workers actually used: never more than this rank's shards in finite mode (an idle
        worker would find no samples)."""
        if self.infinite:
            return self.num_workers
        return min(self.num_workers, len(self.paths[self.rank :: self.world_size]))

    def batches_per_worker(self) -> int:
        """Infinite mode: batches each worker yields, so every rank yields the same count."""
        batches = max(1, math.ceil(self.epoch_samples / self.batch_size))
        return math.ceil(batches / max(1, self.num_workers))

    def __len__(self) -> int:
        if self.infinite:
            return self.batches_per_worker() * max(1, self.num_workers)
        shards, workers = self.rank_shards(self.epoch), max(1, self.workers())
        return sum(math.ceil(sum(self.counts[p] for p in shards[w::workers]) / self.batch_size)
                   for w in range(workers))

    def pipeline(self, epoch: int) -> wds.DataPipeline:
        decoder = SampleDecoder(encoding=self.encoding, channels=self.channels, mode=self.mode,
                                real_exemplar_prob=self.real_exemplar_prob, seed=self.seed, epoch=epoch,
                                shard_size=self.shard_size, out_size=self.image_size)
        stages = [ShardList(self.paths, self.rank, self.world_size, self.seed, epoch, self.shuffle, self.infinite),
                  read_tar_samples]
        if self.shuffle and self.shuffle_buffer > 1:
            stages.append(ShuffleStage(self.shuffle_buffer, self.seed, epoch, self.rank))
        stages += [wds.map(decoder), wds.batched(self.batch_size, collation_fn=collate, partial=not self.infinite)]
        pipeline = wds.DataPipeline(*stages)
        if self.infinite:
            pipeline = pipeline.with_epoch(nbatches=self.batches_per_worker())
        return pipeline

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self.epoch
        self.epoch += 1
        workers = self.workers()
        if not self.infinite and not self.paths[self.rank :: self.world_size]:
            return  # this rank has no shard in a finite epoch (fewer shards than ranks)
        loader = DataLoader(self.pipeline(epoch), batch_size=None, num_workers=workers,
                            worker_init_fn=_worker_init if workers else None,
                            prefetch_factor=4 if workers else None, persistent_workers=False)
        for raw in loader:
            yield to_model_batch(raw, self.encoding, self.label_nc)


def make_loader(shard_dir_or_manifest: str | Path, *, batch_size: int, split: str = "train",
                image_size: int | tuple[int, int], label_nc: int, real_exemplar_prob: float = 0.0,
                infinite: bool = False, epoch_samples: int | None = None, num_workers: int = 2, seed: int = 0,
                mode: str = "train", shuffle: bool | None = None, shuffle_buffer: int = 256,
                rank: int | None = None, world_size: int | None = None) -> ShardLoader:
    """Batches from the shards of one split (see the module docstring for the batch keys).

    infinite: resample shards with replacement; every rank then yields exactly
        ceil(ceil(epoch_samples / batch_size) / workers) * workers batches per epoch (DDP-safe);
        epoch_samples defaults to the split's samples / world_size.
    shuffle: default True for "train", False otherwise.
    rank, world_size: default to RANK / WORLD_SIZE from the environment (Ray Train sets them).
    """
    manifest, shard_dir = read_manifest(shard_dir_or_manifest)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not 0.0 <= real_exemplar_prob <= 1.0:
        raise ValueError(f"real_exemplar_prob must be in [0, 1], got {real_exemplar_prob}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    expected = manifest["label_nc"]
    if label_nc != expected:
        raise DataError(f"label_nc {label_nc} does not match the shards' {expected} "
                        f"({manifest['source']} {manifest['task']}, {shard_dir}/manifest.json)")
    rank, world_size = rank_and_world(rank, world_size)
    return ShardLoader(manifest, shard_dir, batch_size=batch_size, split=split, image_size=as_size(image_size),
                       label_nc=label_nc, real_exemplar_prob=real_exemplar_prob, infinite=infinite,
                       epoch_samples=epoch_samples, num_workers=num_workers, seed=seed, mode=mode,
                       shuffle=(split == "train") if shuffle is None else shuffle, shuffle_buffer=shuffle_buffer,
                       rank=rank, world_size=world_size)
