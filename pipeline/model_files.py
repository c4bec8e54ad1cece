"""The model folder: a generator's state dict and its ModelConfig, no pickled code; and `load_model` for any model ref.

    models/state_dict.pt      CoCosNet state dict (torch.save of tensors; load with weights_only=True)
    models/model_config.json  ModelConfig.to_dict()
    models/run.json           where it came from: MLflow run and model URI, checkpoint, step, data task

The same two files are the artifacts of the logged MLflow model (pipeline/pyfunc_model.py), so one reader serves
an exported folder, a converted official model and a model in MLflow:

    load_model("models")                       # a model folder (DVC out, or written by convert-official)
    load_model("models:/cocosnet@champion")    # a registered model
    load_model("runs:/<run id>/model")         # a run's logged model
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

from model import CoCosNet, ModelConfig

STATE_DICT_FILE, MODEL_CONFIG_FILE, RUN_FILE = "state_dict.pt", "model_config.json", "run.json"


def write_model_files(folder: Path, state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig) -> None:
    """The model's files in `folder`; a state dict holding NaN/Inf is refused (every export and logged model)."""
    bad = next((name for name, t in state_dict.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if bad:
        raise ValueError(f"{folder}: refusing to write a model whose {bad} holds NaN or Inf values")
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(dict(state_dict), folder / STATE_DICT_FILE)
    (folder / MODEL_CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=1, sort_keys=True))


def read_run_info(folder: str | Path) -> dict[str, Any]:
    """A model folder's run.json ({} when it has none, e.g. a hand-made folder); bad JSON is a ValueError."""
    path = Path(folder) / RUN_FILE
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text())
    except ValueError:
        raise ValueError(f"{path}: invalid JSON") from None
    if not isinstance(info, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return info


def export_model(out_dir: str | Path, state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig,
                 run_info: Mapping[str, Any]) -> Path:
    """Write out_dir atomically: a sibling temp folder is filled, then swapped in (readers never see half)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the export is an ordinary output folder
    try:
        write_model_files(tmp, state_dict, cfg)
        (tmp / RUN_FILE).write_text(json.dumps(dict(run_info), indent=1, sort_keys=True))
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def read_model_files(folder: str | Path, device: torch.device | str = "cpu") -> CoCosNet:
    """A model folder (or the artifacts of a logged MLflow model) -> CoCosNet in eval mode."""
    folder = Path(folder)
    for name in (STATE_DICT_FILE, MODEL_CONFIG_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder}: not an exported CoCosNet model (missing {name})")
    cfg = ModelConfig.from_dict(json.loads((folder / MODEL_CONFIG_FILE).read_text()))
    net = CoCosNet(cfg)
    net.load_state_dict(torch.load(folder / STATE_DICT_FILE, map_location="cpu", weights_only=True))
    return net.to(device).eval()


def load_model(ref: str | Path, device: torch.device | str = "cpu", tracking_uri: str | None = None) -> CoCosNet:
    """CoCosNet in eval mode from a model folder or an MLflow model URI (models:/name@alias, models:/name/version,
    runs:/<id>/model, models:/m-<id>). tracking_uri: the MLflow store a URI refers to (default: MLflow's own,
    i.e. $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working folder)."""
    if Path(ref).is_dir():
        return read_model_files(ref, device)
    if ":/" not in str(ref):
        raise FileNotFoundError(f"{ref}: neither a model folder nor an MLflow model URI "
                                "(models:/<name>@<alias>, runs:/<run id>/model)")
    import mlflow  # a slow import: only for URIs

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=str(ref), tracking_uri=tracking_uri,
                                                         registry_uri=tracking_uri))
    return read_model_files(local / "artifacts", device)
