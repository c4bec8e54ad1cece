"""Training checkpoints: one folder per checkpoint, plain tensors only (loadable with weights_only=True).

    <checkpoint>/state.pt        rank 0: step, networks, optimizers, AMP scalers
    <checkpoint>/rank-<r>.pt     every rank: its RNG states (torch, CUDA, numpy, python) and data position
    <checkpoint>/meta.json       rank 0: step, world size, configs, MLflow run id (human-readable)

Under Ray Train every rank reports its own folder and Ray merges them into one checkpoint in storage.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.train.step import TrainParts, unwrap

FORMAT = "cocosnet-train-checkpoint/1"
STATE_FILE, META_FILE = "state.pt", "meta.json"
RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # written by Ray Train's controller


def rank_file(rank: int) -> str:
    return f"rank-{rank}.pt"


@dataclass
class DataPosition:
    """Where a rank is in its data: full batches already consumed in `epoch`."""

    epoch: int = 0
    batches: int = 0


# ---------------------------------------------------------------- RNG states as tensors


def rng_state() -> dict[str, Any]:
    """All RNG states of this process as tensors and numbers (no pickled objects)."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
             "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                        "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- save / load


def save_rank_state(folder: Path, rank: int, position: DataPosition) -> None:
    torch.save({"rng": rng_state(), "data_epoch": position.epoch, "data_batches": position.batches},
               folder / rank_file(rank))


def save_training_state(folder: Path, parts: TrainParts, step: int, meta: dict[str, Any]) -> None:
    """Rank 0's part of a checkpoint: networks (unwrapped), optimizers, scalers, step; then meta.json."""
    torch.save({"step": step,
                "net": unwrap(parts.net).state_dict(),
                "discriminator": unwrap(parts.discriminator).state_dict(),
                "opt_g": parts.opt_g.state_dict(), "opt_d": parts.opt_d.state_dict(),
                "scaler_g": parts.scaler_g.state_dict(), "scaler_d": parts.scaler_d.state_dict()},
               folder / STATE_FILE)
    (folder / META_FILE).write_text(json.dumps({"format": FORMAT, "step": step, "saved_at": time.time(), **meta},
                                               indent=1, sort_keys=True))


def read_meta(folder: str | Path) -> dict[str, Any]:
    meta = json.loads((Path(folder) / META_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{folder}: not a training checkpoint of format {FORMAT}")
    return meta


def load_state(folder: str | Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """state.pt of a checkpoint (weights_only: tensors and plain containers only)."""
    return torch.load(Path(folder) / STATE_FILE, map_location=device, weights_only=True)


def restore_training_state(folder: Path, parts: TrainParts) -> int:
    """Load networks, optimizers and scalers into parts; -> the step the checkpoint was taken after."""
    state = load_state(folder, parts.device)
    unwrap(parts.net).load_state_dict(state["net"])
    unwrap(parts.discriminator).load_state_dict(state["discriminator"])
    parts.opt_g.load_state_dict(state["opt_g"])
    parts.opt_d.load_state_dict(state["opt_d"])
    for scaler, key in ((parts.scaler_g, "scaler_g"), (parts.scaler_d, "scaler_d")):
        if scaler.is_enabled() and state[key]:  # a CPU / bf16 run saved disabled (empty) scalers
            scaler.load_state_dict(state[key])
    return int(state["step"])


def restore_rank_state(folder: Path, rank: int) -> DataPosition | None:
    """Set this rank's RNG states from the checkpoint; -> its data position, or None when the checkpoint
    has no file for this rank (it was taken with fewer workers)."""
    path = folder / rank_file(rank)
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    set_rng_state(state["rng"])
    return DataPosition(int(state["data_epoch"]), int(state["data_batches"]))


# ---------------------------------------------------------------- finding checkpoints


def is_complete(folder: Path) -> bool:
    """Rank 0's state and meta plus one rank file per worker of the run that wrote it."""
    try:
        meta = read_meta(folder)
    except (OSError, ValueError):
        return False
    ranks = int(meta.get("world_size", 1))
    return (folder / STATE_FILE).exists() and all((folder / rank_file(r)).exists() for r in range(ranks))


def registered_checkpoints(run_dir: Path) -> set[str]:
    """Names of the checkpoints that Ray Train's controller recorded in the run folder's snapshot: the ones a
    continued run restores from. A checkpoint folder it does not name (yet) may still be mid-copy."""
    snapshot = run_dir / RAY_SNAPSHOT_FILE
    try:
        return {result["checkpoint_dir_name"] for result in json.loads(snapshot.read_text())["checkpoint_results"]}
    except FileNotFoundError:
        return set()  # Ray writes it when the first checkpoint is registered
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"train.resume_from: {snapshot} is not a Ray Train checkpoint snapshot ({error!r})") from None


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or the latest complete checkpoint that Ray Train registered in a run folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"train.resume_from: {path} does not exist")
    if (path / META_FILE).exists():
        if not is_complete(path):
            raise ValueError(f"train.resume_from: {path} is an incomplete checkpoint")
        return path
    registered = registered_checkpoints(path)
    candidates = [p for p in path.glob("checkpoint_*") if p.is_dir() and p.name in registered and is_complete(p)]
    if not candidates:
        raise FileNotFoundError(f"train.resume_from: no complete checkpoint in {path} (expected checkpoint_* folders "
                                f"holding {STATE_FILE} and {META_FILE}, named in its {RAY_SNAPSHOT_FILE})")
    return max(candidates, key=lambda p: (read_meta(p)["step"], p.name))
