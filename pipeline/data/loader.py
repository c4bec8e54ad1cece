"""WebDataset shards -> compact batches, split across ranks and DataLoader workers; `to_model` expands them.

    loader = make_loader("data/shards", batch_size=8, split="train", real_exemplar_prob=0.2)
    for batch in loader:                     # one epoch; iterating again starts the next one (or set_epoch)
        inputs = to_model(batch, loader.label_nc, device)

A batch stays compact until it reaches the device that runs the model (1 byte per pixel and channel):
    image, exemplar           (B, 3, H, W) uint8 RGB   x_B, and y_B: a pseudo exemplar or the real one
    input_map, exemplar_map   (B, H, W) uint8 (int16 above 256 classes) class ids, or (B, C, H, W) uint8 channels
    is_pseudo                 (B,) bool                which of the two y_B is
    key                       list[str]
with_flow=True (evaluation) adds the epoch's pseudo exemplar beside the chosen one, with its ground truth:
    pseudo, pseudo_map        as exemplar, exemplar_map
    flow                      (B, 2, H, W) float16: (y, x) in `pseudo` of each x_B pixel, NaN where invalid
    meta                      list[dict] (source, names, pairing, synthetic palettes)

An epoch is a function of (seed, epoch): the shard order, each worker's shuffle buffer, and per sample (from
seed, epoch, key) its pair (pseudo with probability 1 - real_exemplar_prob) and its pseudo exemplar (epochs walk
a per-key permutation of the stored ones): a resumed run replays it. Shards go to ranks (RANK/WORLD_SIZE, as
Ray Train sets them), then to DataLoader workers: an epoch over all of them reads every sample exactly once.
Nothing is unpickled: members are decoded as JPEG, PNG, NPY (allow_pickle=False) and JSON, others ignored.
"""
from __future__ import annotations

import math
import multiprocessing
import random
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from pipeline.data.errors import DataError
from pipeline.data.imageio import bgr_to_planar_rgb, decode_jpeg_bgr, decode_json, decode_map, decode_npy
from pipeline.data.schema import pseudo_members, read_manifest, stable_hash

IMAGES, MAPS = ("image", "exemplar", "pseudo"), ("input_map", "exemplar_map", "pseudo_map")
REAL = ("exemplar.jpg", "exemplar_input.png")  # the real exemplar's members


def uses_pseudo(key: str, real_exemplar_prob: float, seed: int, epoch: int) -> bool:
    """The sample's pair this epoch: pseudo with probability 1 - real_exemplar_prob."""
    return stable_hash(seed, "pair", epoch, key) / 2**63 >= real_exemplar_prob


def pseudo_variant(key: str, variants: int, seed: int, epoch: int) -> int:
    """The sample's pseudo exemplar this epoch: epochs walk a per-key permutation of the stored ones."""
    cycle, position = divmod(epoch, variants)
    order = random.Random(stable_hash(seed, "variants", cycle, key)).sample(range(variants), variants)
    return order[position]


def shared_epoch() -> Any:
    """The epoch number in shared memory (.value): persistent DataLoader workers read the current one."""
    return multiprocessing.Value("q", 0, lock=False)


class EpochShards(IterableDataset):
    """{"url": path} of every shard in this epoch's order (the same on every rank, so rank slices partition it)."""

    def __init__(self, paths: list[str], seed: int, epoch: Any, shuffle: bool):
        super().__init__()
        self.paths, self.seed, self.epoch, self.shuffle = paths, seed, epoch, shuffle

    def __iter__(self) -> Iterator[dict[str, str]]:
        order = list(self.paths)
        if self.shuffle:
            random.Random(stable_hash(self.seed, "shards", self.epoch.value)).shuffle(order)
        yield from ({"url": url} for url in order)


class EpochShuffle:
    """wds.shuffle seeded by (seed, epoch, rank, worker): reproducible, unlike its default seed."""

    def __init__(self, buffer: int, seed: int, epoch: Any):
        self.buffer, self.seed, self.epoch = buffer, seed, epoch

    def __call__(self, samples: Iterator[dict]) -> Iterator[dict]:
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        seed = stable_hash(self.seed, "buffer", self.epoch.value, rank, worker)
        return wds.shuffle(self.buffer, initial=self.buffer, seed=seed)(samples)


def unreadable(exc: Exception) -> bool:
    """WebDataset's error handler: a shard that is not a complete tar is an error naming it."""
    url = next((a for a in reversed(exc.args) if isinstance(a, str) and a.endswith(".tar")), "a shard")
    raise DataError(f"{url}: unreadable tar ({exc.args[0] if exc.args else type(exc).__name__})") from exc


