"""Pseudo exemplars: x_B under a random geometric + photometric distortion, with exact ground-truth flow.

The paper's self-supervision: the network must find, for every pixel of x_B, where it went in the
distorted copy. The geometric part (flip, affine, elastic; albumentations) moves the photo and its
input map together; the photometric part (colour jitter, blur) changes the photo only.

Flow: pushing a coordinate image through the same geometric transform gives the *backward* map
(for each pseudo pixel, where it came from in x_B). The flow we store is its inverse, found by
Newton's method from an affine initial guess:

    flow[:, i, j] = (y, x) in the pseudo exemplar of x_B's pixel (i, j)      (pixel centres at integers)

so grid_sample(pseudo, flow_to_grid(flow)) reconstructs x_B where flow is valid (pixels whose
content left the frame are invalid).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations checks for updates on import

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.data.config import AugmentConfig  # noqa: E402

INTERPOLATION = {"nearest": cv2.INTER_NEAREST, "linear": cv2.INTER_LINEAR}
NEWTON_TOLERANCE = 1e-3  # pixels: a converged inverse reproduces the target position this closely
INSIDE_THRESHOLD = 1 - 1e-4  # a pseudo pixel is valid when its bilinear footprint lies fully inside x_B


@dataclass
class PseudoExemplar:
    """image: (H, W, 3) uint8; input_map: same shape/dtype as the input; flow: (2, H, W) float32 with
    NaN where invalid; valid: (H, W) bool; params: the sampled augmentation, JSON-able."""

    image: np.ndarray
    input_map: np.ndarray
    flow: np.ndarray
    valid: np.ndarray
    params: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------- albumentations pipelines


def identity_coordinates(height: int, width: int) -> np.ndarray:
    """(H, W, 3) float32 image of (y, x, 1): warped like a photo, it records where each pixel came from."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    return np.stack([ys, xs, np.ones_like(ys)], axis=-1)


@functools.lru_cache(maxsize=32)
def elastic_rms_per_alpha(height: int, width: int, sigma: float) -> float:
    """RMS displacement (pixels) of albumentations' ElasticTransform per unit alpha at this size.

    Its field is normalised noise blurred by sigma, whose amplitude depends on size and sigma in a
    way that is not scale-free; measuring it once lets `elastic_rms` mean the same at every size.
    """
    coords = identity_coordinates(height, width)
    alpha = float(max(height, width))
    rms = []
    for seed in range(4):
        warp = A.Compose([A.ElasticTransform(alpha=alpha, sigma=sigma, interpolation=cv2.INTER_LINEAR,
                                             border_mode=cv2.BORDER_REPLICATE, p=1.0)], seed=seed)
        moved = warp(image=coords)["image"]
        rms.append(np.sqrt(np.mean((moved[..., :2] - coords[..., :2]) ** 2) * 2))
    return max(float(np.mean(rms)) / alpha, 1e-9)


def geometric_pipeline(cfg: AugmentConfig, size: tuple[int, int], seed: int, map_interpolation: str,
                       map_fill: float = 0) -> A.Compose:
    """Flip, affine, elastic; the photo and the coordinate image as images, the input map as a mask."""
    height, width = size
    side = min(height, width)
    sigma = cfg.elastic_sigma * side
    alpha = cfg.elastic_rms * side / elastic_rms_per_alpha(height, width, sigma)
    mask_interpolation = INTERPOLATION[map_interpolation]
    border = dict(border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=map_fill)
    return A.Compose(
        [
            A.HorizontalFlip(p=cfg.flip_prob),
            A.Affine(scale=cfg.scale, translate_percent=(-cfg.translate, cfg.translate),
                     rotate=(-cfg.rotate_deg, cfg.rotate_deg), shear=(-cfg.shear_deg, cfg.shear_deg),
                     interpolation=cv2.INTER_LINEAR, mask_interpolation=mask_interpolation, p=1.0, **border),
            A.ElasticTransform(alpha=alpha, sigma=sigma, interpolation=cv2.INTER_LINEAR,
                               mask_interpolation=mask_interpolation, p=cfg.elastic_prob, **border),
        ],
        additional_targets={"coords": "image"},
        seed=seed,
        save_applied_params=True,
        strict=True,
    )


