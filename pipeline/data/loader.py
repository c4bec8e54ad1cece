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

How a batch travels (tuned on a 2-core VM with benchmarks/loader.py; numbers in benchmarks/README.md):
* a DataLoader worker reads each tar member with one read (read_tar_samples) and decodes it straight
  into a slot of shared memory that the main process made before the workers started (SharedSlots):
  images as planar (3, H, W) uint8 RGB, class ids as uint8, the flow already float32 (0 where invalid)
  with its validity mask. Only the slot number, keys, meta and pair choices go through the queue.
* the main process reads the slot in place and writes the model's float images and maps into reused
  buffers (BufferPool), with single-threaded numpy/OpenCV so it does not compete with the workers; flow
  and flow_valid are the slot's own tensors. With device=... the compact slot is copied to the device
  and expanded there instead.
Reuse never changes a tensor the caller still holds: a slot or buffer is written again only after
every tensor and view made from it is gone (Lease). Holding many batches (list(loader)) is fine; later
batches then use fresh memory until some are released. Memory: up to 4 slots per worker (1.06 MiB per
sample at 256x256 with 12 classes, in /dev/shm), and in the main process the float images and maps of
the batches held (7.5 MiB per sample) plus up to 16 free buffers kept for reuse, about 2 batches in
mode "both" (BufferPool MODEL_BUFFERS, one per process, shared by its loaders).
"""
from __future__ import annotations

import collections
import functools
import json
import math
import mmap
import multiprocessing
import os
import random
import tarfile
import threading
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator

import cv2
import numpy as np
import torch
import webdataset as wds

try:  # installed with dvc (dvc-data); 3x faster than json on the samples' meta
    from orjson import loads as json_loads
except ImportError:  # pragma: no cover
    json_loads = json.loads
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.config import as_size
from pipeline.data.errors import DataError
from pipeline.data.imageio import bgr_to_planar_rgb, decode_jpeg_bgr, decode_map, decode_npy, read_json
from pipeline.data.schema import MEMBERS, SHARD_FORMAT, stable_hash

MODES = ("train", "both")
PREFETCH = 2  # batches in flight per DataLoader worker
SLOTS = PREFETCH + 2  # shared slots per worker: in flight, plus one the caller holds while asking for the next
ALIGN = 64  # byte alignment of the fields of a slot or buffer


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


# ---------------------------------------------------------------- reused memory


class Layout:
    """Named fields of a batch of up to `rows` samples packed into one byte buffer: field `name` holds
    (rows, *shape) elements of `dtype`; a batch of n <= rows samples uses the first n rows of each."""

    def __init__(self, rows: int, fields: list[tuple[str, tuple[int, ...], torch.dtype]]):
        self.rows, self.fields, offset = rows, {}, 0
        for name, shape, dtype in fields:
            itemsize = torch.empty((), dtype=dtype).element_size()
            self.fields[name] = (offset, tuple(shape), dtype, itemsize)
            offset += -(-rows * math.prod(shape) * itemsize // ALIGN) * ALIGN
        self.nbytes = max(offset, ALIGN)

    def tensors(self, buffer: torch.Tensor | np.ndarray, n: int) -> dict[str, torch.Tensor]:
        """Views of the first n rows of every field of `buffer` (uint8, at least nbytes long). A numpy
        buffer gives tensors that keep it alive (torch.from_numpy), a torch one views of its storage."""
        if n > self.rows:
            raise ValueError(f"batch of {n} in a layout of {self.rows} rows")
        if isinstance(buffer, np.ndarray):
            buffer = torch.from_numpy(buffer)
        out = {}
        for name, (offset, shape, dtype, itemsize) in self.fields.items():
            out[name] = buffer[offset : offset + n * math.prod(shape) * itemsize].view(dtype).view(n, *shape)
        return out


class Lease:
    """A reused buffer exposed to numpy: np.asarray(lease) is an array over it that keeps the lease
    alive, and so does every view and tensor made from that array (torch.from_numpy holds the array).
    `release` runs when the last of them is gone (weakref.finalize): only then may the buffer be
    written again, so reuse never changes a tensor someone still holds."""

    def __init__(self, buffer: np.ndarray, release: Callable[[], None]):
        self.buffer = buffer  # keeps the memory mapped for as long as any view lives
        self.__array_interface__ = {"data": (buffer.ctypes.data, False), "shape": (buffer.nbytes,),
                                    "typestr": "|u1", "version": 3}
        weakref.finalize(self, release)


class BufferPool:
    """Reused byte buffers: the model-ready batches in the main process, the compact batches of a loader
    without workers. Why: memory freed to the OS and allocated again is page-faulted in again, and on the
    2-core VM that costs 0.1-3 ms per MB (3 when the host has taken the freed pages back, which it does
    within a second): as much as writing the batch, or far more. Up to `keep` (>= 1) free buffers (any
    sizes, the most recently returned) are kept.

    Released buffers come back through a deque (thread-safe, and safe from a release that runs in the
    middle of lease() when a garbage collection frees a batch); only lease() touches the free list.
    Buffers are anonymous mappings (huge pages where the kernel allows): while the process forks (e.g.
    DataLoader workers start) the free ones are marked MADV_DONTFORK, so the child does not share them
    and the parent's next batch in one does not copy it page by page (copy-on-write)."""

    def __init__(self, keep: int = 2):
        self.keep, self.free, self.returned = max(1, keep), [], collections.deque()
        self.lock = threading.Lock()
        self.forking: list[np.ndarray] = []
        POOLS.add(self)

    def lease(self, nbytes: int) -> Lease:
        with self.lock:
            while self.returned:
                self.free.append(self.returned.popleft())
            del self.free[: -self.keep]
            sizes = [b.nbytes for b in self.free]  # the most recently returned fit: its pages are the warmest
            buffer = self.free.pop(len(sizes) - 1 - sizes[::-1].index(nbytes)) if nbytes in sizes else \
                self.new_buffer(nbytes)
        return Lease(buffer, functools.partial(BufferPool._give_back, self.returned, buffer, self.keep))

    @staticmethod
    def new_buffer(nbytes: int) -> np.ndarray:
        region = mmap.mmap(-1, nbytes)
        madvise(region, "MADV_HUGEPAGE")
        return np.frombuffer(region, np.uint8)

    @staticmethod
    def _give_back(returned: collections.deque, buffer: np.ndarray, keep: int) -> None:
        returned.append(buffer)
        while len(returned) > keep:  # atomic deque operations only
            returned.popleft()

    def before_fork(self) -> None:
        self.forking = list(self.free) + list(self.returned)
        for buffer in self.forking:
            madvise(buffer.base.obj, "MADV_DONTFORK")

    def after_fork_in_parent(self) -> None:
        for buffer in self.forking:  # a buffer leased later may be shared with a child again, as any memory
            madvise(buffer.base.obj, "MADV_DOFORK")
        self.forking = []


