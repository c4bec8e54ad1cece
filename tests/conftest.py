"""Shared test fixtures."""
from __future__ import annotations

import os
from pathlib import Path

# Spinning OpenMP threads starve each other (and Ray workers) on a small shared machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

from pipeline.mkl_vml import settle_vml_dispatch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
settle_vml_dispatch()  # tests that build a model themselves (the parity tests) get exact first forward passes too


def fixtures_dir() -> Path:
    """Reference tensors live outside the repo: $COCOSNET_FIXTURES or ../shared/fixtures."""
    return Path(os.environ.get("COCOSNET_FIXTURES", REPO_ROOT.parent / "shared" / "fixtures"))


def in_ci() -> bool:
    """CI=true (or 1, yes): what may skip on a user's machine must run, or fail, there."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_fixture(name: str, marker_file: str, what: str) -> Path:
    """fixtures_dir()/name, or skip (fail under CI) when its marker file is absent."""
    path = fixtures_dir() / name
    if not (path / marker_file).exists():
        if in_ci():
            pytest.fail(f"official parity fixtures missing at {path}: CI must run the parity tests")
        pytest.skip(f"official {what} parity fixtures not found at {path} (set COCOSNET_FIXTURES)")
    return path


@pytest.fixture(scope="session")
def official_v2_dir() -> Path:
    return require_fixture("official_v2", "weights.pt", "CoCosNet-v2")


@pytest.fixture(scope="session")
def official_v1_dir() -> Path:
    return require_fixture("official_v1", "case_a.pt", "CoCosNet (v1)")


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


# ---------------------------------------------------------------- training tests (tests/test_train_*.py)

TRAIN_DATA = {"source": "synthetic", "task": "mask", "image_size": 64, "label_nc": 12, "seed": 0}


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory) -> Path:
    """Tiny synthetic shards for training: 24 images at 64x64, 12 classes, one pseudo exemplar each,
    4 samples per shard (train: 5 shards, val: 4)."""
    from pipeline.data.config import AugmentConfig, ShardConfig
    from pipeline.data.prepare import prepare_dataset
    from pipeline.data.shards import write_shards
    from pipeline.data.sources import get_source

    work = tmp_path_factory.mktemp("train_data")
    source_cfg = {k: v for k, v in TRAIN_DATA.items() if k != "source"}
    prepare_dataset(get_source("synthetic", **source_cfg, num_images=24), work / "prepared", progress=False)
    cfg = ShardConfig(pseudo_per_image=1, samples_per_shard=4, min_shards_per_split=4, val_fraction=0.25,
                      max_skipped_fraction=0.5, num_workers=1, augment=AugmentConfig())
    write_shards(work / "prepared", work / "shards", cfg, seed=0, progress=False)
    return work / "shards"


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for the module. Other work may share this machine's cores, and OpenMP threads that
    spin-wait for a busy core made a 2-thread forward pass ~30x slower than a 1-thread one here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(train_shards, tmp_path_factory) -> Path:
    """A tiny model trained for a few steps on `train_shards` (made once per session; tests/tiny_translation.py)."""
    from tests.tiny_translation import trained_model_dir

    return trained_model_dir(train_shards, tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """Translation inputs on disk: 3 input maps, exemplars and exemplar maps (tests/tiny_translation.py)."""
    from tests.tiny_translation import write_pairs

    return write_pairs(tmp_path_factory.mktemp("pairs"), 3)
