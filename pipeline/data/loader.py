"""WebDataset shards -> compact batches, split across ranks and DataLoader workers; `to_model` expands them.

    loader = make_loader("data/shards", batch_size=8, split="train", real_exemplar_prob=0.2, video_like=False)
    for batch in loader:                     # one epoch; iterating again starts the next one (or set_epoch)
        inputs = to_model(batch, loader.label_nc, device)

A batch stays compact (1 byte per pixel and channel) until it reaches the device that runs the model:
    image, exemplar           (B, 3, H, W) uint8 RGB   x_B, and y_B: a pseudo exemplar, the self pair or the real one
    input_map, exemplar_map   (B, H, W) uint8 (int16 above 256 classes) class ids, or (B, C, H, W) uint8 channels
    is_pseudo                 (B,) bool: y_B is a supervised pair (pseudo exemplar or self pair: the official
                              self_ref, which gates the pixel-level losses), not the real exemplar
    pair, key                 list[str]: "pseudo", "self" or "real", which y_B is; the sample keys
with_flow=True (evaluation) adds the epoch's pseudo exemplar beside the chosen one, with its ground truth:
    pseudo, pseudo_map        as exemplar, exemplar_map
    flow, meta                (B, 2, H, W) float16 (y, x) in `pseudo` of each x_B pixel, NaN where invalid; list[dict]

An epoch is a function of (seed, epoch): the shard order, each worker's shuffle buffer, and per sample (from
seed, epoch, key) its pair (supervised with probability 1 - real_exemplar_prob, else the real exemplar) and its
pseudo exemplar (epochs walk a per-key permutation of the stored ones): a resumed run replays it. video_like
(the official --video_like) makes a supervised pair the sample's stored self pair where it has one, the pseudo
exemplar otherwise. Shards go to ranks (RANK/WORLD_SIZE, as Ray Train sets them), then to DataLoader workers:
an epoch over all of them reads every sample exactly once.
Each process checks a shard's size and sha256 against the manifest when it first opens it (verify=). Only the
members a sample shows are read, decoded as JPEG, PNG, NPY (allow_pickle=False) or JSON: no pickle.
The stages that depend on the epoch read it from a multiprocessing.Value, which persistent workers see change.
"""
from __future__ import annotations

import functools
import math
import multiprocessing
import os
import random
import tarfile
from pathlib import Path
from typing import Any, Callable, Container, Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, get_worker_info

from pipeline.data.errors import DataError
from pipeline.data.imageio import bgr_to_planar_rgb, decode_jpeg_bgr, decode_json, decode_map, decode_npy
from pipeline.data.schema import (SELF_MEMBERS, VERIFY, pseudo_members, read_manifest, require_self_pairs, stable_hash,
                                  verify_shard)

IMAGES, MAPS = ("image", "exemplar", "pseudo"), ("input_map", "exemplar_map", "pseudo_map")


def pseudo_variant(key: str, variants: int, seed: int, epoch: int) -> int:
    """The sample's pseudo exemplar this epoch: epochs walk a per-key permutation of the stored ones."""
    cycle, position = divmod(epoch, variants)
    return random.Random(stable_hash(seed, "variants", cycle, key)).sample(range(variants), variants)[position]


def epoch_shards(shards: dict[str, dict[str, Any]], seed: int, epoch: Any, shuffle: bool) -> Iterator[dict[str, Any]]:
    """{"url": path, "manifest": its manifest entry} of every shard in this epoch's order (the same on every rank, so
    rank slices partition it)."""
    order = list(shards)
    if shuffle:
        random.Random(stable_hash(seed, "shards", epoch.value)).shuffle(order)
    yield from ({"url": url, "manifest": shards[url]} for url in order)


def epoch_shuffle(samples: Iterator[dict], buffer: int, seed: int, epoch: Any) -> Iterator[dict]:
    """wds.shuffle seeded by (seed, epoch, rank, worker): reproducible, unlike its default seed."""
    rank, _, worker, _ = wds.utils.pytorch_worker_info()
    return wds.shuffle(buffer, initial=buffer, seed=stable_hash(seed, "buffer", epoch.value, rank, worker))(samples)


@functools.lru_cache(maxsize=None)
def tar_index(url: str, version: tuple[int, int]) -> tuple[tuple[str, dict[str, tuple[int, int]]], ...]:
    """(key, {member: (offset, size)}) of every sample of a shard, as WebDataset groups them, read once per process
    and file version (mtime, size): later epochs seek straight to the members they need, parsing no tar header."""
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with tarfile.open(url, mode="r:") as tar:
            for info in (i for i in tar if i.isreg()):
                key, _, name = info.name.partition(".")
                samples.setdefault(key, {})[name] = (info.offset_data, info.size)
            # tarfile takes a file cut at a header, or in the last member's data, for the end of the archive
            if tar.offset + 2 * tarfile.BLOCKSIZE > version[1]:
                raise tarfile.ReadError(f"truncated: no end-of-archive blocks after byte {tar.offset}, "
                                        f"the file has {version[1]}")
    except tarfile.TarError as exc:
        raise DataError(f"{url}: unreadable tar ({exc})") from None
    return tuple(samples.items())