def madvise(region: mmap.mmap, advice: str) -> None:
    if hasattr(mmap, advice):
        try:
            region.madvise(getattr(mmap, advice))
        except OSError:  # e.g. huge pages not supported: only a hint
            pass


POOLS: weakref.WeakSet[BufferPool] = weakref.WeakSet()
os.register_at_fork(before=lambda: [pool.before_fork() for pool in list(POOLS)],
                    after_in_parent=lambda: [pool.after_fork_in_parent() for pool in list(POOLS)])
MODEL_BUFFERS = BufferPool(keep=16)  # this process's model-ready tensors on the CPU (2 batches of up to 8), shared
#                                      by its loaders: a new loader (an evaluation, a benchmark run) reuses the pages


def shared_bytes(nbytes: int) -> torch.Tensor:
    """A uint8 tensor in new shared memory, pages untouched (share_memory_() would copy into it)."""
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(nbytes), 0, (nbytes,), (1,))


class SharedSlots:
    """Shared-memory slots for the compact batches of each DataLoader worker.

    Made by the main process before the workers start, so both sides map them once: a worker decodes
    straight into one of its free slots and sends only the slot's number; the main process reads it in
    place. (Sending tensors instead costs a new shared-memory mapping or a file-descriptor transfer plus
    page faults per batch: more than decoding, on the 2-core VM.)

    state[w, k] is 0 when slot k of worker w is free, else the sequence number of the batch in it. The
    worker sets it; the main process clears it when the last tensor made from the slot is gone (Lease),
    or when a later batch of the worker arrives and this one never did (the DataLoader drops the
    prefetched batches of an epoch that was not read to its end).
    """

    def __init__(self, workers: int, slots: int, layout: Layout):
        self.layout, self.slots = layout, slots
        self.memory = [shared_bytes(slots * layout.nbytes) for _ in range(workers)]
        self.state = torch.zeros((workers, slots), dtype=torch.int64).share_memory_()
        self.taken: list[set[int]] = [set() for _ in range(workers)]  # main process: slots it leased

    def acquire(self, worker: int, seq: int) -> int | None:
        """Worker: a free slot, now holding batch `seq`; None when the caller still holds all of them."""
        state = self.state[worker].numpy()
        free = np.flatnonzero(state == 0)
        if not len(free):
            return None
        state[free[0]] = seq
        return int(free[0])

    def slot(self, worker: int, slot: int) -> torch.Tensor:
        nbytes = self.layout.nbytes
        return self.memory[worker][slot * nbytes : (slot + 1) * nbytes]

    def seen(self, worker: int, seq: int) -> None:
        """Main process: batch `seq` of `worker` arrived; its slots with earlier batches that are not
        leased here were dropped by the DataLoader and are free again."""
        state, taken = self.state[worker].numpy(), self.taken[worker]
        for k in np.flatnonzero((state > 0) & (state < seq)):
            if int(k) not in taken:
                state[k] = 0

    def open(self, worker: int, slot: int, n: int) -> dict[str, torch.Tensor]:
        """Main process: the tensors of the batch in a slot, leased: the slot stays taken while any lives."""
        self.taken[worker].add(slot)
        release = functools.partial(SharedSlots._free, self.state[worker].numpy(), self.taken[worker], slot)
        return self.layout.tensors(np.asarray(Lease(self.slot(worker, slot).numpy(), release)), n)

    @staticmethod
    def _free(state: np.ndarray, taken: set[int], slot: int) -> None:
        taken.discard(slot)
        state[slot] = 0


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


