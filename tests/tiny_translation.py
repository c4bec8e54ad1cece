"""Shared by tests/test_inference.py and tests/test_cli.py: a tiny trained model and translation inputs on disk.

The model is trained once per test session (a few steps of the real train_step on the `train_shards`
fixture's synthetic data) and cached here, whichever of the two modules asks first.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model import ModelConfig
from model.vgg import load_vgg19
from pipeline.data.loader import make_loader, to_model
from pipeline.data.sources import get_source
from pipeline.train.config import TrainConfig
from pipeline.model_files import write_model_files
from pipeline.train.step import build_parts, train_step

TINY = {"nef": 8, "ngf": 8, "ndf": 8, "spade_hidden": 16, "patchmatch_iters": 1, "num_d": 1, "n_layers_d": 3,
        "temperature": 0.05}
LABEL_NC, SIZE, STEPS = 12, (64, 64), 3
_trained: dict[str, Path] = {}


def tiny_config(**overrides) -> ModelConfig:
    return ModelConfig.from_dict({**TINY, "image_size": list(SIZE), "label_nc": LABEL_NC, **overrides})


def trained_model_dir(shards: Path, folder: Path) -> Path:
    """A model folder (state_dict.pt + model_config.json) trained for STEPS steps; made once per session."""
    if "model" not in _trained:
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # random VGG weights warn loudly; fine for a few steps
            vgg = load_vgg19("random", seed=0)
        train = TrainConfig(lr=2e-4)
        parts = build_parts(tiny_config(), train.loss_weights, vgg, lr=train.lr, ttur=train.ttur,
                            g_adam_eps=train.g_adam_eps, amp="none", device=torch.device("cpu"))
        loader = make_loader(shards, batch_size=4, num_workers=0, real_exemplar_prob=0.2)
        for step, batch in zip(range(STEPS), loader):
            train_step(parts, to_model(batch, LABEL_NC, parts.device), step)
        write_model_files(folder, parts.net.state_dict(), tiny_config())
        _trained["model"] = folder
    return _trained["model"]


def write_pairs(folder: Path, count: int, size: tuple[int, int] = (80, 96)) -> dict[str, Path]:
    """Synthetic scenes at a size other than the model's: maps/<k>.png (index PNG), photos/<k>.jpg and
    photo_maps/<k>.png (the exemplar's own map), k = s0, s1, ...; each map is paired with the next scene's photo."""
    source = get_source("synthetic", task="mask", image_size=size, label_nc=LABEL_NC, seed=7, num_images=count + 1)
    examples = [source.load(item) for item in source.items()]
    dirs = {name: folder / name for name in ("maps", "photos", "photo_maps")}
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        exemplar = examples[k + 1]
        Image.fromarray(examples[k].input_map.astype(np.uint8), "L").save(dirs["maps"] / f"s{k}.png")
        Image.fromarray(exemplar.photo).save(dirs["photos"] / f"s{k}.jpg", quality=95)
        Image.fromarray(exemplar.input_map.astype(np.uint8), "L").save(dirs["photo_maps"] / f"s{k}.png")
    return dirs


def write_pose(folder: Path, name: str, canvas: tuple[int, int], shift: float = 0.0) -> Path:
    """OpenPose text output for one standing person on a canvas (H, W) -> <name>_candidate.txt (+ _subset.txt)."""
    h, w = canvas
    # COCO-18: nose, neck, r shoulder/elbow/wrist, l shoulder/elbow/wrist, r hip/knee/ankle, l hip/knee/ankle,
    # r eye, l eye, r ear, l ear (x, y as fractions of the canvas)
    joints = [(0.5, 0.12), (0.5, 0.22), (0.4, 0.22), (0.36, 0.36), (0.34, 0.5), (0.6, 0.22), (0.64, 0.36),
              (0.66, 0.5), (0.44, 0.52), (0.43, 0.7), (0.42, 0.88), (0.56, 0.52), (0.57, 0.7), (0.58, 0.88),
              (0.48, 0.1), (0.52, 0.1), (0.46, 0.11), (0.54, 0.11)]
    candidate = np.array([[(x + shift) * w, y * h, 0.9, i] for i, (x, y) in enumerate(joints)])
    subset = np.concatenate([np.arange(18), [16.2, 18]])[None]
    path = folder / f"{name}_candidate.txt"
    np.savetxt(path, candidate)
    np.savetxt(folder / f"{name}_subset.txt", subset)
    return path
