"""MLflow tracking for the pipeline: where runs live (MlflowConfig), runs, params, metrics, sample grids, the logged
model (pipeline/pyfunc_model.py), and the evaluation published to the model's run.

The training driver creates the run (params, tags); Ray's rank 0 logs into it during training (losses, throughput,
grids); the driver logs the final model from its own source tree; the evaluate stage publishes its Evaluation into
the same run. Models are read back with pipeline.model_files.load_model.

Tracking URI: params `mlflow.tracking_uri`, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db, with the
artifacts of new experiments in mlartifacts/ when the store is local.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import mlflow
import numpy as np
import torch
from mlflow.entities import Param

from model import ModelConfig
from pipeline import serving
from pipeline.model_files import MODEL_CONFIG_FILE, STATE_DICT_FILE, read_run_info, write_model_files
from pipeline.params import from_mapping, section

PYFUNC_CODE = Path(__file__).resolve().parent / "pyfunc_model.py"
MODEL_PACKAGE = Path(__file__).resolve().parents[1] / "model"
MODEL_NAME = "model"  # name of the logged model inside a run: runs:/<id>/model
SAMPLES_KEY = "samples"  # sample grids: images/samples+step+<n>+...png
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


@dataclass(frozen=True)
class MlflowConfig:
    """The `mlflow:` section of params.yaml. The URI comes from params, else $MLFLOW_TRACKING_URI, else
    sqlite:///mlflow.db."""

    tracking_uri: str | None = None
    experiment: str = "cocosnet"
    artifact_location: str = "mlartifacts"  # for new experiments on a local (sqlite/file) store
    system_metrics: bool = False  # CPU/memory/GPU sampled by MLflow every 10 s
    log_model: bool = True  # log the final model as a pyfunc (config + state dict, no pickle)

    @property
    def resolved_uri(self) -> str:
        return self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "MlflowConfig":
        return from_mapping(cls, dict(values), "mlflow")

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "MlflowConfig":
        return cls.from_dict(section(params, "mlflow"))


# ---------------------------------------------------------------- URIs, experiments and runs


def absolute_tracking_uri(uri: str, base: str | Path = ".") -> str:
    """sqlite:///relative.db -> sqlite:////abs/relative.db (Ray workers run in another working folder)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str((Path(base) / uri[len("sqlite:///"):]).resolve())
    if uri.startswith("file:"):
        return Path(base, uri[len("file:"):].removeprefix("//")).resolve().as_uri()
    if "://" not in uri and uri.startswith(("/", ".")):  # a bare folder (but not e.g. "databricks")
        return Path(base, uri).resolve().as_uri()
    return uri


def is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:"))


def tracking_uri(cfg: MlflowConfig, base: str | Path = ".") -> str:
    return absolute_tracking_uri(cfg.resolved_uri, base)


def ensure_experiment(uri: str, cfg: MlflowConfig, base: str | Path = ".") -> str:
    """-> the experiment id, creating it (artifacts in cfg.artifact_location for local stores)."""
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(cfg.experiment)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if is_local_store(uri):
        location = (Path(base) / cfg.artifact_location / cfg.experiment).resolve().as_uri()
    return client.create_experiment(cfg.experiment, artifact_location=location)


def flatten(tree: Mapping[str, Any], separator: str, prefix: str = "") -> dict[str, Any]:
    """{"corr": {"pck_3": 0.5}} -> {"corr<separator>pck_3": 0.5}: MLflow names are flat (empty mappings are leaves)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat |= flatten(value, separator, f"{name}{separator}")
        else:
            flat[name] = value
    return flat


def flatten_params(params: Mapping[str, Any]) -> dict[str, str]:
    """{"train": {"lr": 1e-4}} -> {"train.lr": "0.0001"} (MLflow params are flat strings)."""
    return {name: str(value) for name, value in flatten(params, ".").items()}


def manifest_sha256(shard_dir: str | Path) -> str:
    """sha256 of the shards' manifest.json: it lists every shard with its own sha256."""
    return hashlib.sha256((Path(shard_dir) / "manifest.json").read_bytes()).hexdigest()