def tar_members(stream, url: str) -> Iterator[tuple[str, bytes]]:
    """(name, content) of each regular file of an uncompressed tar, in order. Random access: one read
    per member (tarfile's stream mode, which webdataset uses, copies members through 10 KB chunks)."""
    try:
        tar = tarfile.open(fileobj=stream, mode="r:")
        for info in tar:
            if info.isreg():
                stream.seek(info.offset_data)
                data = stream.read(info.size)
                if len(data) != info.size:
                    raise tarfile.ReadError(f"unexpected end of data in {info.name}")
                yield info.name, data
            tar.members = []  # keep no headers: shards may hold many members
    except tarfile.TarError as exc:
        raise DataError(f"{url}: unreadable tar ({exc})") from None


def read_tar_samples(shards: Iterator[dict[str, str]]) -> Iterator[dict[str, Any]]:
    """Shard urls -> raw samples {"__key__", "__url__", member suffix: bytes}; each file closed when done.

    Members are grouped as WebDataset does: the key is the name up to the first dot of its last path
    part, the suffix (lower-cased) the rest; consecutive members with one key form a sample."""
    for shard in shards:
        url = shard["url"]
        with open(url, "rb") as stream:
            sample: dict[str, Any] | None = None
            for name, data in tar_members(stream, url):
                dot = name.find(".", name.rfind("/") + 1)
                if dot <= name.rfind("/") + 1:
                    continue  # no key or no suffix: not a sample member
                key, suffix = name[:dot], name[dot + 1 :].lower()
                if sample is None or key != sample["__key__"]:
                    if sample is not None:
                        yield sample
                    sample = {"__key__": key, "__url__": url}
                if suffix in sample:
                    raise DataError(f"{url}: duplicate member {name}")
                sample[suffix] = data
            if sample is not None:
                yield sample


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


def half_to_float(src: np.ndarray, out: np.ndarray) -> np.ndarray:
    """float16 -> float32 written into `out`. numpy's cast is ~20x slower than torch's; torch is used only
    single-threaded (as in DataLoader workers): its OpenMP threads cost milliseconds per call on a busy
    machine. Otherwise OpenCV, about 7x slower than torch and 3x faster than numpy."""
    if torch.get_num_threads() == 1:
        torch.from_numpy(out).copy_(torch.from_numpy(src))
        return out
    width = src.shape[-1]
    result = cv2.multiply(src.reshape(-1, width), 1.0, dst=out.reshape(-1, width), dtype=cv2.CV_32F)
    if result.ctypes.data != out.ctypes.data:
        out[...] = result.reshape(out.shape)
    return out