def read_tars(shards: Iterator[dict[str, Any]], members_of: Callable[[str, Container[str]], list[str]],
              verify: str = "full") -> Iterator[dict]:
    """{"url", "manifest"} -> samples {"__key__", "__url__", "__members__", member: bytes} of the members
    members_of(key, the sample's member names) names, one read each, from a shard verified against its manifest
    entry (verify_shard). (wds.tarfile_to_samples streams every byte of every member: with several pseudo
    exemplars per sample, that cost as much CPU as decoding.)"""
    for shard in shards:
        url, entry = shard["url"], shard["manifest"]
        with open(url, "rb") as stream:
            stat = os.fstat(stream.fileno())
            version = (stat.st_mtime_ns, stat.st_size)
            verify_shard(url, version, entry["sha256"], entry["bytes"], verify)
            for key, members in tar_index(url, version):
                sample = {"__key__": key, "__url__": url, "__members__": members.keys()}
                for name in members_of(key, members):
                    if name not in members:
                        raise DataError(f"{url}: sample {key} has no member {name}")
                    offset, size = members[name]
                    stream.seek(offset)  # tar_index found every member complete
                    sample[name] = stream.read(size)
                yield sample


class BatchDecoder:
    """Raw samples -> one compact batch of this epoch's pairs, each member decoded straight into its row and checked
    against the manifest. In a DataLoader worker the batch is made in shared memory: sending it copies nothing."""

    def __init__(self, manifest: dict[str, Any], real_exemplar_prob: float, seed: int, epoch: Any,
                 with_flow: bool, video_like: bool = False):
        self.size, self.label_nc = tuple(manifest["image_size"]), manifest["label_nc"]
        self.encoding, self.channels = manifest["input_encoding"], manifest["input_channels"]
        self.variants, self.real_exemplar_prob = manifest["pseudo_per_image"], real_exemplar_prob
        self.seed, self.epoch, self.with_flow, self.video_like = seed, epoch, with_flow, video_like
        ids = self.encoding == "ids"
        image = ((3, *self.size), torch.uint8, self.image)
        map_ = (self.size if ids else (self.channels, *self.size), torch.int16 if ids and self.label_nc > 256
                else torch.uint8, self.map)
        self.fields = {**dict.fromkeys(IMAGES, image), **dict.fromkeys(MAPS, map_),
                       "flow": ((2, *self.size), torch.float16, self.flow)}

    def plan(self, key: str, available: Container[str]) -> tuple[str, dict[str, str]]:
        """-> (pair: "pseudo", "self" or "real", {batch field: member}) of the sample this epoch. available: the
        sample's member names (whether it has a self pair)."""
        epoch = self.epoch.value
        supervised = stable_hash(self.seed, "pair", epoch, key) / 2**63 >= self.real_exemplar_prob
        photo, photo_map, flow = pseudo_members(pseudo_variant(key, self.variants, self.seed, epoch))
        if not supervised:
            pair, exemplar = "real", ("exemplar.jpg", "exemplar_input.png")
        elif self.video_like and SELF_MEMBERS[0] in available:
            pair, exemplar = "self", SELF_MEMBERS
        else:
            pair, exemplar = "pseudo", (photo, photo_map)
        fields = {"image": "image.jpg", "input_map": "input.png", "exemplar": exemplar[0], "exemplar_map": exemplar[1]}
        if self.with_flow:
            fields.update(pseudo=photo, pseudo_map=photo_map, flow=flow)
        return pair, fields

    def members(self, key: str, available: Container[str]) -> list[str]:
        return list(dict.fromkeys(self.plan(key, available)[1].values())) + (["meta.json"] if self.with_flow else [])

    def image(self, out: np.ndarray, data: bytes, where: str) -> None:
        bgr = decode_jpeg_bgr(data, where)
        if bgr.shape[:2] != self.size:
            raise DataError(f"{where}: image is {bgr.shape[:2]}, the manifest says {self.size}")
        bgr_to_planar_rgb(bgr, out)

    def map(self, out: np.ndarray, data: bytes, where: str) -> None:
        array = decode_map(data, self.encoding, self.channels, where)
        if array.shape[-2:] != self.size:
            raise DataError(f"{where}: map is {array.shape[-2:]}, the manifest says {self.size}")
        if self.encoding == "ids" and array.max() >= self.label_nc:
            raise DataError(f"{where}: class id {int(array.max())} >= label_nc {self.label_nc}")
        out[...] = array

    def flow(self, out: np.ndarray, data: bytes, where: str) -> None:
        flow = decode_npy(data, where)
        if flow.dtype != np.float16 or flow.shape != (2, *self.size):
            raise DataError(f"{where}: flow must be float16 (2, *{self.size}), got {flow.dtype} {flow.shape}")
        out[...] = flow

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        plans = [self.plan(s["__key__"], s["__members__"]) for s in samples]
        batch: dict[str, Any] = {"key": [s["__key__"] for s in samples], "pair": [pair for pair, _ in plans],
                                 "is_pseudo": torch.tensor([pair != "real" for pair, _ in plans])}
        for field in plans[0][1]:
            shape, dtype, decode = self.fields[field]
            batch[field] = torch.empty((len(samples), *shape), dtype=dtype)
            if get_worker_info() is not None:
                batch[field].share_memory_()  # of untouched pages: nothing to copy yet
            rows, twin = batch[field].numpy(), field.replace("pseudo", "exemplar")
            for i, (sample, (pair, members)) in enumerate(zip(samples, plans)):
                if field.startswith("pseudo") and pair == "pseudo":  # decoded once already, as the exemplar
                    rows[i] = batch[twin][i].numpy()
                else:
                    name = members[field]
                    decode(rows[i], sample[name], f"{sample['__url__']}: {sample['__key__']}.{name}")
        if self.with_flow:
            batch["meta"] = [decode_json(s["meta.json"], f"{s['__url__']}: {s['__key__']}.meta.json") for s in samples]
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
    """Compact batches of one split of a shard folder (or its manifest.json), epoch after epoch: each iter() is one
    epoch, numbered from 0 unless set_epoch(). real_exemplar_prob, video_like: which y_B each sample gets (module
    docstring; video_like needs shards with self pairs). shuffle: default True for "train". pin_memory: for a CUDA
    device (to_model then copies asynchronously). verify: each shard against its manifest entry when this process first
    opens it: "full" (sha256 and size, the default: one extra read), "size", or "none". See the module docstring."""

    def __init__(self, shards: str | Path, *, batch_size: int, split: str = "train", real_exemplar_prob: float = 0.0,
                 video_like: bool = False, with_flow: bool = False, num_workers: int = 2, seed: int = 0,
                 shuffle: bool | None = None, shuffle_buffer: int = 256, pin_memory: bool = False,
                 prefetch_factor: int = 2, verify: str = "full"):
        if not 0.0 <= real_exemplar_prob <= 1.0 or batch_size < 1:
            raise ValueError(f"need 0 <= real_exemplar_prob <= 1, batch_size >= 1: {real_exemplar_prob}, {batch_size}")
        if verify not in VERIFY:
            raise ValueError(f"verify must be one of {VERIFY}, got {verify!r}")
        manifest, shard_dir = read_manifest(shards)
        info = manifest["splits"].get(split)
        if not info or not info["shards"]:
            raise DataError(f"{shard_dir}: no {split!r} shards in the manifest")
        if video_like:
            require_self_pairs(manifest, shard_dir / "manifest.json", split)
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
        self.epoch, self.shared_epoch = 0, multiprocessing.Value("q", 0, lock=False)
        decoder = BatchDecoder(manifest, real_exemplar_prob, seed, self.shared_epoch, with_flow, video_like)
        shuffle = split == "train" if shuffle is None else shuffle
        entries = dict(zip(self.paths, info["shards"]))
        stages = [functools.partial(epoch_shards, entries, seed, self.shared_epoch, shuffle), wds.split_by_node,
                  wds.split_by_worker, functools.partial(read_tars, members_of=decoder.members, verify=verify)]
        if shuffle and shuffle_buffer > 1:
            stages.append(functools.partial(epoch_shuffle, buffer=shuffle_buffer, seed=seed, epoch=self.shared_epoch))
        stages.append(wds.batched(batch_size, collation_fn=decoder, partial=True))
        self.dataloader = DataLoader(wds.DataPipeline(*stages), batch_size=None, num_workers=self.workers,
                                     persistent_workers=self.workers > 0, pin_memory=pin_memory,
                                     prefetch_factor=prefetch_factor if self.workers else None,
                                     generator=torch.Generator().manual_seed(seed))  # not the global RNG

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch  # of the next iter()

    def check_fits(self, cfg: Any, what: str) -> None:  # cfg: a ModelConfig
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


make_loader = ShardLoader  # what callers write: make_loader(shards, batch_size=8, ...)
