"""Pictures of the pipeline: sample grids (input | exemplar | warped per level | output | target), the translation
figure, and the PCK and loss-curve plots. Images are (H, W, 3) uint8 RGB arrays; plots are matplotlib figures."""
from __future__ import annotations

import io
from typing import Mapping, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

SEPARATOR = 2  # pixels of white between tiles
HEADER = 28  # pixels above the tiles for column titles


def palette(channels: int) -> torch.Tensor:
    """(channels, 3) fixed colours in [0, 1]; channel 0 (background / class 0) is black."""
    colours = torch.rand(channels, 3, generator=torch.Generator().manual_seed(1234)) * 0.8 + 0.2
    colours[0] = 0.0
    return colours


def map_to_rgb(maps: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Input-domain maps (B, C, H, W) -> (B, 3, *size) in [0, 1]: edges grey, one-hot classes their colour.

    A stack of channels (CelebA-HQ's and the synthetic "classes" edges, DeepFashion's pose) shows its drawn channels:
    channel 0 (edges, skeleton) white, the others their colour, blended so that overlaps stay visible; its distance
    maps (smooth almost everywhere, or all "far") are left out, as they would cover everything.
    """
    maps = maps.float()
    if maps.shape[1] == 1:
        rgb = maps.clamp(0, 1).expand(-1, 3, -1, -1)
    else:
        colours = palette(maps.shape[1]).to(maps.device)
        if not torch.all(maps.sum(dim=1) == 1):  # not one-hot classes: a stack of channels
            smooth = ((maps > 0) & (maps < 1)).float().mean(dim=(2, 3)) > 0.5
            far = (maps >= 1).flatten(2).all(dim=2)
            maps = maps * ~(smooth | far)[..., None, None]
            colours[0] = 1.0
        rgb = torch.einsum("bchw,ck->bkhw", maps, colours).clamp(0, 1)
    return rgb if size is None or tuple(rgb.shape[-2:]) == tuple(size) else F.interpolate(rgb, size=size)


def image_to_rgb(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Images in [-1, 1] at any size -> (B, 3, *size) in [0, 1] (nearest upsampling shows the real resolution)."""
    images = images.float()
    if tuple(images.shape[-2:]) != tuple(size):
        images = F.interpolate(images, size=size, mode="nearest")
    return ((images + 1) / 2).clamp(0, 1)


def tile(columns: Sequence[torch.Tensor], titles: Sequence[str] | None = None) -> np.ndarray:
    """Columns of (n, 3, h, w) tiles in [0, 1] -> one (H', W', 3) uint8 image, white between tiles, with a row of
    titles above the columns when given."""
    columns = [c.detach().cpu() for c in columns]
    n, (h, w) = columns[0].shape[0], columns[0].shape[-2:]
    top = HEADER if titles else 0
    grid = torch.ones(3, top + n * (h + SEPARATOR) - SEPARATOR, len(columns) * (w + SEPARATOR) - SEPARATOR)
    for col, tiles in enumerate(columns):
        for row in range(n):
            y, x = top + row * (h + SEPARATOR), col * (w + SEPARATOR)
            grid[:, y : y + h, x : x + w] = tiles[row]
    image = np.ascontiguousarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    for col, title in enumerate(titles or ()):
        (text_w, _), _ = cv2.getTextSize(title, cv2.FONT_HERSHEY_SIMPLEX, 0.6, 1)
        x = col * (w + SEPARATOR) + (w - text_w) // 2
        cv2.putText(image, title, (x, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    return image


def sample_grid(batch: Mapping[str, torch.Tensor], image: torch.Tensor, warped: Sequence[torch.Tensor],
                rows: int = 4) -> np.ndarray:
    """-> (H', W', 3) uint8 image of the first `rows` samples, columns as grid_columns names them.

    batch: model tensors input_map, exemplar, image (the target); image: the generated x_hat_B; warped: coarse -> fine.
    """
    n = min(rows, image.shape[0])
    size = tuple(image.shape[-2:])
    columns = [map_to_rgb(batch["input_map"][:n]), image_to_rgb(batch["exemplar"][:n], size)]
    columns += [image_to_rgb(level[:n].detach(), size) for level in warped]
    columns += [image_to_rgb(image[:n].detach(), size), image_to_rgb(batch["image"][:n], size)]
    return tile(columns)


def grid_columns(num_levels: int) -> list[str]:
    """Column titles of sample_grid, left to right."""
    return ["input", "exemplar", *[f"warped_{i}" for i in range(num_levels)], "output", "target"]


def png_bytes(image: np.ndarray, compression: int = 3) -> bytes:
    """(H, W, 3) uint8 RGB -> PNG bytes."""
    bgr = np.ascontiguousarray(image[..., ::-1])
    ok, encoded = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, compression])
    if not ok:
        raise ValueError("PNG encoding failed")
    return encoded.tobytes()


# ---------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig) -> bytes:
    """A matplotlib figure -> PNG bytes (the figure is closed)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    _pyplot().close(fig)
    return buffer.getvalue()


def pck_figure(thresholds: Sequence[float], curves: Mapping[str, Sequence[float]]):
    """PCK against the threshold (px), one line per model."""
    fig, ax = _pyplot().subplots(figsize=(5, 3.6))
    for name, values in curves.items():
        ax.plot(thresholds, values, label=name, lw=2 if name == "trained" else 1)
    ax.set(xlabel="threshold (px)", ylabel="PCK", ylim=(0, 1), title="correspondence accuracy (pseudo pairs)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def loss_figure(rows: Sequence[Mapping[str, float]]):
    """Generator and discriminator loss terms against the step (rows: {"step", "g_<term>", "d_<term>", ...})."""
    fig, (g_ax, d_ax) = _pyplot().subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in rows]
    for key in rows[-1]:
        if key.startswith(("g_", "d_")):
            ax = g_ax if key.startswith("g_") else d_ax
            ax.plot(steps, [r.get(key, float("nan")) for r in rows], label=key, lw=2 if key.endswith("total") else 1)
    for ax, title in ((g_ax, "generator"), (d_ax, "discriminator")):
        ax.set(title=f"{title} losses", xlabel="step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