IMAGES = ("image", "exemplar")
MAPS = ("input_map", "exemplar_map")
BOTH_IMAGES = ("pseudo", "real_exemplar")
BOTH_MAPS = ("pseudo_map", "real_exemplar_map")


def compact_layout(rows: int, size: tuple[int, int], *, encoding: str, channels: int, label_nc: int,
                   mode: str) -> Layout:
    """The fields of a compact batch (what the workers write; see BatchDecoder)."""
    both = mode == "both"
    map_shape = size if encoding == "ids" else (channels, *size)
    map_dtype = torch.uint8 if encoding != "ids" or label_nc <= 256 else torch.int32
    return Layout(rows, [(name, (3, *size), torch.uint8) for name in IMAGES + (BOTH_IMAGES if both else ())]
                  + [(name, map_shape, map_dtype) for name in MAPS + (BOTH_MAPS if both else ())]
                  + [("flow", (2, *size), torch.float32), ("flow_valid", (1, *size), torch.bool)])


class BatchDecoder:
    """Raw samples (member bytes) -> one compact batch, each member decoded straight into its field:

        image, exemplar (+ pseudo, real_exemplar)   (B, 3, H, W) uint8 RGB
        input_map, exemplar_map (+ ...)             (B, H, W) uint8/int32 ids or (B, C, H, W) uint8
        flow                                        (B, 2, H, W) float32, 0 where invalid / real pair
        flow_valid                                  (B, 1, H, W) bool
    In a worker the fields live in one of its SharedSlots (or, when the caller holds them all, in fresh
    shared memory) and the batch is sent as a message for ShardLoader.receive; without workers they
    live in a reused buffer of this process.
    """

    def __init__(self, *, encoding: str, channels: int, label_nc: int, mode: str, real_exemplar_prob: float,
                 seed: int, epoch: SharedEpoch, shard_size: tuple[int, int], out_size: tuple[int, int],
                 layout: Layout, slots: SharedSlots | None = None):
        self.encoding, self.channels, self.label_nc, self.mode = encoding, channels, label_nc, mode
        self.real_exemplar_prob, self.seed, self.epoch = real_exemplar_prob, seed, epoch
        self.shard_size, self.out_size, self.layout, self.slots = shard_size, out_size, layout, slots
        self.seq = 0  # batches made by this process (per worker: each has its own copy)
        self.pool: BufferPool | None = None

    def image_into(self, out: np.ndarray, data: bytes, where: str) -> None:
        bgr = decode_jpeg_bgr(data, where)
        if bgr.shape[:2] != self.shard_size:
            raise DataError(f"{where}: image is {bgr.shape[:2]}, manifest says {self.shard_size}")
        if self.out_size != self.shard_size:
            bgr = cv2.resize(bgr, self.out_size[::-1], interpolation=cv2.INTER_AREA)
        bgr_to_planar_rgb(bgr, out)

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

    def flow_into(self, out: np.ndarray, valid: np.ndarray, data: bytes, where: str) -> None:
        flow = decode_npy(data, where)
        if flow.dtype != np.float16 or flow.shape != (2, *self.shard_size):
            raise DataError(f"{where}: flow must be float16 (2, {self.shard_size[0]}, {self.shard_size[1]}), "
                            f"got {flow.dtype} {flow.shape}")
        if self.out_size == self.shard_size:
            half_to_float(flow, out)
        else:
            # Positions scale with the image (pixel centres: p' = (p + 0.5) * s - 0.5); invalid stays NaN.
            h, w = self.shard_size
            scale = np.array([self.out_size[0] / h, self.out_size[1] / w], np.float32)[:, None, None]
            scaled = (half_to_float(flow, np.empty(flow.shape, np.float32)) + 0.5) * scale - 0.5
            for c in range(2):
                out[c] = cv2.resize(scaled[c], self.out_size[::-1], interpolation=cv2.INTER_NEAREST)
        np.isnan(out[:1], out=valid)  # both coordinates are NaN together
        np.logical_not(valid, out=valid)
        cv2.patchNaNs(out.reshape(-1, out.shape[-1]), 0.0)

    def fields(self, n: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """-> (tensors to decode into, message fields that say where they are)."""
        info = get_worker_info()
        if info is None:  # no workers: a reused buffer of this process
            self.pool = self.pool or BufferPool()
            return self.layout.tensors(np.asarray(self.pool.lease(self.layout.nbytes)), n), {}
        slot = self.slots.acquire(info.id, self.seq) if self.slots is not None else None
        if slot is not None:
            return self.layout.tensors(self.slots.slot(info.id, slot), n), {"slot": (info.id, slot, self.seq)}
        # The caller holds every slot: fresh shared memory, sent by file descriptor (the slow way).
        return self.layout.tensors(shared_bytes(self.layout.nbytes), n), {"seen": (info.id, self.seq)}

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        n, both = len(samples), self.mode == "both"
        self.seq += 1
        keys = [s["__key__"] for s in samples]
        epoch = self.epoch.get()
        pseudo = [uses_pseudo(k, self.real_exemplar_prob, self.seed, epoch) for k in keys]
        tensors, message = self.fields(n)
        arrays = {name: t.numpy() for name, t in tensors.items()}
        metas = []
        for i, sample in enumerate(samples):
            where = f"{sample.get('__url__', '?')}: sample {keys[i]}"
            missing = [m for m in MEMBERS if m not in sample]
            if missing:
                raise DataError(f"{where}: missing members {missing}")
            metas.append(sample["meta.json"])  # parsed in the main process: bytes pickle ~100x faster than dicts
            self.image_into(arrays["image"][i], sample["image.jpg"], f"{where} image.jpg")
            self.map_into(arrays["input_map"][i], sample["input.png"], f"{where} input.png")
            pair = ("pseudo.jpg", "pseudo_input.png") if pseudo[i] else ("exemplar.jpg", "exemplar_input.png")
            self.image_into(arrays["exemplar"][i], sample[pair[0]], f"{where} {pair[0]}")
            self.map_into(arrays["exemplar_map"][i], sample[pair[1]], f"{where} {pair[1]}")
            if pseudo[i]:
                self.flow_into(arrays["flow"][i], arrays["flow_valid"][i], sample["pseudo_flow.npy"],
                               f"{where} pseudo_flow.npy")
            else:
                arrays["flow"][i], arrays["flow_valid"][i] = 0.0, False
            if both:  # the other pair too (the chosen one is copied, not decoded twice)
                for image, name, member, map_member in (("pseudo", "pseudo_map", "pseudo.jpg", "pseudo_input.png"),
                                                        ("real_exemplar", "real_exemplar_map", "exemplar.jpg",
                                                         "exemplar_input.png")):
                    if (image == "pseudo") == pseudo[i]:
                        arrays[image][i], arrays[name][i] = arrays["exemplar"][i], arrays["exemplar_map"][i]
                    else:
                        self.image_into(arrays[image][i], sample[member], f"{where} {member}")
                        self.map_into(arrays[name][i], sample[map_member], f"{where} {map_member}")
        message.update(n=n, key=keys, meta=metas, is_pseudo=pseudo, url=[s.get("__url__", "?") for s in samples])
        if "slot" not in message:
            message["tensors"] = tensors
        return message


def read_meta(data: bytes, where: str) -> dict[str, Any]:
    """A sample's meta.json member -> dict (JSON only: nothing is unpickled)."""
    try:
        meta = json_loads(data)
    except ValueError as exc:  # json's and orjson's decode errors are ValueErrors
        raise DataError(f"{where}: invalid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{where}: meta must be a JSON object, got {type(meta).__name__}")
    return meta


def keep_as_is(batch: Any) -> Any:
    """DataLoader collate_fn for ready batches (the default walks every nested meta entry)."""
    return batch


# ---------------------------------------------------------------- main process: model-ready tensors

IMAGE_LUT = np.arange(256, dtype=np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)  # uint8 -> [-1, 1]
CHANNEL_LUT = np.arange(256, dtype=np.float32) * np.float32(1.0 / 255.0)  # uint8 -> [0, 1]


def lut_into(src: np.ndarray, lut: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out = lut[src] for uint8 src, one sample at a time (cv2.LUT: fast, and below OpenCV's threshold
    for spreading over threads, so it stays on this core)."""
    for s, o in zip(src, out):
        width = s.shape[-1]
        result = cv2.LUT(s.reshape(-1, width), lut, dst=o.reshape(-1, width))
        if result.ctypes.data != o.ctypes.data:  # OpenCV made a new array instead of writing into `o`
            o[...] = result.reshape(o.shape)
    return out


def one_hot_into(ids: np.ndarray, label_nc: int, out: np.ndarray) -> np.ndarray:
    """(B, H, W) class ids -> (B, label_nc, H, W) one-hot floats written into `out` in one pass."""
    classes = np.arange(label_nc, dtype=ids.dtype).reshape(1, label_nc, 1, 1)
    return np.equal(ids[:, None], classes, out=out, casting="unsafe")


def image_to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    if images.device.type != "cpu":
        return images.permute(0, 3, 1, 2).contiguous().float().mul_(2.0 / 255.0).sub_(1.0)
    channels_first = np.ascontiguousarray(images.numpy().transpose(0, 3, 1, 2))
    return torch.from_numpy(lut_into(channels_first, IMAGE_LUT, np.empty(channels_first.shape, np.float32)))


def map_to_float(maps: torch.Tensor, encoding: str, label_nc: int) -> torch.Tensor:
    """(B, H, W) ids -> one-hot (B, label_nc, H, W); (B, C, H, W) uint8 channels -> float in [0, 1]."""
    if maps.device.type != "cpu":
        return maps_with_torch(maps, encoding, label_nc)
    array = maps.numpy()
    if encoding != "ids":
        return torch.from_numpy(lut_into(array, CHANNEL_LUT, np.empty(array.shape, np.float32)))
    out = np.empty((array.shape[0], label_nc, *array.shape[1:]), np.float32)
    return torch.from_numpy(one_hot_into(array, label_nc, out))


def model_fields(raw: dict[str, Any], encoding: str, label_nc: int) -> dict[str, tuple[int, ...]]:
    """The float32 fields a compact batch is expanded into (images and maps; flow and its mask are
    model-ready already), each with its per-sample shape."""
    size = tuple(raw["flow"].shape[-2:])
    fields = {name: (3, *size) for name in IMAGES + BOTH_IMAGES if name in raw}
    for name in MAPS + BOTH_MAPS:
        if name in raw:
            fields[name] = (label_nc if encoding == "ids" else raw[name].shape[1], *size)
    return fields


def expand_on_cpu(raw: dict[str, Any], encoding: str, label_nc: int, pool: BufferPool | None = None,
                  rows: int = 0) -> dict[str, Any]:
    """Compact batch -> model tensors, written by numpy/OpenCV on this core, each into its own buffer
    (from `pool`, sized for `rows` samples, so a partial last batch fits the full ones' buffers; one
    buffer per tensor, so a caller keeping only the images keeps only their memory). Flow and flow_valid
    are the compact batch's own tensors (already float32 and bool): no copy; they keep its slot leased
    for as long as they live."""
    n = len(raw["key"])
    batch = {}
    for name, shape in model_fields(raw, encoding, label_nc).items():
        nbytes = max(n, rows) * math.prod(shape) * 4
        buffer = np.asarray(pool.lease(nbytes)) if pool is not None else np.empty(nbytes, np.uint8)
        out = buffer[: n * math.prod(shape) * 4].view(np.float32).reshape(n, *shape)
        src = raw[name].numpy()
        if name in IMAGES + BOTH_IMAGES:
            lut_into(src, IMAGE_LUT, out)
        elif encoding == "ids":
            one_hot_into(src, label_nc, out)
        else:
            lut_into(src, CHANNEL_LUT, out)
        batch[name] = torch.from_numpy(out)
    batch["flow"], batch["flow_valid"] = raw["flow"], raw["flow_valid"]
    return batch


def maps_with_torch(maps: torch.Tensor, encoding: str, label_nc: int) -> torch.Tensor:
    """map_to_float with torch ops on the tensor's device."""
    if encoding != "ids":
        return maps.float().mul_(1.0 / 255.0)
    one_hot = torch.zeros(maps.shape[0], label_nc, *maps.shape[1:], device=maps.device)
    return one_hot.scatter_(1, maps.long().unsqueeze(1), 1.0)


def expand_with_torch(raw: dict[str, Any], encoding: str, label_nc: int) -> dict[str, Any]:
    """Compact batch -> model tensors with torch ops on the tensors' device (an accelerator)."""
    batch = {}
    for name in IMAGES + BOTH_IMAGES:
        if name in raw:
            batch[name] = raw[name].float().mul_(2.0 / 255.0).sub_(1.0)
    for name in MAPS + BOTH_MAPS:
        if name in raw:
            batch[name] = maps_with_torch(raw[name], encoding, label_nc)
    batch["flow"], batch["flow_valid"] = raw["flow"], raw["flow_valid"]
    return batch


def to_model_batch(raw: dict[str, Any], encoding: str, label_nc: int, device: torch.device | str | None = None,
                   pool: BufferPool | None = None, rows: int = 0) -> dict[str, Any]:
    """Compact batch (planar uint8 images, uint8 maps, float32 flow + mask) -> the model's tensors on `device`.

    On the CPU the expansion uses numpy and OpenCV on one core (it must not compete with the workers'
    cores through OpenMP), into a buffer from `pool` when given. On an accelerator only the compact data
    is copied (through pinned memory on CUDA) and expanded there: a one-hot map is 4 * label_nc bytes per
    pixel, its class ids one byte. rows: the full batch size (pool buffers fit it).
    """
    device = torch.device(device) if device is not None else None
    batch = {"key": raw["key"], "meta": raw["meta"]}
    if device is None or device.type == "cpu":
        batch.update(expand_on_cpu(raw, encoding, label_nc, pool, rows), is_pseudo=raw["is_pseudo"])
        return batch
    pin = device.type == "cuda"
    moved = {name: (t.pin_memory() if pin else t).to(device, non_blocking=pin)
             for name, t in raw.items() if isinstance(t, torch.Tensor)}
    batch.update(expand_with_torch(moved, encoding, label_nc), is_pseudo=moved["is_pseudo"])
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
        self.dataloader: DataLoader | None = None  # made on the first epoch, its workers persist
        self.slots: SharedSlots | None = None
        self.pool = MODEL_BUFFERS  # the model-ready batches of __iter__ on the CPU

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

    def layout(self) -> Layout:
        return compact_layout(self.batch_size, self.image_size, encoding=self.encoding, channels=self.channels,
                              label_nc=self.label_nc, mode=self.mode)

    def pipeline(self) -> wds.DataPipeline:
        """The per-worker pipeline; it reads the epoch from shared memory, so workers can persist."""
        workers, layout = self.workers(), self.layout()
        self.slots = SharedSlots(workers, SLOTS, layout) if workers else None
        decoder = BatchDecoder(encoding=self.encoding, channels=self.channels, label_nc=self.label_nc,
                               mode=self.mode, real_exemplar_prob=self.real_exemplar_prob, seed=self.seed,
                               epoch=self.shared_epoch, shard_size=self.shard_size, out_size=self.image_size,
                               layout=layout, slots=self.slots)
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

    def receive(self, message: dict[str, Any]) -> dict[str, Any]:
        """A decoder's message -> the compact batch (tensors over its slot, leased, or the sent tensors)."""
        if "slot" in message:
            worker, slot, seq = message["slot"]
            self.slots.seen(worker, seq)
            tensors = self.slots.open(worker, slot, message["n"])
        else:
            if "seen" in message and self.slots is not None:
                self.slots.seen(*message["seen"])
            tensors = message["tensors"]
        metas = [read_meta(data, f"{url}: sample {key} meta.json")
                 for data, url, key in zip(message["meta"], message["url"], message["key"])]
        return {**tensors, "is_pseudo": torch.tensor(message["is_pseudo"], dtype=torch.bool),
                "key": message["key"], "meta": metas}

    def compact_batches(self) -> Iterator[dict[str, Any]]:
        """One epoch of batches as the workers make them (see BatchDecoder: (B, 3, H, W) uint8 images, uint8
        class ids, float32 flow with its mask). Their tensors are views of the workers' shared slots, which
        are reused only once every tensor from them is gone. iter(loader) gives the model-ready tensors."""
        self.shared_epoch.set(self.epoch)
        self.epoch += 1
        if not self.infinite and not self.paths[self.rank :: self.world_size]:
            return  # this rank has no shard in a finite epoch (fewer shards than ranks)
        if self.dataloader is None:
            workers = self.workers()
            # No cv2.setNumThreads in forked workers: it tears down the parent's thread pool and deadlocks.
            self.dataloader = DataLoader(self.pipeline(), batch_size=None, collate_fn=keep_as_is,
                                         num_workers=workers, prefetch_factor=PREFETCH if workers else None,
                                         persistent_workers=workers > 0)
        for message in self.dataloader:
            yield self.receive(message)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        cpu = self.device is None or self.device.type == "cpu"
        for raw in self.compact_batches():
            batch = to_model_batch(raw, self.encoding, self.label_nc, self.device, self.pool if cpu else None,
                                   self.batch_size)
            del raw  # only the batch's flow and flow_valid hold its slot now
            yield batch


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
