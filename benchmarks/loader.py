"""Loader benchmark: samples/s of pipeline.data.loader against a decode-only baseline, in one process.

Rows (target: the compact batches at >= 0.8 of decode-only samples/s)
----
* ``decode-only``: the same shard files, split over the same number of worker processes, read with
  ``tarfile`` and the members a training batch needs decoded with the same decoders (image.jpg, input.png,
  one pseudo exemplar's jpg and png) -- and nothing else: no batching, no tensors. The ceiling for any
  loader that has to decode these files.
* ``loader, compact batches``: ``make_loader(..., split="train")`` iterated as training does (``iter(loader)``):
  WebDataset stages (shard order, split by rank and worker, tar reading, shuffle buffer), decoding, batching,
  and the batches' trip from the workers through shared memory. On a GPU this is the CPU's whole share:
  ``to_model`` expands the batch on the device.
* ``the same, verify=none``: without checking each shard's sha256 against the manifest (the default ``full``
  hashes every shard once per worker process: here once per run, since each run starts new workers).
* ``loader + to_model on the CPU``: the same, expanded to the model's float tensors (one-hot maps, images in
  [-1, 1]) in the main process, as a CPU-only training loop does before its step.

Each runs ``--epochs`` passes over the training shards with a new loader (worker start-up included); the rows
are interleaved for ``--rounds`` rounds and the best of each is reported, since other jobs on the CPU only ever
slow a run down. Two measures: samples/s (wall clock), and CPU milliseconds per sample summed over the main
process and its workers, which other jobs on a shared machine disturb far less. The shards are synthetic images
at ``--size`` written once into ``--shards`` (default data/benchmarks/loader_<size>, reused on later runs).

Run from the repository root::

    python -m benchmarks.loader                  # 256x256, 2 workers, batch 16
    python -m benchmarks.loader --size 128 --workers 1
"""
from __future__ import annotations

import argparse
import os
import resource
import tarfile
import time
from pathlib import Path

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.config import AugmentConfig, ShardConfig
from pipeline.data.imageio import decode_jpeg, decode_map
from pipeline.data.loader import make_loader, to_model
from pipeline.data.prepare import prepare_dataset
from pipeline.data.schema import pseudo_members, read_manifest
from pipeline.data.shards import write_shards
from pipeline.data.sources import get_source

LABEL_NC = 12


def build_shards(directory: Path, size: int, images: int) -> Path:
    """Synthetic mask->image shards at `size` (resumable: a finished earlier build is reused)."""
    source = get_source("synthetic", task="mask", image_size=size, label_nc=LABEL_NC, seed=0, num_images=images)
    prepare_dataset(source, directory / "prepared")
    cfg = ShardConfig(samples_per_shard=32, val_fraction=0.05, num_workers=2, augment=AugmentConfig())
    write_shards(directory / "prepared", directory / "shards", cfg, seed=0)
    return directory / "shards"


class DecodeOnly(IterableDataset):
    """Reads the shards with tarfile and decodes the members a training sample needs; yields counts only."""

    def __init__(self, paths: list[str], channels: int, encoding: str):
        super().__init__()
        self.paths, self.channels, self.encoding = paths, channels, encoding
        self.images, self.maps = ("image.jpg", pseudo_members(0)[0]), ("input.png", pseudo_members(0)[1])

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for path in self.paths[worker::workers]:
            decoded = 0
            with tarfile.open(path) as tar:
                for member in tar:
                    suffix = member.name.split(".", 1)[1]
                    if suffix in self.images:
                        decode_jpeg(tar.extractfile(member).read())
                    elif suffix in self.maps:
                        decode_map(tar.extractfile(member).read(), self.encoding, self.channels)
                        decoded += suffix == self.maps[1]  # one per sample
            yield decoded


