"""train_loop: the function every Ray Train worker runs (with one worker it is a single training process).

    config = {"train": TrainConfig dict, "model": ModelConfig dict, "shards": absolute path,
              "resume_from": absolute checkpoint or run folder, or None,
              "mlflow": {"tracking_uri", "run_id", "system_metrics"} or None (no tracking)}

Per step: the next full batch of this rank's shards, one generator step and one discriminator step
(pipeline.train.step). Every `checkpoint_every` steps, and at the end, every rank calls ray.train.report
with its part of the checkpoint (rank 0: networks, optimizers, scalers; every rank: its RNG states and
data position), so a restarted worker group resumes exactly where the checkpoint was taken.
Rank 0 alone talks to MLflow, and skips the steps the run already holds (a resumed or restarted run replays the
steps after its checkpoint). The driver logs the final model.
"""
from __future__ import annotations

import random
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch

from model import ModelConfig
from model.vgg import VGG19, load_vgg19
from pipeline import tracking
from pipeline.data.errors import DataError
from pipeline.data.loader import ShardLoader, make_loader, to_model
from pipeline.data.schema import stable_hash
from pipeline.mkl_vml import settle_vml_dispatch
from pipeline.train.audit import Audit
from pipeline.train.checkpoint import (DataPosition, find_checkpoint, restore_rank_state, restore_training_state,
                                       save_rank_state, save_training_state)
from pipeline.train.config import TrainConfig
from pipeline.train.guard import DivergenceGuard, TrainingHealthError, check_state
from pipeline.train.step import TrainParts, build_parts, set_rates, train_step
from pipeline.viz import sample_grid


def say(message: str) -> None:
    # Not print(): Ray Train patches print in workers to log *and* echo, which shows every line twice.
    sys.stdout.write(f"[train] {message}\n")
    sys.stdout.flush()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_vgg(weights: str, seed: int, loud: bool) -> VGG19:
    """VGG19 for the losses; random weights are announced loudly (the perceptual terms then mean little)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vgg = load_vgg19(weights, seed=seed)
    for warning in caught:
        if loud:
            say(f"WARNING {'!' * 20} {warning.message} {'!' * 20}")
    return vgg


# ---------------------------------------------------------------- data


def batch_stream(loader: ShardLoader, position: DataPosition, batch_size: int) -> Iterator[dict]:
    """Full batches of this rank's shards, epoch after epoch, from `position` on; advances `position`.

    Each rank reads its own shards of an epoch (finite loader), so ranks never share a sample within an
    epoch; they may finish epochs at different steps, which DDP does not mind. Partial batches are
    dropped to keep shapes fixed. On resume the consumed batches of the epoch are read and skipped.
    """
    while True:
        loader.set_epoch(position.epoch)
        full = 0
        for batch in loader:
            if len(batch["key"]) < batch_size:
                continue
            full += 1
            if full <= position.batches:
                continue
            position.batches = full
            yield batch
        if full == 0:
            raise DataError(f"rank {loader.rank}: epoch {position.epoch} of its shards holds no full batch of "
                            f"{batch_size} samples; use fewer workers, a smaller batch or more samples")
        position.epoch, position.batches = position.epoch + 1, 0


# ---------------------------------------------------------------- metrics


class Window:
    """Running sums of the loss terms since the last take(), and the time they took."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.steps, self.start = 0, time.perf_counter()

    def add(self, losses: dict[str, float]) -> None:
        for name, value in losses.items():
            self.sums[name] += value
        self.steps += 1

    def take(self, samples_per_step: int) -> dict[str, float]:
        """Mean of each term and samples/s over the window; starts the next window."""
        elapsed = time.perf_counter() - self.start
        metrics = {name: total / self.steps for name, total in self.sums.items()}
        metrics["samples_per_s"] = self.steps * samples_per_step / elapsed
        self.sums, self.steps, self.start = defaultdict(float), 0, time.perf_counter()
        return metrics


# ---------------------------------------------------------------- checkpoints