def create_run(uri: str, experiment_id: str, run_name: str, params: Mapping[str, Any],
               tags: Mapping[str, str]) -> str:
    """A new run with params.yaml flattened into params; -> run id."""
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags))
    items = [Param(k, v) for k, v in flatten_params(params).items()]
    for start in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
        client.log_batch(run.info.run_id, params=items[start : start + 100])
    return run.info.run_id


def reopen_run(uri: str, run_id: str, tags: Mapping[str, str]) -> None:
    """An interrupted run RUNNING again (it is being continued), with `tags` set."""
    client = mlflow.MlflowClient(tracking_uri=uri)
    client.update_run(run_id, status="RUNNING")
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


def end_run(uri: str, run_id: str, status: str) -> None:
    mlflow.MlflowClient(tracking_uri=uri).set_terminated(run_id, status)


# ---------------------------------------------------------------- rank 0, inside training


def resume_run(uri: str, run_id: str, system_metrics: bool) -> mlflow.ActiveRun:
    """Make the driver's run the active run of this process (rank 0 of every attempt, retries included)."""
    mlflow.set_tracking_uri(uri)
    return mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics)


def end_active_run() -> None:
    mlflow.end_run()


def last_logged_step(uri: str, run_id: str, key: str = "g/total") -> int:
    """The last step of `key` logged in the run (0 if none): a resumed run does not log those steps again."""
    return max((m.step for m in mlflow.MlflowClient(tracking_uri=uri).get_metric_history(run_id, key)), default=0)


def log_metrics(metrics: Mapping[str, float], step: int) -> None:
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_grid(grid: np.ndarray, step: int) -> None:
    mlflow.log_image(grid, key=SAMPLES_KEY, step=step, synchronous=True)


def log_model(state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig) -> str:
    """Log the generator as a pyfunc "model from code" in the active run; -> its model URI.

    Artifacts are model_config.json and state_dict.pt; the `model` package travels as code, so the logged
    model loads anywhere with torch and mlflow, without this repository and without unpickling.
    """
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per file in worker logs
    with tempfile.TemporaryDirectory() as tmp:
        write_model_files(Path(tmp), state_dict, cfg)
        with warnings.catch_warnings(record=True):  # advice to add an input example: the signature describes the inputs
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME, python_model=str(PYFUNC_CODE), code_paths=[str(MODEL_PACKAGE)],
                artifacts={"model_config": str(Path(tmp) / MODEL_CONFIG_FILE),
                           "state_dict": str(Path(tmp) / STATE_DICT_FILE)},
                signature=serving.signature(cfg),  # MLflow checks requests against it
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
                                  f"numpy=={np.__version__}"])
    return info.model_uri


def log_model_to_run(uri: str, run_id: str, state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig) -> str:
    """log_model into run `run_id` from this process (the training driver); -> the model URI."""
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        return log_model(state_dict, cfg)


# ---------------------------------------------------------------- the evaluate stage


def model_run_id(model_ref: str | Path, uri: str) -> str | None:
    """The MLflow run a model came from: run.json of a model folder, else the model URI's own record."""
    if Path(model_ref).is_dir():
        return read_run_info(model_ref).get("mlflow_run_id")
    mlflow.set_tracking_uri(uri)
    return mlflow.models.get_model_info(str(model_ref)).run_id


def publish_evaluation(uri: str, run_id: str, metrics: Mapping[str, Any], *, skipped: Mapping[str, str],
                       curves: Mapping[str, Any], pck_figure: Any, grid: np.ndarray | None,
                       tags: Mapping[str, str]) -> None:
    """An evaluation into the model's run: metrics as eval/<name>, why any were skipped as eval.skipped.<name>
    tags, and eval/eval.json, eval/pck.json (the PCK curves, appended to on re-evaluation), eval/pck.png and
    eval/samples.png."""
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({f"eval/{name}": float(value) for name, value in flatten(metrics, "/").items()})
        mlflow.set_tags({**{f"eval.skipped.{name}": reason for name, reason in skipped.items()}, **tags})
        mlflow.log_dict(dict(metrics), "eval/eval.json")
        mlflow.log_table(dict(curves), "eval/pck.json")
        mlflow.log_figure(pck_figure, "eval/pck.png")
        if grid is not None:
            mlflow.log_image(grid, "eval/samples.png")
