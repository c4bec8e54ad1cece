"""The driver of a training run in three steps: resolve (configs, paths), fit (MLflow run, Ray, TorchTrainer),
publish (the exported model, metrics and loss curves).

    result = run_training(load_params("params.yaml"))     # what `python -m stages.train` does

`train.ray_address: local` starts a small Ray inside this process sized for the machine; any other value
(an address such as `ray://head:10001` or `auto`) joins that cluster and ships the `model` and `pipeline`
packages to it. An already initialised Ray (tests, notebooks) is used as it is.
"""
from __future__ import annotations

import csv
import dataclasses
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import ray
import ray.train
from ray.train.torch import TorchTrainer

import model as model_package
import pipeline as pipeline_package
from model import ModelConfig
from pipeline import tracking, viz
from pipeline.data.imageio import atomic_write_bytes, atomic_write_json
from pipeline.data.loader import verify_split
from pipeline.data.schema import read_manifest
from pipeline.model_files import export_model
from pipeline.tracking import MlflowConfig
from pipeline.train.checkpoint import find_checkpoint, load_state
from pipeline.train.config import TrainConfig, configs_from_params
from pipeline.train.loop import train_loop

REPO_ROOT = Path(pipeline_package.__file__).resolve().parents[1]
LOCAL_OBJECT_STORE_BYTES = 512 * 1024**2  # Ray's default would take 30% of RAM; checkpoints go to disk


class TrainingError(RuntimeError):
    """Training failed after its retries; the message names the cause and the last good checkpoint."""


@dataclass
class TrainingResult:
    run_id: str
    tracking_uri: str
    run_dir: str  # Ray run folder: pass it as train.resume_from to continue this run
    checkpoint: str  # the final checkpoint
    model_dir: Path | None  # the exported model (None when not exported)
    model_uri: str | None  # the logged MLflow model
    metrics: dict[str, Any]  # the last report: losses over the last interval, agreement across ranks
    reports: list[dict[str, Any]]  # the reports of the kept checkpoints, oldest first
    wall_s: float


def say(message: str) -> None:
    print(f"[train] {message}", flush=True)


# ---------------------------------------------------------------- Ray


