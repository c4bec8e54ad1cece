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
import multiprocessing
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
from pipeline.data.schema import MEMBERS, SHARD_FORMAT, stable_hash

MODES = ("train", "both")
PREFETCH = 2  # batches in flight per DataLoader worker


# ---------------------------------------------------------------- manifest


def read_manifest(shard_dir_or_manifest: str | Path) -> tuple[dict[str, Any], Path]:
    """-> (manifest, folder of the shards). Accepts the shard folder or its manifest.json."""
    path = Path(shard_dir_or_manifest)
    manifest_path = path / "manifest.json" if path.is_dir() else path
    manifest = read_json(manifest_path)
    if manifest.get("format") != SHARD_FORMAT:
        raise DataError(f"{manifest_path}: not a shard manifest of format {SHARD_FORMAT}")
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


class SharedEpoch:
    """The epoch number in shared memory: persistent DataLoader workers read the current one."""

    def __init__(self, epoch: int = 0):
        self._value = multiprocessing.Value("q", epoch, lock=False)

    def get(self) -> int:
        return self._value.value

    def set(self, epoch: int) -> None:
        self._value.value = epoch


class ShardList(IterableDataset):
    """Yields {"url": path} for the shards this rank and worker read in the current epoch."""

    def __init__(self, paths: list[str], rank: int, world_size: int, seed: int, epoch: SharedEpoch,
                 shuffle: bool, resampled: bool):
        super().__init__()
        self.paths, self.rank, self.world_size = list(paths), rank, world_size
        self.seed, self.epoch, self.shuffle, self.resampled = seed, epoch, shuffle, resampled

    def __iter__(self) -> Iterator[dict[str, str]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        epoch = self.epoch.get()
        if self.resampled:  # independent draws with replacement per rank and worker, forever
            rng = random.Random(stable_hash(self.seed, "resample", epoch, self.rank, worker))
            while True:
                yield {"url": rng.choice(self.paths)}
        order = epoch_shard_order(self.paths, self.seed, epoch, self.shuffle)
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

    def __init__(self, buffer_size: int, seed: int, epoch: SharedEpoch, rank: int):
        self.buffer_size, self.seed, self.epoch, self.rank = buffer_size, seed, epoch, rank

    def __call__(self, samples: Iterator[dict]) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info else 0
        seed = stable_hash(self.seed, "buffer", self.epoch.get(), self.rank, worker)
        return shuffle_samples(samples, self.buffer_size, seed)


def uses_pseudo(key: str, real_exemplar_prob: float, seed: int, epoch: int) -> bool:
    """Per-sample choice of pair, a function of (seed, epoch, key) only: the same whichever worker reads it."""
    if real_exemplar_prob <= 0:
        return True
    if real_exemplar_prob >= 1:
        return False
    u = stable_hash(seed, "pair", epoch, key) / 2**63
    return u >= real_exemplar_prob


class BufferRing:
    """Batch tensors in shared memory, reused round-robin by one DataLoader worker.

    Why: handing a fresh tensor to the main process puts it in new shared memory, and faulting in
    those pages cost more than decoding the images (about 0.7 ms per MB on the 2-core VM). Reused
    slots stay mapped. Safe because the DataLoader keeps at most prefetch_factor * num_workers
    batches in flight and the loader turns every batch into new tensors before asking for the next:
    a slot is rewritten only `slots` batches later (slots >= prefetch_factor * num_workers + 2).
    """

    def __init__(self, slots: int):
        self.slots, self.turn, self.tensors = slots, 0, {}

    def advance(self) -> None:
        self.turn = (self.turn + 1) % self.slots

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A (shape) view of this turn's tensor `name` (a partial last batch uses the first rows)."""
        tensor = self.tensors.get((self.turn, name))
        if tensor is None or tensor.dtype != dtype or tensor.shape[1:] != shape[1:] or len(tensor) < shape[0]:
            tensor = self.tensors[(self.turn, name)] = torch.empty(shape, dtype=dtype).share_memory_()
        return tensor[: shape[0]]


class BatchDecoder:
    """Raw samples (member bytes) -> one compact batch, each member decoded straight into its slot:

        image, exemplar (+ pseudo, real_exemplar)   (B, H, W, 3) uint8
        input_map, exemplar_map (+ ...)             (B, H, W) uint8/int32 ids or (B, C, H, W) uint8
        flow                                        (B, 2, H, W) float16, NaN where invalid / real pair
        is_pseudo (B,) bool;  key, meta             lists
    """

    def __init__(self, *, encoding: str, channels: int, label_nc: int, mode: str, real_exemplar_prob: float,
                 seed: int, epoch: SharedEpoch, shard_size: tuple[int, int], out_size: tuple[int, int],
                 ring_slots: int = 0):
        self.encoding, self.channels, self.label_nc, self.mode = encoding, channels, label_nc, mode
        self.real_exemplar_prob, self.seed, self.epoch = real_exemplar_prob, seed, epoch
        self.shard_size, self.out_size = shard_size, out_size
        self.ring_slots, self.ring = ring_slots, None  # the ring is made in the worker that uses it

    def batch_array(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised batch tensor; in a worker it is in shared memory from the start (the IPC
        would copy it there otherwise), from the ring when reuse is on."""
        if get_worker_info() is None:
            return torch.empty(shape, dtype=dtype)
        if self.ring_slots:
            return self.ring.get(name, shape, dtype)
        return torch.empty(shape, dtype=dtype).share_memory_()

    def map_shape(self, n: int) -> tuple[int, ...]:
        return (n, *self.out_size) if self.encoding == "ids" else (n, self.channels, *self.out_size)

    def image_into(self, out: np.ndarray, data: bytes, where: str) -> None:
        rgb = decode_jpeg(data, where, out=out if self.out_size == self.shard_size else None)
        if rgb.shape[:2] != self.shard_size:
            raise DataError(f"{where}: image is {rgb.shape[:2]}, manifest says {self.shard_size}")
        if self.out_size != self.shard_size:
            cv2.resize(rgb, self.out_size[::-1], dst=out, interpolation=cv2.INTER_AREA)

    def map_into(self, out: np.ndarray, data: bytes, where: str) -> None:
        array = decode_map(data, self.encoding, self.channels, where)
        if array.shape[-2:] != self.shard_size:
            raise DataError(f"{where}: map is {array.shape[-2:]}, manifest says {self.shard_size}")
        if self.encoding == "ids" and array.max() >= self.label_nc:
            raise DataError(f"{where}: class id {int(array.max())} >= label_nc {self.label_nc}")
        if self.out_size != self.shard_size:
            size, nearest = self.out_size[::-1], self.encoding == "ids"
            flag = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
            array = cv2.resize(array, size, interpolation=flag) if nearest else \
                np.stack([cv2.resize(c, size, interpolation=flag) for c in array])
        out[...] = array

    def flow_into(self, out: np.ndarray, data: bytes, where: str) -> None:
        flow = decode_npy(data, where)
        if flow.dtype != np.float16 or flow.shape != (2, *self.shard_size):
            raise DataError(f"{where}: flow must be float16 (2, {self.shard_size[0]}, {self.shard_size[1]}), "
                            f"got {flow.dtype} {flow.shape}")
        if self.out_size == self.shard_size:
            out[...] = flow
            return
        # Positions scale with the image (pixel centres: p' = (p + 0.5) * s - 0.5); invalid stays NaN.
        h, w = self.shard_size
        scale = np.array([self.out_size[0] / h, self.out_size[1] / w], np.float32)[:, None, None]
        scaled = (flow.astype(np.float32) + 0.5) * scale - 0.5
        for c in range(2):
            out[c] = cv2.resize(scaled[c], self.out_size[::-1], interpolation=cv2.INTER_NEAREST)

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        n, both = len(samples), self.mode == "both"
        if self.ring_slots and get_worker_info() is not None:
            self.ring = self.ring or BufferRing(self.ring_slots)
            self.ring.advance()
        keys = [s["__key__"] for s in samples]
        epoch = self.epoch.get()
        pseudo = [uses_pseudo(k, self.real_exemplar_prob, self.seed, epoch) for k in keys]
        map_dtype = torch.uint8 if self.encoding != "ids" or self.label_nc <= 256 else torch.int32
        images = ["image", "exemplar"] + (["pseudo", "real_exemplar"] if both else [])
        maps = ["input_map", "exemplar_map"] + (["pseudo_map", "real_exemplar_map"] if both else [])
        batch: dict[str, Any] = {name: self.batch_array(name, (n, *self.out_size, 3), torch.uint8) for name in images}
        batch.update({name: self.batch_array(name, self.map_shape(n), map_dtype) for name in maps})
        batch["flow"] = self.batch_array("flow", (n, 2, *self.out_size), torch.float16)
        arrays = {name: t.numpy() for name, t in batch.items()}
        metas = []
        for i, sample in enumerate(samples):
            where = f"{sample.get('__url__', '?')}: sample {keys[i]}"
            missing = [m for m in MEMBERS if m not in sample]
            if missing:
                raise DataError(f"{where}: missing members {missing}")
            metas.append(json.loads(sample["meta.json"]))
            self.image_into(arrays["image"][i], sample["image.jpg"], f"{where} image.jpg")
            self.map_into(arrays["input_map"][i], sample["input.png"], f"{where} input.png")
            pair = ("pseudo.jpg", "pseudo_input.png") if pseudo[i] else ("exemplar.jpg", "exemplar_input.png")
            self.image_into(arrays["exemplar"][i], sample[pair[0]], f"{where} {pair[0]}")
            self.map_into(arrays["exemplar_map"][i], sample[pair[1]], f"{where} {pair[1]}")
            if pseudo[i]:
                self.flow_into(arrays["flow"][i], sample["pseudo_flow.npy"], f"{where} pseudo_flow.npy")
            else:
                arrays["flow"][i] = np.nan
            if both:  # the other pair too (the chosen one is copied, not decoded twice)
                for image, name, member, map_member in (("pseudo", "pseudo_map", "pseudo.jpg", "pseudo_input.png"),
                                                        ("real_exemplar", "real_exemplar_map", "exemplar.jpg",
                                                         "exemplar_input.png")):
                    if (image == "pseudo") == pseudo[i]:
                        arrays[image][i], arrays[name][i] = arrays["exemplar"][i], arrays["exemplar_map"][i]
                    else:
                        self.image_into(arrays[image][i], sample[member], f"{where} {member}")
                        self.map_into(arrays[name][i], sample[map_member], f"{where} {map_member}")
        batch.update(key=keys, meta=metas, is_pseudo=torch.tensor(pseudo, dtype=torch.bool))
        return batch


def keep_as_is(batch: Any) -> Any:
    """DataLoader collate_fn for ready batches (the default walks every nested meta entry)."""
    return batch


# ---------------------------------------------------------------- main process: model-ready tensors


def image_to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    if images.device.type != "cpu":
        return images.permute(0, 3, 1, 2).contiguous().float().mul_(2.0 / 255.0).sub_(1.0)
    channels_first = images.numpy().transpose(0, 3, 1, 2)
    out = np.multiply(channels_first, np.float32(2.0 / 255.0), dtype=np.float32, order="C")
    return torch.from_numpy(np.subtract(out, np.float32(1.0), out=out))


def map_to_float(maps: torch.Tensor, encoding: str, label_nc: int) -> torch.Tensor:
    """(B, H, W) ids -> one-hot (B, label_nc, H, W); (B, C, H, W) uint8 channels -> float in [0, 1]."""
    if maps.device.type != "cpu":
        if encoding != "ids":
            return maps.float().mul_(1.0 / 255.0)
        one_hot = torch.zeros(maps.shape[0], label_nc, *maps.shape[1:], device=maps.device)
        return one_hot.scatter_(1, maps.long().unsqueeze(1), 1.0)
    array = maps.numpy()
    if encoding != "ids":
        return torch.from_numpy(np.multiply(array, np.float32(1.0 / 255.0), dtype=np.float32))
    classes = np.arange(label_nc, dtype=array.dtype).reshape(1, label_nc, 1, 1)
    return torch.from_numpy(np.equal(array[:, None], classes).astype(np.float32))


def to_model_batch(raw: dict[str, Any], encoding: str, label_nc: int,
                   device: torch.device | str | None = None) -> dict[str, Any]:
    """Compact batch (uint8 images and maps, float16 flow) -> the model's float tensors on `device`.

    On the CPU the expansion uses numpy (single-threaded: it must not compete with the workers'
    cores through OpenMP). On an accelerator only the compact data is copied and expanded there:
    a one-hot map is 4 * label_nc bytes per pixel, its class ids one byte.
    """
    move = (lambda t: t.to(device, non_blocking=True)) if device is not None else (lambda t: t)
    batch = {"key": raw["key"], "meta": raw["meta"], "is_pseudo": move(raw["is_pseudo"])}
    for name in ("image", "exemplar", "pseudo", "real_exemplar"):
        if name in raw:
            batch[name] = image_to_float(move(raw[name]))
    for name in ("input_map", "exemplar_map", "pseudo_map", "real_exemplar_map"):
        if name in raw:
            batch[name] = map_to_float(move(raw[name]), encoding, label_nc)
    flow = move(raw["flow"])  # float16, NaN where invalid and everywhere for real pairs
    if flow.device.type == "cpu":
        array = flow.numpy().astype(np.float32)
        valid = ~np.isnan(array[:, :1])  # both coordinates are NaN together
        valid &= raw["is_pseudo"].numpy().reshape(-1, 1, 1, 1)
        batch["flow_valid"] = torch.from_numpy(valid)
        batch["flow"] = torch.from_numpy(np.nan_to_num(array, copy=False, nan=0.0))
    else:
        flow = flow.float()
        batch["flow_valid"] = ~torch.isnan(flow[:, :1]) & batch["is_pseudo"].view(-1, 1, 1, 1)
        batch["flow"] = flow.nan_to_num_(0.0)
    return batch


class ShardLoader:
    """Iterable of batch dicts over one split. Each iter() is one epoch; the epoch number seeds shuffling
    and the pseudo/real choice, and advances after every iter() unless set with set_epoch()."""

    def __init__(self, manifest: dict[str, Any], shard_dir: Path, *, batch_size: int, split: str,
                 image_size: tuple[int, int], label_nc: int, real_exemplar_prob: float, infinite: bool,
                 epoch_samples: int | None, num_workers: int, seed: int, mode: str, shuffle: bool,
                 shuffle_buffer: int, rank: int, world_size: int, device: torch.device | str | None):
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
        self.device = torch.device(device) if device is not None else None
        self.total_samples = info["samples"]
        self.epoch_samples = epoch_samples or math.ceil(self.total_samples / world_size)
        self.epoch = 0  # of the next iteration
        self.shared_epoch = SharedEpoch()  # what the workers read
        self.dataloaders: dict[bool, DataLoader] = {}

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

    def pipeline(self, reuse_buffers: bool) -> wds.DataPipeline:
        """The per-worker pipeline; it reads the epoch from shared memory, so workers can persist."""
        workers = self.workers()
        decoder = BatchDecoder(encoding=self.encoding, channels=self.channels, label_nc=self.label_nc,
                               mode=self.mode, real_exemplar_prob=self.real_exemplar_prob, seed=self.seed,
                               epoch=self.shared_epoch, shard_size=self.shard_size, out_size=self.image_size,
                               ring_slots=PREFETCH * workers + 2 if reuse_buffers and workers else 0)
        stages = [ShardList(self.paths, self.rank, self.world_size, self.seed, self.shared_epoch, self.shuffle,
                            self.infinite),
                  read_tar_samples]
        if self.shuffle and self.shuffle_buffer > 1:
            stages.append(ShuffleStage(self.shuffle_buffer, self.seed, self.shared_epoch, self.rank))
        stages.append(wds.batched(self.batch_size, collation_fn=decoder, partial=not self.infinite))
        pipeline = wds.DataPipeline(*stages)
        if self.infinite:
            pipeline = pipeline.with_epoch(nbatches=self.batches_per_worker())
        return pipeline

    def batches(self, reuse_buffers: bool) -> Iterator[dict[str, Any]]:
        """One epoch of compact batches from the (persistent) DataLoader workers."""
        self.shared_epoch.set(self.epoch)
        self.epoch += 1
        if not self.infinite and not self.paths[self.rank :: self.world_size]:
            return  # this rank has no shard in a finite epoch (fewer shards than ranks)
        if reuse_buffers not in self.dataloaders:
            workers = self.workers()
            # No cv2.setNumThreads in forked workers: it tears down the parent's thread pool and deadlocks.
            self.dataloaders[reuse_buffers] = DataLoader(
                self.pipeline(reuse_buffers), batch_size=None, collate_fn=keep_as_is, num_workers=workers,
                prefetch_factor=PREFETCH if workers else None, persistent_workers=workers > 0,
                pin_memory=self.device is not None and self.device.type == "cuda")
        yield from self.dataloaders[reuse_buffers]

    def compact_batches(self) -> Iterator[dict[str, Any]]:
        """One epoch of batches as the workers produce them (see BatchDecoder: (B, H, W, 3) uint8 images,
        uint8 maps, float16 flow with NaN = invalid). iter(loader) gives the model-ready tensors."""
        return self.batches(reuse_buffers=False)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # Each compact batch is expanded into new tensors before the next is requested: the workers
        # may reuse its shared memory (BufferRing).
        for raw in self.batches(reuse_buffers=True):
            yield to_model_batch(raw, self.encoding, self.label_nc, self.device)


def make_loader(shard_dir_or_manifest: str | Path, *, batch_size: int, split: str = "train",
                image_size: int | tuple[int, int], label_nc: int, real_exemplar_prob: float = 0.0,
                infinite: bool = False, epoch_samples: int | None = None, num_workers: int = 2, seed: int = 0,
                mode: str = "train", shuffle: bool | None = None, shuffle_buffer: int = 256,
                rank: int | None = None, world_size: int | None = None,
                device: torch.device | str | None = None) -> ShardLoader:
    """Batches from the shards of one split (see the module docstring for the batch keys).

    infinite: resample shards with replacement; every rank then yields exactly
        ceil(ceil(epoch_samples / batch_size) / workers) * workers batches per epoch (DDP-safe);
        epoch_samples defaults to the split's samples / world_size.
    shuffle: default True for "train", False otherwise.
    rank, world_size: default to RANK / WORLD_SIZE from the environment (Ray Train sets them).
    device: where the compact batch is expanded to float tensors (e.g. "cuda": one-hot maps are made on
        the GPU from one-byte class ids); default: the CPU, in the main process.
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
                       rank=rank, world_size=world_size, device=device)
