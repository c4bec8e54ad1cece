"""Scaling benchmark: training samples/s of 2 DDP workers x 1 thread on two simulated nodes, against
1 worker x 2 threads on one node -- the same two cores, used by data parallelism or by threads.

Both runs are full Ray Train jobs (pipeline.train.launch.run_training) with the same tiny model and the
same per-worker batch (weak scaling: the two-worker job trains on twice the samples per step). Throughput
is the mean samples/s that rank 0 measures over the report intervals after the first (so Ray start-up,
worker start-up and first-iteration costs are excluded); efficiency = two-worker samples/s / one-worker
samples/s, where 1.0 means data parallelism over processes gets as much out of the cores as threads do.

Run from the repository root:

    python -m benchmarks.scaling                 # ~3 min on 2 cores
    python -m benchmarks.scaling --steps 60 --batch 8
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from pipeline.data.config import AugmentConfig, ShardConfig
from pipeline.data.prepare import prepare_dataset
from pipeline.data.shards import write_shards
from pipeline.data.sources import get_source
from pipeline.train.launch import local_ray_options, run_training, runtime_env

DATA = {"task": "mask", "image_size": 64, "label_nc": 12, "seed": 0}
MODEL = {"nef": 8, "ngf": 16, "ndf": 16, "spade_hidden": 32, "patchmatch_iters": 2, "temperature": 0.05,
         "num_d": 2, "n_layers_d": 3}
TARGET_EFFICIENCY = 0.8


def build_shards(folder: Path) -> Path:
    """64x64 synthetic shards, enough for both ranks (a shard per rank and epoch at the least)."""
    prepare_dataset(get_source("synthetic", **DATA, num_images=96), folder / "prepared", progress=False)
    cfg = ShardConfig(pseudo_per_image=2, samples_per_shard=16, min_shards_per_split=4, val_fraction=0.1,
                      num_workers=1, augment=AugmentConfig())
    write_shards(folder / "prepared", folder / "shards", cfg, seed=0, progress=False)
    return folder / "shards"


def train_throughput(shards: Path, folder: Path, workers: int, threads: int, steps: int, batch: int,
                     interval: int) -> list[float]:
    """samples/s of each report interval after the first, for a job already connected to Ray."""
    params = {"data": {"source": "synthetic", **DATA}, "model": MODEL,
              "train": {"steps": steps, "batch_size": batch, "workers": workers, "cpus_per_worker": threads,
                        "placement_strategy": "SPREAD", "loader_workers": 0, "checkpoint_every": interval,
                        "log_every": interval, "image_every": steps, "keep_checkpoints": steps // interval + 1,
                        "storage_path": str(folder / "checkpoints")},
              "mlflow": {"tracking_uri": f"sqlite:///{folder / 'mlflow.db'}", "experiment": "scaling",
                         "artifact_location": str(folder / "mlartifacts"), "log_model": False}}
    result = run_training(params, shards=shards, models_dir=None, base=folder)
    return [report["samples_per_s"] for report in result.reports[1:]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="training steps per run")
    parser.add_argument("--interval", type=int, default=10, help="steps per report interval")
    parser.add_argument("--batch", type=int, default=4, help="samples per worker and step")
    args = parser.parse_args(argv)
    if args.steps < 3 * args.interval:
        parser.error("--steps must cover at least three report intervals (the first is discarded)")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    with tempfile.TemporaryDirectory(prefix="scaling-") as tmp:
        folder = Path(tmp)
        shards = build_shards(folder / "data")

        ray.init(**local_ray_options(num_cpus=2, log_to_driver=False))
        try:
            threads = train_throughput(shards, folder / "threads", 1, 2, args.steps, args.batch, args.interval)
        finally:
            ray.shutdown()

        cluster = Cluster(initialize_head=False)
        for _ in range(2):
            cluster.add_node(num_cpus=1, object_store_memory=256 * 1024**2)
        try:
            ray.init(address=cluster.address, logging_level=logging.ERROR, log_to_driver=False,
                     runtime_env=runtime_env(local=True))
            ddp = train_throughput(shards, folder / "ddp", 2, 1, args.steps, args.batch, args.interval)
        finally:
            ray.shutdown()
            cluster.shutdown()

    one, two = statistics.mean(threads), statistics.mean(ddp)
    efficiency = two / one
    load = os.getloadavg()[0]
    print(f"tiny CoCosNet-v2 at 64x64, batch {args.batch} per worker, {args.steps} steps "
          f"(samples/s per {args.interval}-step interval after the first; load average {load:.1f})")
    print(f"  1 worker  x 2 threads, 1 node : {one:6.2f} samples/s   {[round(v, 2) for v in threads]}")
    print(f"  2 workers x 1 thread,  2 nodes: {two:6.2f} samples/s   {[round(v, 2) for v in ddp]}")
    print(f"  efficiency (2 workers / 1 worker): {efficiency:.2f}   target >= {TARGET_EFFICIENCY}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