def member(sample: dict[str, Any], name: str) -> tuple[bytes, str]:
    """A member's bytes, and where it is for errors."""
    where = f"{sample['__url__']}: sample {sample['__key__']} {name}"
    if name not in sample:
        raise DataError(f"{where}: missing member")
    return sample[name], where


class Decoder:
    """A raw sample (member bytes) -> the compact arrays of its pair, checked against the manifest."""

    def __init__(self, manifest: dict[str, Any], real_exemplar_prob: float, seed: int, epoch: Any,
                 with_flow: bool):
        self.size, self.label_nc = tuple(manifest["image_size"]), manifest["label_nc"]
        self.encoding, self.channels = manifest["input_encoding"], manifest["input_channels"]
        self.variants, self.real_exemplar_prob = manifest["pseudo_per_image"], real_exemplar_prob
        self.seed, self.epoch, self.with_flow = seed, epoch, with_flow

    def image(self, data: bytes, where: str) -> np.ndarray:
        bgr = decode_jpeg_bgr(data, where)
        if bgr.shape[:2] != self.size:
            raise DataError(f"{where}: image is {bgr.shape[:2]}, the manifest says {self.size}")
        return bgr_to_planar_rgb(bgr, np.empty((3, *self.size), np.uint8))

    def map(self, data: bytes, where: str) -> np.ndarray:
        array = decode_map(data, self.encoding, self.channels, where)
        if array.shape[-2:] != self.size:
            raise DataError(f"{where}: map is {array.shape[-2:]}, the manifest says {self.size}")
        if self.encoding == "ids" and array.max() >= self.label_nc:
            raise DataError(f"{where}: class id {int(array.max())} >= label_nc {self.label_nc}")
        return array.astype(np.uint8 if self.encoding != "ids" or self.label_nc <= 256 else np.int16)

    def flow(self, data: bytes, where: str) -> np.ndarray:
        flow = decode_npy(data, where)
        if flow.dtype != np.float16 or flow.shape != (2, *self.size):
            raise DataError(f"{where}: flow must be float16 (2, *{self.size}), got {flow.dtype} {flow.shape}")
        return flow

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        key, epoch = sample["__key__"], self.epoch.value
        pseudo = uses_pseudo(key, self.real_exemplar_prob, self.seed, epoch)
        photo, photo_map, flow = pseudo_members(pseudo_variant(key, self.variants, self.seed, epoch))
        out = {"key": key, "is_pseudo": pseudo}
        out["image"], out["input_map"] = self.pair(sample, "image.jpg", "input.png")
        out["exemplar"], out["exemplar_map"] = self.pair(sample, *((photo, photo_map) if pseudo else REAL))
        if self.with_flow:
            out["pseudo"], out["pseudo_map"] = (out["exemplar"], out["exemplar_map"]) if pseudo else \
                self.pair(sample, photo, photo_map)
            out["flow"], out["meta"] = self.flow(*member(sample, flow)), decode_json(*member(sample, "meta.json"))
        return out

    def pair(self, sample: dict[str, Any], image: str, map_: str) -> tuple[np.ndarray, np.ndarray]:
        return self.image(*member(sample, image)), self.map(*member(sample, map_))


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Samples -> one batch: arrays stacked into tensors, keys and meta as lists (wds.map's __key__ dropped)."""
    batch: dict[str, Any] = {}
    for name, first in samples[0].items():
        if name.startswith("__"):
            continue
        values = [s[name] for s in samples]
        batch[name] = torch.from_numpy(np.stack(values)) if isinstance(first, np.ndarray) else \
            torch.tensor(values) if name == "is_pseudo" else values
    return batch


def to_model(batch: dict[str, Any], label_nc: int, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A compact batch -> the model's tensors on `device`, expanded there (only the compact bytes are copied,
    asynchronously from pinned memory): images (B, 3, H, W) float in [-1, 1]; class ids one-hot (B, label_nc, H, W),
    channel maps in [0, 1]; flow float32 (0 where invalid) with flow_valid (B, 1, H, W) bool. Keys and meta as given."""
    out: dict[str, Any] = {}
    for name, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
        if name in IMAGES:
            value = value.float().mul_(2 / 255).sub_(1)
        elif name in MAPS and value.dim() == 3:
            value = torch.zeros(value.shape[0], label_nc, *value.shape[1:], device=value.device) \
                .scatter_(1, value.long().unsqueeze(1), 1.0)
        elif name in MAPS:
            value = value.float().mul_(1 / 255)
        elif name == "flow":
            out["flow_valid"] = ~value[:, :1].isnan()
            value = value.float().nan_to_num_(0.0)
        out[name] = value
    return out


class ShardLoader:
    """Batches of one split, epoch after epoch: each iter() is one epoch, numbered from 0 unless set_epoch()."""

    def __init__(self, manifest: dict[str, Any], shard_dir: Path, split: str, *, batch_size: int,
                 real_exemplar_prob: float, with_flow: bool, num_workers: int, seed: int, shuffle: bool,
                 shuffle_buffer: int, pin_memory: bool, prefetch_factor: int):
        info = manifest["splits"].get(split)
        if not info or not info["shards"]:
            raise DataError(f"{shard_dir}: no {split!r} shards in the manifest")
        self.paths = [str(shard_dir / s["name"]) for s in info["shards"]]
        missing = [p for p in self.paths if not Path(p).exists()]
        if missing:
            raise DataError(f"shards listed in {shard_dir}/manifest.json are missing: {missing[:3]}")
        self.counts = dict(zip(self.paths, (s["samples"] for s in info["shards"])))
        self.manifest, self.where = manifest, shard_dir / "manifest.json"
        self.image_size, self.label_nc = tuple(manifest["image_size"]), manifest["label_nc"]
        self.batch_size, self.samples = batch_size, info["samples"]
        self.rank, self.world_size, _, _ = wds.utils.pytorch_worker_info()
        self.workers = min(num_workers, len(self.paths[self.rank :: self.world_size]))  # none idle
        self.epoch, self.shared_epoch = 0, shared_epoch()
        stages = [EpochShards(self.paths, seed, self.shared_epoch, shuffle), wds.split_by_node, wds.split_by_worker,
                  wds.tarfile_to_samples(handler=unreadable)]
        if shuffle and shuffle_buffer > 1:
            stages.append(EpochShuffle(shuffle_buffer, seed, self.shared_epoch))
        stages += [wds.map(Decoder(manifest, real_exemplar_prob, seed, self.shared_epoch, with_flow)),
                   wds.batched(batch_size, collation_fn=collate, partial=True)]
        self.dataloader = DataLoader(wds.DataPipeline(*stages), batch_size=None, num_workers=self.workers,
                                     persistent_workers=self.workers > 0, pin_memory=pin_memory,
                                     prefetch_factor=prefetch_factor if self.workers else None,
                                     generator=torch.Generator().manual_seed(seed))  # not the global RNG

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch  # of the next iter()

    def check_fits(self, cfg: Any, what: str) -> None:
        """The shards' images and maps must be what `what` takes (cfg: a ModelConfig)."""
        if (self.image_size, self.label_nc) != (tuple(cfg.image_size), cfg.label_nc):
            raise DataError(f"{self.where}: shards are {self.image_size} with {self.label_nc} input channels, "
                            f"{what} takes {tuple(cfg.image_size)} with {cfg.label_nc}")

    def __len__(self) -> int:
        """Batches this rank reads in an epoch."""
        shards, workers = self.paths[self.rank :: self.world_size], max(1, self.workers)
        return sum(math.ceil(sum(self.counts[p] for p in shards[w::workers]) / self.batch_size)
                   for w in range(workers))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.shared_epoch.value, self.epoch = self.epoch, self.epoch + 1
        if self.paths[self.rank :: self.world_size]:  # fewer shards than ranks: this one has none
            yield from self.dataloader


def make_loader(shards: str | Path, *, batch_size: int, split: str = "train", real_exemplar_prob: float = 0.0,
                with_flow: bool = False, num_workers: int = 2, seed: int = 0, shuffle: bool | None = None,
                shuffle_buffer: int = 256, pin_memory: bool = False, prefetch_factor: int = 2) -> ShardLoader:
    """Compact batches of one split of a shard folder (or its manifest.json); see the module docstring. shuffle:
    default True for "train". pin_memory: for a CUDA device (to_model then copies asynchronously)."""
    if not 0.0 <= real_exemplar_prob <= 1.0:
        raise ValueError(f"real_exemplar_prob must be in [0, 1], got {real_exemplar_prob}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    manifest, shard_dir = read_manifest(shards)
    return ShardLoader(manifest, shard_dir, split, batch_size=batch_size, real_exemplar_prob=real_exemplar_prob,
                       with_flow=with_flow, num_workers=num_workers, seed=seed,
                       shuffle=(split == "train") if shuffle is None else shuffle, shuffle_buffer=shuffle_buffer,
                       pin_memory=pin_memory, prefetch_factor=prefetch_factor)
