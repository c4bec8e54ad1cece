"""Sample grids: one row per sample, columns input | exemplar | warped (each level) | output | target."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

SEPARATOR = 2  # pixels of white between tiles


def palette(channels: int) -> torch.Tensor:
    """(channels, 3) fixed colours in [0, 1]; channel 0 (background / class 0) is black."""
    colours = torch.rand(channels, 3, generator=torch.Generator().manual_seed(1234)) * 0.8 + 0.2
    colours[0] = 0.0
    return colours


def map_to_rgb(maps: torch.Tensor) -> torch.Tensor:
    """Input-domain maps (B, C, H, W) -> (B, 3, H, W) in [0, 1]: edges grey, classes and pose colours."""
    maps = maps.float()
    if maps.shape[1] == 1:
        return maps.clamp(0, 1).expand(-1, 3, -1, -1)
    # One-hot classes get their colour; soft maps (pose heatmaps) a blend, so overlaps stay visible.
    return torch.einsum("bchw,ck->bkhw", maps, palette(maps.shape[1]).to(maps.device)).clamp(0, 1)


def image_to_rgb(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Images in [-1, 1] at any size -> (B, 3, *size) in [0, 1] (nearest upsampling shows the real resolution)."""
    images = images.float()
    if tuple(images.shape[-2:]) != tuple(size):
        images = F.interpolate(images, size=size, mode="nearest")
    return ((images + 1) / 2).clamp(0, 1)


def sample_grid(batch: Mapping[str, torch.Tensor], image: torch.Tensor, warped: Sequence[torch.Tensor],
                rows: int = 4) -> np.ndarray:
    """-> (H', W', 3) uint8 image of the first `rows` samples.

    batch: input_map, exemplar, image (the target); image: the generated x_hat_B; warped: coarse -> fine.
    """
    n = min(rows, image.shape[0])
    size = tuple(image.shape[-2:])
    columns = [map_to_rgb(batch["input_map"][:n]), image_to_rgb(batch["exemplar"][:n], size)]
    columns += [image_to_rgb(level[:n].detach(), size) for level in warped]
    columns += [image_to_rgb(image[:n].detach(), size), image_to_rgb(batch["image"][:n], size)]
    columns = [c.cpu() for c in columns]
    h, w = size
    grid = torch.ones(3, n * (h + SEPARATOR) - SEPARATOR, len(columns) * (w + SEPARATOR) - SEPARATOR)
    for col, tiles in enumerate(columns):
        for row in range(n):
            y, x = row * (h + SEPARATOR), col * (w + SEPARATOR)
            grid[:, y : y + h, x : x + w] = tiles[row]
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def grid_columns(num_levels: int) -> list[str]:
    """Column titles of sample_grid, left to right."""
    return ["input", "exemplar", *[f"warped_{i}" for i in range(num_levels)], "output", "target"]