def report(parts: TrainParts, step: int, position: DataPosition, rank: int, metrics: dict[str, float],
           meta: dict[str, Any], name: str) -> None:
    """Every rank: ray.train.report with its part of checkpoint `name` (Ray merges the folders in storage)."""
    with tempfile.TemporaryDirectory(prefix="cocosnet-ckpt-") as tmp:
        folder = Path(tmp)
        save_rank_state(folder, rank, position)
        if rank == 0:
            save_training_state(folder, parts, step, meta)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)


def restore(parts: TrainParts, config: dict[str, Any], rank: int) -> tuple[int, DataPosition | None, str]:
    """-> (step to continue after, this rank's data position or None, where it came from). Ray's own
    checkpoint (a restarted worker group) wins over train.resume_from (a new run continuing an old one)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            step = restore_training_state(Path(folder), parts)
            return step, restore_rank_state(Path(folder), rank), f"Ray checkpoint {checkpoint.path}"
    if config.get("resume_from"):
        folder = find_checkpoint(config["resume_from"])
        step = restore_training_state(folder, parts)
        return step, restore_rank_state(folder, rank), f"train.resume_from {folder}"
    return 0, DataPosition(), ""


# ---------------------------------------------------------------- the loop


def training_batch(compact: dict[str, Any], label_nc: int, device: torch.device) -> dict[str, Any]:
    """A loader batch -> the model's tensors (to_model). The ground-truth flow the loader adds for loss.flow belongs
    to the epoch's pseudo exemplar: it stays valid only for the samples shown that exemplar, whose y_B it then is, so
    the loader's copy of it (pseudo, pseudo_map) is dropped before it is expanded on the device."""
    batch = to_model({k: v for k, v in compact.items() if k not in ("pseudo", "pseudo_map")}, label_nc, device)
    if "flow" in batch:
        shown = torch.tensor([pair == "pseudo" for pair in batch["pair"]], device=batch["flow_valid"].device)
        batch["flow_valid"] = batch["flow_valid"] & shown.view(-1, 1, 1, 1)
    return batch


