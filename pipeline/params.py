"""Read and check params.yaml: the one file of pipeline settings whose sections DVC tracks per stage.

Every section is a typed dataclass (DataConfig, ShardConfig, ModelConfig, TrainConfig, MlflowConfig, EvalConfig,
RegisterConfig) whose annotations are the schema: `from_mapping` refuses unknown keys and any value that is not
of the annotated type, with the key path and the reason; each class's __post_init__ checks ranges.
`validate_params` checks every section at once, so that each stage refuses a bad params.yaml before it works.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import functools
import inspect
import math
import types
import typing
from pathlib import Path
from typing import Any, Mapping

import yaml

SECTIONS = ("data", "shard", "model", "train", "mlflow", "evaluate", "register")


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
        raise ValueError(f"params.yaml {name}: must be a mapping of keys, got {type(value).__name__}")
    return value


# ---------------------------------------------------------------- strict types


class _Mismatch(ValueError):
    """`value` at `where` is not what the annotation takes."""

    def __init__(self, where: str, expected: str, value: Any):
        self.where, self.expected = where, expected
        super().__init__(f"params.yaml {where}: expected {expected}, got {value!r} ({type(value).__name__})")


def check_value(value: Any, hint: Any, where: str) -> Any:
    """`value` as annotation `hint` takes it, else ValueError("params.yaml <where>: expected ..., got ..."). Nothing
    is converted (a quoted "1e-3" is text, 1.7 no integer, "no" no boolean) except an integer where a float is
    expected and a YAML list where a tuple is."""
    def fail(expected: str) -> typing.NoReturn:
        raise _Mismatch(where, expected, value)

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if hint is type(None):
        return value if value is None else fail("null")
    if origin in (typing.Union, types.UnionType):
        expected, deeper = [], None
        for option in args:
            try:
                return check_value(value, option, where)
            except _Mismatch as err:
                if err.where == where:
                    expected.append(err.expected)
                else:  # the value has this option's shape, one of its parts is wrong: the more useful error
                    deeper = deeper or err
        raise deeper or _Mismatch(where, " or ".join(dict.fromkeys(expected)), value)
    if origin is typing.Literal:
        if not any(value == a and type(value) is type(a) for a in args):
            fail(f"one of {', '.join(map(repr, args))}")
        return value
    if hint is bool:
        return value if isinstance(value, bool) else fail("true or false")
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else fail("an integer")
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail("a number")
        return float(value) if math.isfinite(value) else fail("a finite number")
    if hint is str:
        return value if isinstance(value, str) else fail("text")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            fail("a list")
        any_length = origin is list or (len(args) == 2 and args[1] is Ellipsis)
        items = args[:1] * len(value) if any_length else args
        if len(items) != len(value):
            fail(f"a list of {len(items)} values")
        checked = [check_value(v, h, f"{where}[{i}]") for i, (v, h) in enumerate(zip(value, items))]
        return tuple(checked) if origin is tuple else checked
    if origin in (dict, collections.abc.Mapping) or hint is dict:
        if not isinstance(value, Mapping):
            fail("a mapping")
        key_hint, value_hint = args or (str, Any)
        return {check_value(k, key_hint, f"{where} key"): check_value(v, value_hint, f"{where}.{k}")
                for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, Mapping):
            fail("a mapping")
        return from_mapping(hint, value, where)
    raise TypeError(f"params schema: the checker does not know the annotation {hint!r} of {where}")


@functools.cache
def field_types(cls) -> dict[str, Any]:
    """The resolved annotations of a dataclass's fields."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def check_fields(cls, values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """values checked against dataclass `cls`: unknown keys and values of the wrong type are refused."""
    types_ = field_types(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise ValueError(f"params.yaml {where}: unknown keys {unknown}; known: {sorted(types_)}")
    return {name: check_value(value, types_[name], f"{where}.{name}") for name, value in values.items()}


def from_mapping(cls, values: Mapping[str, Any], where: str):
    """Build dataclass `cls` from a params mapping, refusing unknown keys and wrong types (a typo must not silently
    fall back to a default); range errors of its __post_init__ are prefixed with the section."""
    checked = check_fields(cls, values, where)
    try:
        return cls(**checked)
    except ValueError as err:
        message = str(err)
        first_word = message.split(" ", 1)[0]
        if first_word in field_types(cls):  # "nef must be >= 1, got 0"
            message = f"params.yaml {where}.{message}"
        elif not message.startswith("params.yaml"):  # some name the key path already
            message = f"params.yaml {message}" if first_word.startswith(f"{where.split('.')[0]}.") \
                else f"params.yaml {where}: {message}"
        raise ValueError(message) from None


# ---------------------------------------------------------------- the whole file


def check_source_options(source: str, options: Mapping[str, Any]) -> None:
    """data.<source>: the keyword arguments of that source's constructor, of their annotated types."""
    from pipeline.data.sources import SOURCES

    if source not in SOURCES:
        raise ValueError(f"params.yaml data.source: expected one of {sorted(SOURCES)}, got {source!r}")
    hints = typing.get_type_hints(SOURCES[source].__init__)
    knobs = [name for name in inspect.signature(SOURCES[source].__init__).parameters
             if name not in ("self", "root", "task", "image_size", "label_nc", "seed")]
    unknown = sorted(set(options) - set(knobs))
    if unknown:
        raise ValueError(f"params.yaml data.{source}: unknown keys {unknown}; known: {sorted(knobs)}")
    for name, value in options.items():
        check_value(value, hints.get(name, Any), f"data.{source}.{name}")


def validate_params(params: Mapping[str, Any]) -> None:
    """Check every section of params.yaml (what each stage does first): unknown sections and keys, wrong types,
    values out of range, and an image size or class count the model cannot take. Raises ValueError."""
    from model.config import check_image_size
    from pipeline.data.config import DataConfig, ShardConfig
    from pipeline.evaluate import EvalConfig
    from pipeline.registry import RegisterConfig
    from pipeline.train.config import TrainConfig, model_config_from_params
    from pipeline.tracking import MlflowConfig

    unknown = sorted(set(params) - set(SECTIONS))
    if unknown:
        raise ValueError(f"params.yaml: unknown sections {unknown}; known: {list(SECTIONS)}")
    data = DataConfig.from_params(section(params, "data"))
    check_source_options(data.source, data.source_options)
    try:
        check_image_size(data.image_size)
    except ValueError as err:
        raise ValueError(f"params.yaml data.image_size: the model cannot take it: {err}") from None
    ShardConfig.from_params(section(params, "shard"))
    model_config_from_params(section(params, "model"), {"image_size": data.image_size, "label_nc": data.label_nc})
    TrainConfig.from_dict(section(params, "train"))
    MlflowConfig.from_params(params)
    EvalConfig.from_dict(section(params, "evaluate"))
    RegisterConfig.from_dict(section(params, "register"))
