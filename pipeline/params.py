"""Read params.yaml: the one file of pipeline settings whose sections DVC tracks per stage."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

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


def from_mapping(cls, values: Mapping[str, Any], where: str):
    """Build dataclass `cls` from a params mapping, refusing unknown keys (a typo must not silently fall back)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"params.yaml {where}: unknown keys {unknown}; known: {sorted(known)}")
    return cls(**values)