def photometric_pipeline(cfg: AugmentConfig, seed: int) -> A.Compose:
    """Colour jitter and blur: the exemplar's appearance changes, its geometry does not."""
    return A.Compose(
        [
            A.ColorJitter(brightness=(1 - cfg.brightness, 1 + cfg.brightness),
                          contrast=(1 - cfg.contrast, 1 + cfg.contrast),
                          saturation=(1 - cfg.saturation, 1 + cfg.saturation),
                          hue=(-cfg.hue, cfg.hue), p=cfg.color_prob),
            A.GaussianBlur(blur_limit=0, sigma_limit=cfg.blur_sigma, p=cfg.blur_prob),
        ],
        seed=seed,
        save_applied_params=True,
        strict=True,
    )


def summarize(applied: list) -> list[dict[str, Any]]:
    """The sampled parameters that fit in meta.json (scalars and the affine matrix; no dense maps)."""
    summary = []
    for name, params in applied:
        entry: dict[str, Any] = {"transform": name}
        for key, value in params.items():
            if key in ("shape", "map_x", "map_y", "bbox_matrix", "output_shape", "interpolation",
                       "fill", "fill_mask", "kernel", "mask_interpolation"):
                continue
            value = np.asarray(value) if isinstance(value, (np.ndarray, list, tuple)) else value
            if isinstance(value, np.ndarray):
                if value.size > 9 or value.dtype.kind not in "biuf":
                    continue
                value = np.round(value.astype(np.float64), 5).tolist()
            elif isinstance(value, dict):
                value = {k: round(float(v), 5) for k, v in value.items() if np.isscalar(v)}
            elif isinstance(value, (bool, np.bool_)):
                value = bool(value)
            elif isinstance(value, (int, float, np.integer, np.floating)):
                value = round(float(value), 5)
            else:
                continue
            entry[key] = value
        summary.append(entry)
    return summary


# ---------------------------------------------------------------- flow


