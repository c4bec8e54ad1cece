"""Shared test fixtures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def fixtures_dir() -> Path:
    """Reference tensors live outside the repo: $COCOSNET_FIXTURES or ../shared/fixtures."""
    return Path(os.environ.get("COCOSNET_FIXTURES", REPO_ROOT.parent / "shared" / "fixtures"))


@pytest.fixture(scope="session")
def official_v2_dir() -> Path:
    path = fixtures_dir() / "official_v2"
    if not (path / "weights.pt").exists():
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"official parity fixtures missing at {path}: CI must run the parity tests")
        pytest.skip(f"official CoCosNet-v2 parity fixtures not found at {path} (set COCOSNET_FIXTURES)")
    return path


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield
