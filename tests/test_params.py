"""params.yaml's schema (pipeline/params.py): every probe of the issue is refused with the key path and the reason,
by every stage before it works."""
from __future__ import annotations

import copy

import pytest
import yaml

from pipeline.cli import main
from pipeline.params import load_params, validate_params
from tests.conftest import REPO_ROOT

PARAMS = load_params(REPO_ROOT / "params.yaml")


@pytest.mark.parametrize("path", ["params.yaml", "params/deepfashion-512-gpu.yaml", "params/ade20k-v1.yaml",
                                  "params/celebahq-edge-v1.yaml", "params/deepfashion-v1.yaml"])
def test_the_shipped_params_files_pass(path):
    validate_params(load_params(REPO_ROOT / path))


def changed(path: str, value) -> dict:
    params, *keys, last = copy.deepcopy(PARAMS), *path.split(".")
    target = params
    for key in keys:
        target = target.setdefault(key, {})
    target[last] = value
    return params


PROBES = [  # (key path, value, the error's text)
    ("trian", {"steps": 3}, r"params.yaml: unknown sections \['trian'\]"),
    ("train.stesp", 3, r"params.yaml train: unknown keys \['stesp'\]"),
    ("train.lr", "1e-3", r"params.yaml train.lr: expected a number, got '1e-3' \(str\)"),  # YAML: a string
    ("train.steps", 1.7, r"params.yaml train.steps: expected an integer, got 1.7"),
    ("model.nef", 0, r"params.yaml model.nef must be >= 1, got 0"),
    ("train.use_gpu", "no", r"params.yaml train.use_gpu: expected true or false, got 'no'"),
    ("train.lr", float("inf"), r"params.yaml train.lr: expected a finite number, got inf"),
    ("train.lr", 0.0, r"params.yaml train.lr .* must be > 0"),
    ("train.generator_lr_scale", -1.0, r"params.yaml train.generator_lr_scale must be > 0"),
    ("data.image_size", 48, r"params.yaml data.image_size: the model cannot take it: .*multiples of 32 and at least 64"),
    ("data.image_size", [64, "64"], r"params.yaml data.image_size\[1\]: expected an integer"),
    ("train.loss.pixel", "1e38", r"params.yaml train.loss.pixel: expected a number"),
    ("train.loss.pixle", 1.0, r"unknown loss weights \['pixle'\]"),
    ("train.amp", "fp32", r"params.yaml train.amp: expected one of 'none', 'bf16', 'fp16', got 'fp32'"),
    ("train.audit", {"fail_at_step": 2.5}, r"params.yaml train.audit.fail_at_step: expected an integer or null"),
    ("train.divergence_factor", 0.5, r"params.yaml train.divergence_factor must be > 1"),
    ("shard.augment.scale", [0.9], r"params.yaml shard.augment.scale: expected a list of 2 values"),
    ("shard.augment.flip_prob", 2.0, r"params.yaml shard.augment.flip_prob must be in \[0, 1\]"),
    ("data.synthetic.num_images", "3", r"params.yaml data.synthetic.num_images: expected an integer"),
    ("data.synthetic.num_imgs", 3, r"params.yaml data.synthetic: unknown keys \['num_imgs'\]"),
    ("data.source", "imagenet", r"params.yaml data.source: expected one of"),
    ("mlflow.system_metrics", "yes", r"params.yaml mlflow.system_metrics: expected true or false"),
    ("evaluate.pck_thresholds", [1, "x"], r"params.yaml evaluate.pck_thresholds\[1\]: expected a number"),
    ("register.min_improvement", None, r"params.yaml register.min_improvement: expected a number, got None"),
    ("model.image_size", 64, r"params.yaml model.image_size: the model takes it from the shards' manifest"),
]


@pytest.mark.parametrize("path, value, message", PROBES, ids=[f"{p}={v!r}" for p, v, _ in PROBES])
def test_a_bad_value_is_refused_with_its_key_path_and_reason(path, value, message):
    with pytest.raises(ValueError, match=message):
        validate_params(changed(path, value))


@pytest.mark.parametrize("stage", ["prepare", "shard", "train", "evaluate", "register"])
def test_every_stage_refuses_a_bad_params_file_before_it_works(stage, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(changed("data.image_size", 48)))
    out = tmp_path / "out"  # every stage's output option: none of them may be written
    options = {"prepare": ["--out", out], "shard": ["--prepared", tmp_path, "--out", out],
               "train": ["--shards", tmp_path, "--out", out], "evaluate": ["--model", tmp_path, "--metrics", out],
               "register": ["--model", tmp_path, "--out", out]}[stage]
    assert main([stage, "--params", str(params), *map(str, options)]) == 1
    assert "params.yaml data.image_size: the model cannot take it" in capsys.readouterr().err
    assert not out.exists()