def bilinear(array: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Sample (H, W[, C]) at float positions, clamped to the frame, in float64. -> ys.shape [+ (C,)].

    Done here rather than with cv2.remap, whose weights are quantised to 1/32 pixel: Newton needs
    exact interpolation of the (piecewise linear) coordinate image to converge.
    """
    height, width = array.shape[:2]
    ys = np.clip(ys, 0, height - 1)
    xs = np.clip(xs, 0, width - 1)
    y0 = np.minimum(np.floor(ys).astype(np.int64), max(height - 2, 0))
    x0 = np.minimum(np.floor(xs).astype(np.int64), max(width - 2, 0))
    y1, x1 = np.minimum(y0 + 1, height - 1), np.minimum(x0 + 1, width - 1)
    wy, wx = ys - y0, xs - x0
    if array.ndim == 3:
        wy, wx = wy[..., None], wx[..., None]
    a = array.astype(np.float64, copy=False)
    top = a[y0, x0] * (1 - wx) + a[y0, x1] * wx
    bottom = a[y1, x0] * (1 - wx) + a[y1, x1] * wx
    return top * (1 - wy) + bottom * wy


def invert_backward_map(backward: np.ndarray, inside: np.ndarray,
                        iterations: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Invert a smooth warp. backward (H, W, 2): x_B position (y, x) of each pseudo pixel;
    inside (H, W) bool: pseudo pixels whose content came from inside x_B.
    -> flow (2, H, W) float32, pseudo position of each x_B pixel (NaN where invalid); valid (H, W) bool.
    """
    height, width = inside.shape
    targets = np.stack(np.mgrid[0:height, 0:width], axis=-1).reshape(-1, 2).astype(np.float64)  # x_B pixels
    if inside.sum() < 3:
        return np.full((2, height, width), np.nan, np.float32), np.zeros((height, width), bool)
    backward = backward.astype(np.float64)
    # Initial guess: invert the best affine fit x_B = M p + b (exact when there is no elastic part).
    pseudo_pixels = targets[inside.reshape(-1)]
    design = np.concatenate([pseudo_pixels, np.ones((len(pseudo_pixels), 1))], axis=1)
    coef, *_ = np.linalg.lstsq(design, backward[inside], rcond=None)
    matrix, offset = coef[:2].T, coef[2]
    position = (targets - offset) @ np.linalg.inv(matrix).T
    # Newton on the pixels not yet converged: p <- p + J(p)^-1 (target - backward(p)).
    jacobian = np.stack([np.stack(np.gradient(backward[..., k]), axis=-1) for k in range(2)],
                        axis=-2).reshape(height, width, 4)  # [d by/dy, d by/dx, d bx/dy, d bx/dx]
    active = np.arange(len(targets))
    for _ in range(iterations):
        p = position[active]
        residual = targets[active] - bilinear(backward, p[:, 0], p[:, 1])
        in_frame = (p[:, 0] >= -1) & (p[:, 0] <= height) & (p[:, 1] >= -1) & (p[:, 1] <= width)
        keep = in_frame & (np.abs(residual).max(axis=1) > NEWTON_TOLERANCE * 0.01)
        active, p, residual = active[keep], p[keep], residual[keep]
        if not len(active):
            break
        j = bilinear(jacobian, p[:, 0], p[:, 1])
        det = j[:, 0] * j[:, 3] - j[:, 1] * j[:, 2]
        det = np.where(np.abs(det) < 1e-6, 1e-6, det)
        step_y = (j[:, 3] * residual[:, 0] - j[:, 1] * residual[:, 1]) / det
        step_x = (-j[:, 2] * residual[:, 0] + j[:, 0] * residual[:, 1]) / det
        position[active] = p + np.clip(np.stack([step_y, step_x], axis=-1), -height, height)
    error = np.abs(targets - bilinear(backward, position[:, 0], position[:, 1])).max(axis=1)
    eps = NEWTON_TOLERANCE  # border pixels land on 0 or H-1 up to rounding
    in_frame = ((position[:, 0] >= -eps) & (position[:, 0] <= height - 1 + eps)
                & (position[:, 1] >= -eps) & (position[:, 1] <= width - 1 + eps))
    position = np.clip(position, 0, [height - 1, width - 1])
    from_inside = bilinear(inside.astype(np.float32), position[:, 0], position[:, 1]) >= INSIDE_THRESHOLD
    valid = (in_frame & from_inside & (error < NEWTON_TOLERANCE)).reshape(height, width)
    flow = position.reshape(height, width, 2).transpose(2, 0, 1).astype(np.float32)
    flow[:, ~valid] = np.nan
    return flow, valid


# ---------------------------------------------------------------- the pseudo exemplar


def make_pseudo_exemplar(photo: np.ndarray, input_map: np.ndarray, cfg: AugmentConfig, seed: int,
                         map_interpolation: str = "nearest", map_fill: float | tuple[float, ...] = 0) -> PseudoExemplar:
    """Distort x_B into a pseudo exemplar. photo (H, W, 3) uint8; input_map (H, W) ids or (C, H, W) channels.

    Deterministic in `seed`. map_fill: value(s) of the input map where the distortion exposes the
    outside of the frame (per channel for multi-channel maps, e.g. 255 for "far" in distance maps).
    """
    height, width = photo.shape[:2]
    channels_first = input_map.ndim == 3
    mask = input_map.transpose(1, 2, 0) if channels_first else input_map
    fill = np.asarray(map_fill, np.float32)
    if fill.any():  # cv2 fills at most 4 channels with distinct values: shift so the fill is 0 everywhere
        mask = mask.astype(np.float32) - fill
    geometric = geometric_pipeline(cfg, (height, width), seed, map_interpolation, 0)
    moved = geometric(image=photo, mask=np.ascontiguousarray(mask), coords=identity_coordinates(height, width))
    backward, inside = moved["coords"][..., :2], moved["coords"][..., 2] >= INSIDE_THRESHOLD
    flow, valid = invert_backward_map(backward, inside)
    recoloured = photometric_pipeline(cfg, seed + 1)(image=moved["image"])
    pseudo_map = moved["mask"]
    if fill.any():
        limits = np.iinfo(input_map.dtype)
        pseudo_map = np.clip(np.rint(pseudo_map + fill), limits.min, limits.max)
    if channels_first:
        pseudo_map = pseudo_map.reshape(height, width, -1).transpose(2, 0, 1)
    params = summarize(moved["applied_transforms"]) + summarize(recoloured["applied_transforms"])
    for entry in params:
        if entry["transform"] == "ElasticTransform":  # its sampled field is too big for meta.json
            elastic = geometric.transforms[2]
            entry.update(alpha=round(float(elastic.alpha), 5), sigma=round(float(elastic.sigma), 5))
    return PseudoExemplar(
        image=recoloured["image"],
        input_map=np.ascontiguousarray(pseudo_map.astype(input_map.dtype)),
        flow=flow,
        valid=valid,
        params=params,
    )