def runtime_env(local: bool) -> dict[str, Any]:
    """Local workers import this checkout; a cluster's workers get the driver's `model` and `pipeline`
    packages shipped with the job (the dependencies must be installed on its nodes)."""
    env: dict[str, Any] = {"worker_process_setup_hook": "pipeline.train.raylogs.quiet"}
    if local:
        python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        # OpenMP threads that spin while waiting make a shared machine crawl: with another busy process on a
        # 2-core box, a 2-thread forward pass took 18 s spinning and 0.6 s with passive waiting.
        env["env_vars"] = {"PYTHONPATH": python_path, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    else:
        env["py_modules"] = [str(Path(model_package.__file__).parent), str(Path(pipeline_package.__file__).parent)]
    return env


def local_ray_options(num_cpus: int | None = None, log_to_driver: bool = True) -> dict[str, Any]:
    """ray.init arguments for a small, quiet Ray on this machine (also used by the tests and benchmarks)."""
    return {"num_cpus": num_cpus or os.cpu_count(), "include_dashboard": False,
            "object_store_memory": LOCAL_OBJECT_STORE_BYTES, "logging_level": logging.ERROR,
            "log_to_driver": log_to_driver, "runtime_env": runtime_env(local=True)}


def connect_ray(cfg: TrainConfig) -> bool:
    """Start or join Ray; -> True when this call started it (and should shut it down).
    An already initialised Ray (tests, notebooks) is used as it is."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if cfg.ray_address == "local":
        ray.init(**local_ray_options())
    else:
        ray.init(address=cfg.ray_address, logging_level=logging.ERROR, runtime_env=runtime_env(local=False))
    return True


def scaling_config(cfg: TrainConfig) -> ray.train.ScalingConfig:
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = cfg.gpus_per_worker
    return ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker=resources,
                                   placement_strategy=cfg.placement_strategy)


def storage_path(cfg: TrainConfig, base: Path) -> str:
    """Absolute local folder, or a URI (s3://, gs://, ...) as given."""
    if "://" in cfg.storage_path:
        return cfg.storage_path
    return str((base / cfg.storage_path).resolve())


# ---------------------------------------------------------------- failures


def describe_failure(err: Exception, run_dir: str) -> str:
    """The root cause of a failed fit, with the last good checkpoint to resume from."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [repr(err)]
    cause = next((line for line in lines if "NonFiniteLossError" in line), lines[-1])
    try:
        last = f"last good checkpoint: {find_checkpoint(run_dir)} (set train.resume_from to continue)"
    except (FileNotFoundError, ValueError):
        last = "no checkpoint was written"
    return f"training failed: {cause}\n{last}"


# ---------------------------------------------------------------- outputs


def write_curves(uri: str, run_id: str, csv_path: Path, png_path: Path | None) -> None:
    """Loss curves from the run's metric history -> a CSV for `dvc plots` and a PNG beside it."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    keys = sorted(k for k in client.get_run(run_id).data.metrics if k.startswith(("g/", "d/")) or k == "samples_per_s")
    rows: dict[int, dict[str, float]] = {}
    for key in keys:
        for point in client.get_metric_history(run_id, key):
            rows.setdefault(point.step, {"step": point.step})[key.replace("/", "_")] = point.value
    columns = ["step", *[k.replace("/", "_") for k in keys]]
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = csv_path.with_name(f".{csv_path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows[step] for step in sorted(rows))
    os.replace(tmp, csv_path)
    if png_path is not None and rows:
        atomic_write_bytes(png_path, viz.figure_png(viz.loss_figure([rows[s] for s in sorted(rows)])))


# ---------------------------------------------------------------- the run


@dataclass(frozen=True)
class Plan:
    """A training run resolved from params.yaml and the shard manifest: typed configs, absolute paths, names."""

    params: Mapping[str, Any]  # as given (recorded in MLflow with the training sections resolved)
    train: TrainConfig
    model: ModelConfig
    mlflow: MlflowConfig
    manifest: dict[str, Any]
    shard_dir: Path
    base: Path
    tracking_uri: str
    run_name: str
    storage: str
    resume_from: str | None

    @property
    def run_dir(self) -> str:
        return f"{self.storage}/{self.run_name}"


def resolve(params: Mapping[str, Any], shards: str | Path = "data/shards", base: str | Path = ".") -> Plan:
    """Configs and paths of a run; relative paths (shards, storage, vgg weights, sqlite tracking URI, artifacts)
    are resolved against `base`, since Ray workers run in another folder. Nothing is created yet."""
    base = Path(base).resolve()
    shard_dir = (base / shards).resolve()
    manifest, _ = read_manifest(shard_dir)
    train_cfg, model_cfg, mlflow_cfg = configs_from_params(params, manifest)
    verify_split(shard_dir, "train", train_cfg.verify_shards)  # a bad shard is no worker failure for Ray to retry
    if train_cfg.vgg_weights not in ("random", "imagenet"):
        train_cfg = dataclasses.replace(train_cfg, vgg_weights=str((base / train_cfg.vgg_weights).resolve()))
    resume_from = train_cfg.resume_from
    if resume_from and "://" not in resume_from:
        resume_from = str((base / resume_from).resolve())
    # A fresh folder per run: Ray would continue a run whose folder already exists (so a fixed
    # train.run_name re-run continues that run from its latest checkpoint).
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    return Plan(params=params, train=train_cfg, model=model_cfg, mlflow=mlflow_cfg, manifest=manifest,
                shard_dir=shard_dir, base=base, tracking_uri=tracking.tracking_uri(mlflow_cfg, base),
                run_name=train_cfg.run_name or f"{mlflow_cfg.experiment}-{stamp}",
                storage=storage_path(train_cfg, base), resume_from=resume_from)


def fit(plan: Plan) -> tuple[str, ray.train.Result, float]:
    """Create the MLflow run and train on Ray. -> (MLflow run id, Ray's result, wall seconds); a failure ends the
    run FAILED (KILLED on Ctrl-C) and raises TrainingError naming the cause and the last good checkpoint."""
    cfg, uri = plan.train, plan.tracking_uri
    if cfg.vgg_weights == "random":
        say("WARNING: train.vgg_weights=random: VGG19 has RANDOM weights, so the perceptual, feature-matching "
            "and contextual losses do not measure image quality. Use a vgg19_conv.pth path or 'imagenet'.")
    tags = {"vgg_weights": cfg.vgg_weights, "shards.manifest_sha256": tracking.manifest_sha256(plan.shard_dir),
            "shards.path": str(plan.shard_dir), "ray.run_dir": plan.run_dir, "workers": str(cfg.workers)}
    if plan.resume_from:
        tags["resumed_from"] = plan.resume_from
    resolved = {**plan.params, "model": plan.model.to_dict(), "train": cfg.to_dict(),
                "mlflow": dataclasses.asdict(plan.mlflow) | {"tracking_uri": uri}}  # defaults are recorded too
    experiment_id = tracking.ensure_experiment(uri, plan.mlflow, plan.base)
    run_id = tracking.create_run(uri, experiment_id, plan.run_name, resolved, tags)
    say(f"MLflow run {run_id} ({plan.run_name}) at {uri}; checkpoints in {plan.run_dir}")

    config = {"train": cfg.to_dict(), "model": plan.model.to_dict(), "shards": str(plan.shard_dir),
              "resume_from": plan.resume_from,
              "mlflow": {"tracking_uri": uri, "run_id": run_id, "system_metrics": plan.mlflow.system_metrics,
                         "log_model": plan.mlflow.log_model}}
    started_ray = connect_ray(cfg)
    trainer = TorchTrainer(
        train_loop, train_loop_config=config, scaling_config=scaling_config(cfg),
        run_config=ray.train.RunConfig(
            name=plan.run_name, storage_path=plan.storage,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures)))
    start = time.perf_counter()
    try:
        result = trainer.fit()
        stopped = (result.return_value or {}).get("stopped")
        if stopped:  # a guard stopped every worker (pipeline/train/guard.py): deterministic, so not retried
            raise FloatingPointError(stopped)
    except KeyboardInterrupt:
        tracking.end_run(uri, run_id, "KILLED")
        raise
    except Exception as err:
        tracking.end_run(uri, run_id, "FAILED")
        raise TrainingError(describe_failure(err, plan.run_dir)) from err
    finally:
        if started_ray:
            ray.shutdown()
    return run_id, result, time.perf_counter() - start


def publish(plan: Plan, run_id: str, result: ray.train.Result, wall: float, models_dir: str | Path | None = "models",
            metrics_path: str | Path | None = None, curves_path: str | Path | None = None) -> TrainingResult:
    """The finished run's outputs: the final generator exported to models_dir (with run.json), the run ended
    FINISHED, the last report as metrics_path, the loss curves as curves_path (+ .png)."""
    uri = plan.tracking_uri
    model_uri = (result.return_value or {}).get("model_uri")
    model_dir = None
    if models_dir:
        with result.checkpoint.as_directory() as folder:
            state = load_state(folder)
        run_info = {"mlflow_run_id": run_id, "tracking_uri": uri, "model_uri": model_uri, "step": int(state["step"]),
                    "checkpoint": result.checkpoint.path, "ray_run_dir": plan.run_dir,
                    "task": plan.manifest["task"], "source": plan.manifest["source"]}  # inference reads the task
        model_dir = export_model(plan.base / models_dir, state["net"], plan.model, run_info)
    tracking.end_run(uri, run_id, "FINISHED")
    metrics = dict(result.metrics or {})
    if metrics_path:
        atomic_write_json(plan.base / metrics_path,
                          {**metrics, "wall_s": round(wall, 1), "global_batch": plan.train.global_batch})
    if curves_path:
        curves = plan.base / curves_path
        write_curves(uri, run_id, curves, curves.with_suffix(".png"))
    say(f"done in {wall:.0f}s: step {metrics.get('step')}, model {model_dir or '-'}, MLflow model {model_uri or '-'}")
    return TrainingResult(run_id=run_id, tracking_uri=uri, run_dir=plan.run_dir, checkpoint=result.checkpoint.path,
                          model_dir=model_dir, model_uri=model_uri, metrics=metrics,
                          reports=[dict(m) for _, m in result.best_checkpoints or []], wall_s=wall)


def run_training(params: Mapping[str, Any], *, shards: str | Path = "data/shards",
                 models_dir: str | Path | None = "models", metrics_path: str | Path | None = None,
                 curves_path: str | Path | None = None, base: str | Path = ".") -> TrainingResult:
    """The train stage: resolve the run, fit it on Ray, publish its outputs (see each)."""
    plan = resolve(params, shards, base)
    run_id, result, wall = fit(plan)
    return publish(plan, run_id, result, wall, models_dir, metrics_path, curves_path)