def cpu_seconds() -> float:
    """User + system CPU of this process and its finished children (the DataLoader workers, which are
    joined when their loader is gone)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(epoch_batches) -> tuple[int, float, float]:
    """Run the epochs. -> (samples, wall seconds, CPU seconds of all processes)."""
    samples, wall, cpu = 0, time.perf_counter(), cpu_seconds()
    for batches in epoch_batches():
        for batch in batches:
            samples += batch
    return samples, time.perf_counter() - wall, cpu_seconds() - cpu


def decode_only_epochs(shard_dir: Path, workers: int, epochs: int):
    manifest, base = read_manifest(shard_dir)
    paths = [str(base / s["name"]) for s in manifest["splits"]["train"]["shards"]]
    dataset = DecodeOnly(paths, manifest["input_channels"], manifest["input_encoding"])
    for _ in range(epochs):
        yield (int(count) for count in DataLoader(dataset, batch_size=None, num_workers=workers))


def loader_epochs(shard_dir: Path, workers: int, epochs: int, batch_size: int, expand: bool, verify: str = "full"):
    """expand: also make the model's float tensors on the CPU (to_model)."""
    loader = make_loader(shard_dir, batch_size=batch_size, split="train", num_workers=workers, seed=0,
                         real_exemplar_prob=0.2, verify=verify)
    for _ in range(epochs):
        yield (len((to_model(batch, LABEL_NC) if expand else batch)["key"]) for batch in loader)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--images", type=int, default=320, help="synthetic images (one sample each)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions; the best of each counts")
    parser.add_argument("--shards", type=Path, default=None, help="default: data/benchmarks/loader_<size>")
    args = parser.parse_args(argv)
    directory = args.shards or Path("data/benchmarks") / f"loader_{args.size}"
    shard_dir = build_shards(directory, args.size, args.images)

    runs = {
        "decode-only": lambda: decode_only_epochs(shard_dir, args.workers, args.epochs),
        "loader, compact batches": lambda: loader_epochs(shard_dir, args.workers, args.epochs, args.batch_size,
                                                         expand=False),
        "  the same, verify=none": lambda: loader_epochs(shard_dir, args.workers, args.epochs, args.batch_size,
                                                         expand=False, verify="none"),
        "loader + to_model on the CPU": lambda: loader_epochs(shard_dir, args.workers, args.epochs,
                                                              args.batch_size, expand=True),
    }
    measure(runs["loader + to_model on the CPU"])  # warm the page cache and imports
    load_before = os.getloadavg()[0]
    rate: dict[str, float] = {}
    cpu_ms: dict[str, float] = {}
    counts = set()
    for _ in range(args.rounds):  # interleaved rounds, best of each: other jobs on the CPU only slow runs down
        for name, run in runs.items():
            samples, wall, cpu = measure(run)
            counts.add(samples)
            rate[name] = max(rate.get(name, 0.0), samples / wall)
            cpu_ms[name] = min(cpu_ms.get(name, float("inf")), 1000 * cpu / samples)
    if len(counts) != 1:
        raise SystemExit(f"sample counts differ between runs: {sorted(counts)}")
    print(f"size {args.size}x{args.size}, {args.workers} workers, batch {args.batch_size}, {counts.pop()} samples "
          f"({args.epochs} epochs) per run, best of {args.rounds}; 1-min load {load_before:.2f} -> "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    base = "decode-only"
    print(f"{'':30s} {'samples/s':>10s} {'ratio':>6s}   {'CPU ms/sample':>13s} {'ratio':>6s}")
    for name in runs:
        print(f"{name:30s} {rate[name]:10.1f} {rate[name] / rate[base]:6.2f}   "
              f"{cpu_ms[name]:13.2f} {cpu_ms[base] / cpu_ms[name]:6.2f}")
    print("target: the compact batches >= 0.8 of decode-only samples/s. The CPU ratio (decode-only CPU / loader "
          "CPU) is what the samples/s ratio becomes when both saturate an otherwise idle machine.")


if __name__ == "__main__":
    main()
