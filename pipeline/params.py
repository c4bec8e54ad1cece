"""Read params.yaml: the one file of pipeline settings whose sections DVC tracks per stage."""
from __future__ import annotations

from pathlib import Path

import yaml


def load_params(path: str | Path = "params.yaml") -> dict:
    """Return params.yaml as a dict (yaml.safe_load: plain data only, never Python objects)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: params file not found (run from the repository root)") from None
    params = yaml.safe_load(text)
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise ValueError(f"{path}: expected a mapping of sections at the top level, got {type(params).__name__}")
    return params


def section(params: dict, name: str) -> dict:
    """One top-level section (e.g. "data"), {} when absent; an error when it is not a mapping."""
    value = params.get(name) or {}
    if not isinstance(value, dict):
        raise ValueError(f"params section {name!r} must be a mapping, got {type(value).__name__}")
    return value
