"""MLflow model registry: register the trained model as `challenger`, promote it to `champion` when it is better.

    decision = run_register(load_params("params.yaml"))        # the register stage: models/ + metrics/eval.json
    decision = register_model(client, model_uri, run_id, metrics, RegisterConfig())

The decision compares `register.metric` (a metrics/eval.json path such as "corr/pck_3") of the new model with
the same metric recorded on the current champion's version. The first model becomes champion. The decision
is recorded as tags on the new version (and returned, for metrics/register.json).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline import tracking
from pipeline.data.imageio import atomic_write_json
from pipeline.model_files import RUN_FILE, read_run_info
from pipeline.params import from_mapping, section

CHALLENGER, CHAMPION = "challenger", "champion"


@dataclass(frozen=True)
class RegisterConfig:
    """The `register:` section of params.yaml."""

    name: str = "cocosnet"  # registered model name: models:/cocosnet@champion
    metric: str = "corr/pck_3"  # a metrics/eval.json path, "/"-separated
    greater_is_better: bool = True
    min_improvement: float = 0.0  # promote only when better by more than this

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "RegisterConfig":
        return from_mapping(cls, dict(values), "register")


@dataclass(frozen=True)
class Decision:
    version: int
    promoted: bool
    value: float
    champion_version: int | None  # the champion before this decision
    champion_value: float | None
    reason: str

    def to_metrics(self) -> dict[str, float | int]:
        """Numbers only (DVC metrics): absent champion fields are left out."""
        out: dict[str, float | int] = {"version": self.version, "promoted": int(self.promoted), "value": self.value}
        if self.champion_version is not None:
            out["previous_champion_version"] = self.champion_version
        if self.champion_value is not None:
            out["previous_champion_value"] = self.champion_value
        return out


def metric_value(metrics: Mapping[str, Any], path: str, where: str) -> float:
    """metrics["corr"]["pck_3"] for path "corr/pck_3"; a clear error naming the missing part."""
    node: Any = metrics
    for part in path.split("/"):
        if not isinstance(node, Mapping) or part not in node:
            raise ValueError(f"{where}: no metric {path!r} (register.metric); it has {sorted(metrics)}")
        node = node[part]
    return float(node)


def is_better(value: float, than: float, cfg: RegisterConfig) -> bool:
    margin = value - than if cfg.greater_is_better else than - value
    return margin > cfg.min_improvement


def find_or_create_version(client: MlflowClient, name: str, model_uri: str, run_id: str | None) -> int:
    """The version of `name` made from this run (re-running the stage must not register it twice), else a new one."""
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="CoCosNet v2 exemplar-based translation (dvc repro)")
    if run_id:
        for version in client.search_model_versions(f"name='{name}' and run_id='{run_id}'"):
            if version.source == model_uri or version.tags.get("source_uri") == model_uri:
                return int(version.version)
    version = client.create_model_version(name, source=model_uri, run_id=run_id, tags={"source_uri": model_uri})
    return int(version.version)


def current_champion(client: MlflowClient, name: str, metric: str) -> tuple[int | None, float | None]:
    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None, None
    recorded = version.tags.get(f"eval.{metric}")
    return int(version.version), (float(recorded) if recorded is not None else None)


def register_model(client: MlflowClient, model_uri: str, run_id: str | None, metrics: Mapping[str, Any],
                   cfg: RegisterConfig, where: str = "metrics/eval.json") -> Decision:
    value = metric_value(metrics, cfg.metric, where)
    version = find_or_create_version(client, cfg.name, model_uri, run_id)
    client.set_model_version_tag(cfg.name, str(version), f"eval.{cfg.metric}", str(value))
    client.set_registered_model_alias(cfg.name, CHALLENGER, str(version))

    champion, champion_value = current_champion(client, cfg.name, cfg.metric)
    direction = "higher" if cfg.greater_is_better else "lower"
    if champion is None:
        promoted, reason = True, "first registered model"
    elif champion == version:
        promoted, reason = True, f"already champion (v{version})"
    elif champion_value is None:
        promoted, reason = True, f"champion v{champion} has no recorded {cfg.metric}"
    elif is_better(value, champion_value, cfg):
        promoted, reason = True, f"{cfg.metric} {value:.4g} beats champion v{champion} {champion_value:.4g} ({direction} is better)"
    else:
        promoted, reason = False, (f"{cfg.metric} {value:.4g} does not beat champion v{champion} "
                                   f"{champion_value:.4g} ({direction} is better, margin {cfg.min_improvement:g})")
    if promoted:
        client.set_registered_model_alias(cfg.name, CHAMPION, str(version))
    tags = {"register.decision": "promoted" if promoted else "kept_champion", "register.reason": reason,
            "register.metric": cfg.metric, "register.value": str(value)}
    if champion_value is not None:
        tags["register.champion_value"] = str(champion_value)
    for key, text in tags.items():
        client.set_model_version_tag(cfg.name, str(version), key, text)
    return Decision(version, promoted, value, champion, champion_value, reason)


def run_register(params: Mapping[str, Any], model_dir: str | Path = "models",
                 eval_path: str | Path = "metrics/eval.json",
                 out_path: str | Path | None = "metrics/register.json") -> Decision:
    """The register stage: the MLflow model named in model_dir/run.json, judged by the evaluate stage's metrics
    (register.metric in eval_path); the decision also goes to out_path."""
    cfg = RegisterConfig.from_dict(section(params, "register"))
    run_file, eval_file = Path(model_dir) / RUN_FILE, Path(eval_path)
    for path in (run_file, eval_file):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (run the train and evaluate stages first)")
    run = read_run_info(model_dir)
    if not run.get("model_uri"):
        raise ValueError(f"{run_file}: no MLflow model_uri (was mlflow.log_model false for this training run?)")
    client = MlflowClient(tracking_uri=tracking.tracking_uri(tracking.MlflowConfig.from_params(params)))
    decision = register_model(client, run["model_uri"], run.get("mlflow_run_id"), json.loads(eval_file.read_text()),
                              cfg, where=str(eval_file))
    if out_path:
        atomic_write_json(out_path, decision.to_metrics())
    return decision