def train_loop(config: dict[str, Any]) -> dict[str, Any]:
    cfg = TrainConfig.from_dict(config["train"])
    model_cfg = ModelConfig.from_dict(config["model"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(cfg.cpus_per_worker)
    settle_vml_dispatch()  # before this worker's first (multi-threaded) forward pass

    seed_everything(cfg.seed)  # identical initial weights on every rank
    vgg = load_vgg(cfg.vgg_weights, cfg.seed, loud=rank == 0)
    ddp_options = {"find_unused_parameters": cfg.find_unused_parameters}
    parts = build_parts(model_cfg, cfg.loss_weights, vgg, lr=cfg.lr, ttur=cfg.ttur, g_adam_eps=cfg.g_adam_eps,
                        amp=cfg.amp, device=device, generator_lr_scale=cfg.generator_lr_scale,
                        class_channels=config.get("class_channels"),
                        wrap=lambda m: ray.train.torch.prepare_model(m, move_to_device=False,
                                                                     parallel_strategy_kwargs=ddp_options))
    seed_everything(stable_hash(cfg.seed, "train", rank) % 2**63)  # each rank its own stream from here
    if cfg.amp != "none" and parts.amp_dtype is None and rank == 0:
        say(f"train.amp={cfg.amp} needs CUDA; training on {device.type} in full precision")

    loader = make_loader(config["shards"], batch_size=cfg.batch_size, split="train",
                         real_exemplar_prob=cfg.real_exemplar_prob, video_like=cfg.video_like,
                         with_flow=cfg.loss_weights.flow > 0, num_workers=cfg.loader_workers, seed=cfg.seed,
                         pin_memory=device.type == "cuda", verify=cfg.verify_shards)
    if (loader.rank, loader.world_size) != (rank, world_size):  # it splits shards by RANK/WORLD_SIZE
        raise RuntimeError(f"rank {rank} of {world_size}: the environment says {loader.rank} of {loader.world_size}")
    start_step, position, source = restore(parts, config, rank)
    if source and position is None:
        position = DataPosition(epoch=start_step // max(1, len(loader)))  # checkpoint had fewer ranks
        say(f"rank {rank}: no data position in the checkpoint; continuing at epoch {position.epoch}")
    if source and rank == 0:
        say(f"resumed after step {start_step} from {source}")
    stream = batch_stream(loader, position, cfg.batch_size)
    audit = Audit(cfg.audit, rank, world_size, resumed=bool(source))

    mlflow_cfg = config.get("mlflow") or {}
    run, logged_until = None, 0
    if rank == 0 and mlflow_cfg.get("run_id"):
        run = tracking.resume_run(mlflow_cfg["tracking_uri"], mlflow_cfg["run_id"], mlflow_cfg["system_metrics"])
        logged_until = tracking.last_logged_step(mlflow_cfg["tracking_uri"], mlflow_cfg["run_id"])
    meta = {"world_size": world_size, "model_config": model_cfg.to_dict(), "train_config": cfg.to_dict(),
            "mlflow_run_id": mlflow_cfg.get("run_id")}
    if rank == 0:
        say(f"{world_size} worker(s) on {device}, {cfg.batch_size} samples each; steps {start_step + 1}..{cfg.steps}")

    samples_per_step = cfg.batch_size * world_size
    log_window, report_window = Window(), Window()
    reported, last_checkpoint = False, start_step
    divergence = DivergenceGuard(cfg.divergence_factor, cfg.divergence_warmup)
    for step in range(start_step + 1, cfg.steps + 1):
        audit.before_step(step, last_checkpoint, parts)
        batch = training_batch(next(stream), model_cfg.label_nc, device)
        audit.read(position.epoch, batch["key"])
        rates = cfg.rates(step, position.epoch)
        set_rates(parts, *rates)
        checkpoint = step % cfg.checkpoint_every == 0 or step == cfg.steps
        try:
            losses, out = train_step(parts, batch, step)
            divergence.check(losses, step)
            if checkpoint:
                check_state(parts, step)  # never a checkpoint of a broken state
        except TrainingHealthError as err:
            # Deterministic, and alike on every rank (losses are the ranks' mean, DDP keeps the weights equal): all
            # return, so Ray does not retry it from the last checkpoint; the driver fails the run with this message.
            say(f"rank {rank}: {err}. Last good checkpoint: after step {last_checkpoint}")
            if run:
                tracking.end_active_run()
            return {"stopped": str(err), "step": step, "last_checkpoint": last_checkpoint}
        log_window.add(losses)
        report_window.add(losses)

        if rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps):
            metrics = log_window.take(samples_per_step) | {"lr/g": rates[0], "lr/d": rates[1]}
            if cfg.generator_lr_scale != 1:
                metrics["lr/image_generator"] = rates[0] * cfg.generator_lr_scale
            if run and step > logged_until:
                tracking.log_metrics(metrics, step)
            eta = (cfg.steps - step) * samples_per_step / metrics["samples_per_s"]
            say(f"step {step}/{cfg.steps} | G {metrics['g/total']:.3f} D {metrics.get('d/total', 0):.3f} | "
                f"{metrics['samples_per_s']:.1f} samples/s | eta {eta:.0f}s")
        if rank == 0 and run and step > logged_until and (step % cfg.image_every == 0 or step == cfg.steps):
            tracking.log_grid(sample_grid(batch, out.image, out.warped, cfg.grid_samples), step)

        if checkpoint:
            metrics = report_window.take(samples_per_step) | audit.at_checkpoint(parts)
            report(parts, step, position, rank, metrics | {"step": step, "world_size": world_size}, meta,
                   name=f"checkpoint_{step:08d}")
            report_window.start = time.perf_counter()  # its samples/s excludes checkpointing
            reported, last_checkpoint = True, step

    if not reported:  # nothing left to train (resumed a finished run): still hand Ray a final checkpoint
        report(parts, cfg.steps, position, rank, {"step": cfg.steps, "world_size": world_size}, meta,
               name=f"checkpoint_{cfg.steps:08d}_{time.strftime('%Y%m%d-%H%M%S')}")  # a unique name: never reuse one

    if run:
        tracking.end_active_run()
    return {"step": cfg.steps}
