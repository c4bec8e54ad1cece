"""Typed training configuration, read from the `model:`, `train:` and `mlflow:` sections of params.yaml.

    train_cfg, model_cfg, mlflow_cfg = configs_from_params(load_params("params.yaml"), manifest)

Every section refuses unknown keys (a typo must fail, not silently fall back to a default). The model's image
size and input channels are not params: they come from the shards' manifest, the one place that records them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from model import ModelConfig
from model.losses import LossWeights
from pipeline.params import from_mapping, section
from pipeline.tracking import MlflowConfig

Amp = Literal["none", "bf16", "fp16"]


@dataclass(frozen=True)
class AuditConfig:
    """`train.audit`: test instrumentation, off (null) in real runs. When set, every checkpoint also reports
    whether the ranks' weights are bitwise equal and how many samples two ranks read in one epoch (an all-gather
    of every key read), and rank 0 can fail on purpose once."""

    fail_at_step: int | None = None  # fault drill: rank 0 raises before this step (not after a restore)
    nan_at_step: int | None = None  # guard drill: a generator weight turns NaN before this step (every rank)


@dataclass(frozen=True)
class TrainConfig:
    """One training run: schedule, optimisation, data, Ray scaling, checkpoints and logging."""

    # --- schedule and optimisation (official CoCosNet-v2 defaults where they exist)
    steps: int = 60  # optimisation steps; each is one generator step then one discriminator step
    batch_size: int = 4  # per worker; the global batch is batch_size x workers
    lr: float = 2e-4  # base rate; TTUR trains G at lr/2 and D at lr*2 (official deepfashionHD: 1e-4)
    lr_decay_steps: int = 0  # the last lr_decay_steps steps decay both rates linearly towards 0 (--niter_decay)
    ttur: bool = True  # False: both at lr with Adam betas (0.5, 0.999), the official --no_TTUR
    schedule: Literal["ttur", "official"] = "ttur"  # how TTUR's rates move over the run: see rates()
    g_adam_eps: float = 1e-3  # the official generator/correspondence Adam uses eps 1e-3
    # The image generator's rate relative to the correspondence's (official: 1, one Adam for both). The matching
    # features collapse at rates far below those at which the generator learns quickly from scratch.
    generator_lr_scale: float = 1.0
    amp: Amp = "none"  # bf16 / fp16 autocast on CUDA; ignored (with a log line) on CPU
    seed: int = 0
    real_exemplar_prob: float = 0.2  # share of real exemplars; the rest are pseudo pairs (x_B distorted)
    # The official --video_like: the supervised pairs (the 1 - real_exemplar_prob) use the sample's self pair (the
    # same subject in another view, e.g. deepfashion_self_pair.txt) where it has one, else a pseudo exemplar
    video_like: bool = False
    vgg_weights: str = "random"  # path to vgg19_conv.pth / torchvision VGG19, "imagenet", or "random"
    loss: Mapping[str, float] = field(default_factory=dict)  # overrides of model.losses.LossWeights
    # Divergence guard (pipeline/train/guard.py): stop when |G or D total loss| exceeds divergence_factor x its
    # running median (at least 1), judged once divergence_warmup steps set the median; null: off
    divergence_factor: float | None = 20.0
    divergence_warmup: int = 1

    # --- data
    loader_workers: int = 0  # DataLoader processes per Ray worker (each rank reads its own shards)
    verify_shards: Literal["full", "size", "none"] = "full"  # each shard against the manifest, once per process

    # --- Ray Train
    ray_address: str = "local"  # "local": start a small Ray here; anything else: join that cluster
    workers: int = 1  # Ray Train workers (DDP ranks)
    use_gpu: bool = False
    cpus_per_worker: int = 2  # also the torch threads of each worker
    gpus_per_worker: float = 1.0  # used when use_gpu
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    storage_path: str = "checkpoints"  # Ray run folders; on a cluster a shared path or s3://, gs://
    run_name: str | None = None  # Ray run folder name; default <experiment>-<MLflow run id prefix>
    checkpoint_every: int = 30  # steps between checkpoints (and Ray reports)
    keep_checkpoints: int = 2
    max_failures: int = 1  # worker-group restarts, each from the last checkpoint
    resume_from: str | None = None  # a checkpoint folder, or a Ray run folder (its latest checkpoint)
    resume: Literal["auto", "never"] = "auto"  # auto: continue the interrupted run of the same params, if any
    find_unused_parameters: bool = False  # DDP; only needed when a loss weight switches a branch off
    audit: AuditConfig | None = None  # test instrumentation (see AuditConfig); null in real runs

    # --- logging
    log_every: int = 10  # steps between loss / throughput logs (MLflow and console)
    image_every: int = 20  # steps between sample grids
    grid_samples: int = 4  # rows of a sample grid

    def __post_init__(self) -> None:
        object.__setattr__(self, "loss", dict(self.loss or {}))
        if isinstance(self.audit, Mapping):
            object.__setattr__(self, "audit", from_mapping(AuditConfig, self.audit, "train.audit"))
        LossWeights.from_dict(self.loss)  # unknown or negative weights fail here, not in a worker
        positive = ("steps", "batch_size", "workers", "cpus_per_worker", "checkpoint_every", "keep_checkpoints",
                    "log_every", "image_every", "grid_samples", "divergence_warmup")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"params.yaml train.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.lr_decay_steps <= self.steps:
            raise ValueError(f"params.yaml train.lr_decay_steps must be in [0, steps={self.steps}], "
                             f"got {self.lr_decay_steps}")
        if not self.lr > 0 or not self.g_adam_eps > 0:
            raise ValueError(f"params.yaml train.lr and train.g_adam_eps must be > 0, got {self.lr}, {self.g_adam_eps}")
        if not self.generator_lr_scale > 0:
            raise ValueError(f"params.yaml train.generator_lr_scale must be > 0, got {self.generator_lr_scale}")
        if self.schedule not in ("ttur", "official"):
            raise ValueError(f"params.yaml train.schedule must be ttur or official, got {self.schedule!r}")
        if self.divergence_factor is not None and not self.divergence_factor > 1:
            raise ValueError(f"params.yaml train.divergence_factor must be > 1 (or null: off), got {self.divergence_factor}")
        if self.amp not in ("none", "bf16", "fp16"):
            raise ValueError(f"params.yaml train.amp must be none, bf16 or fp16, got {self.amp!r}")
        if not 0.0 <= self.real_exemplar_prob <= 1.0:
            raise ValueError(f"params.yaml train.real_exemplar_prob must be in [0, 1], got {self.real_exemplar_prob}")
        if self.loader_workers < 0 or self.max_failures < -1:
            raise ValueError("params.yaml train.loader_workers must be >= 0 and train.max_failures >= -1 (-1: forever)")
        if self.use_gpu and not self.gpus_per_worker > 0:
            raise ValueError(f"params.yaml train.gpus_per_worker must be > 0 with use_gpu, got {self.gpus_per_worker}")
        if self.resume not in ("auto", "never"):
            raise ValueError(f"params.yaml train.resume must be auto or never, got {self.resume!r}")
        if self.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ValueError(f"params.yaml train.placement_strategy: unknown {self.placement_strategy!r}")

    def lr_factor(self, step: int) -> float:
        """Multiplier of lr at `step` (1-based): 1, then over the last lr_decay_steps steps a linear decay ending
        at 1/lr_decay_steps (the official per-epoch decay, per step)."""
        return min(1.0, (self.steps - step + 1) / self.lr_decay_steps) if self.lr_decay_steps else 1.0

    def rates(self, step: int, epoch: int) -> tuple[float, float]:
        """(generator, discriminator) learning rates at `step` (1-based) of data `epoch` (0-based); the image
        generator inside the "generator" (CoCosNet) runs at generator_lr_scale times its rate.

        With TTUR the generator runs at half the decayed lr and the discriminator at twice it. `ttur` keeps that
        for the whole run (the paper; the official CoCosNet v1 trainer). `official` behaves as the official
        CoCosNet-v2 trainer does: its end-of-epoch update sets both to lr, so TTUR holds in the first epoch only
        (Adam's betas stay (0, 0.9)). Without TTUR both run at the decayed lr throughout."""
        lr = self.lr * self.lr_factor(step)
        if not self.ttur or (self.schedule == "official" and epoch > 0):
            return lr, lr
        return lr / 2, lr * 2

    @property
    def loss_weights(self) -> LossWeights:
        return LossWeights.from_dict(self.loss)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.workers

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"loss": dict(self.loss)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        return from_mapping(cls, dict(values), "train")


def model_config_from_params(model: Mapping[str, Any], manifest: Mapping[str, Any]) -> ModelConfig:
    """`model:` section + the image size and class count of the shards (their manifest) -> ModelConfig."""
    for name in ("image_size", "label_nc"):
        if name in model:
            raise ValueError(f"params.yaml model.{name}: the model takes it from the shards' manifest "
                             f"({manifest[name]}); set data.{name} and re-run the data stages instead")
    from_manifest = {"image_size": tuple(manifest["image_size"]), "label_nc": manifest["label_nc"]}
    return from_mapping(ModelConfig, {**model, **from_manifest}, "model")


def configs_from_params(params: Mapping[str, Any],
                        manifest: Mapping[str, Any]) -> tuple[TrainConfig, ModelConfig, MlflowConfig]:
    """The three typed configs of a training run from a params.yaml dict and the shards' manifest."""
    return (TrainConfig.from_dict(section(params, "train")),
            model_config_from_params(section(params, "model"), manifest), MlflowConfig.from_params(params))
