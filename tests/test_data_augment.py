"""Pseudo exemplars: the ground-truth flow must really map x_B's pixels into the pseudo exemplar."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.data.augment import invert_backward_map, make_pseudo_exemplar
from pipeline.data.config import AugmentConfig

GEOMETRIC_ONLY = AugmentConfig(color_prob=0.0, blur_prob=0.0, elastic_prob=1.0, flip_prob=0.5)
IDENTITY_GEOMETRY = AugmentConfig(flip_prob=0.0, rotate_deg=0.0, scale=(1.0, 1.0), translate=0.0, shear_deg=0.0,
                                  elastic_prob=0.0, color_prob=1.0, blur_prob=1.0)


def smooth_image(size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    return cv2.normalize(cv2.GaussianBlur(noise, (0, 0), size / 24), None, 0, 255, cv2.NORM_MINMAX)


def warp_with_flow(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Sample image (H, W, C) at flow (2, H, W) (y, x) pixel positions -> (H, W, C) float."""
    h, w = image.shape[:2]
    f = torch.from_numpy(np.nan_to_num(flow)).float()
    grid = torch.stack([f[1] / (w - 1) * 2 - 1, f[0] / (h - 1) * 2 - 1], dim=-1)[None]
    src = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None]
    return F.grid_sample(src, grid, mode="bilinear", align_corners=True)[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_flow_warps_the_pseudo_exemplar_back_onto_x_b(seed):
    image = smooth_image(64, seed)
    pseudo = make_pseudo_exemplar(image, np.zeros((64, 64), np.uint8), GEOMETRIC_ONLY, seed=seed)
    assert pseudo.flow.shape == (2, 64, 64) and pseudo.valid.shape == (64, 64)
    assert 0.3 < pseudo.valid.mean() < 1.0  # the distortion moves some content out of the frame
    assert np.isnan(pseudo.flow[:, ~pseudo.valid]).all() and np.isfinite(pseudo.flow[:, pseudo.valid]).all()
    error = np.abs(warp_with_flow(pseudo.image, pseudo.flow) - image).mean(axis=-1)[pseudo.valid]
    assert error.mean() < 4.0 and np.percentile(error, 99) < 16  # two bilinear resamplings of a smooth image
    # The test can fail: the identity (no flow) or the backward direction reconstruct far worse.
    identity = np.stack(np.mgrid[0:64, 0:64]).astype(np.float32)
    assert np.abs(warp_with_flow(pseudo.image, identity) - image).mean(axis=-1)[pseudo.valid].mean() > 3 * error.mean()


def test_flow_is_exact_on_a_coordinate_image():
    """Warping the pseudo exemplar of a linear ramp with the flow gives the ramp back almost exactly."""
    ys, xs = np.mgrid[0:48, 0:48].astype(np.float32)
    ramp = np.stack([ys * 5, xs * 5, np.full_like(ys, 128)], axis=-1).astype(np.uint8)
    pseudo = make_pseudo_exemplar(ramp, np.zeros((48, 48), np.uint8), GEOMETRIC_ONLY, seed=7)
    rebuilt = warp_with_flow(pseudo.image, pseudo.flow)
    assert np.abs(rebuilt - ramp)[pseudo.valid].max() < 6  # uint8 rounding + cv2's 1/32-pixel weights


def test_input_map_moves_with_the_photo():
    labels = np.zeros((64, 64), np.uint8)
    labels[16:48, 8:40] = 3
    labels[40:60, 44:62] = 7
    image = np.stack([labels * 30] * 3, axis=-1).astype(np.uint8)
    pseudo = make_pseudo_exemplar(image, labels, GEOMETRIC_ONLY, seed=5)
    assert pseudo.input_map.dtype == np.uint8 and set(np.unique(pseudo.input_map)) <= {0, 3, 7}
    flow = np.rint(pseudo.flow[:, pseudo.valid]).astype(int)
    moved = pseudo.input_map[flow[0], flow[1]]
    agree = (moved == labels[pseudo.valid]).mean()
    assert agree > 0.95  # only pixels on region borders may round to the neighbour


def test_photometric_changes_only_the_photo():
    image = smooth_image(32)
    labels = (np.arange(32 * 32).reshape(32, 32) % 5).astype(np.uint8)
    pseudo = make_pseudo_exemplar(image, labels, IDENTITY_GEOMETRY, seed=0)
    np.testing.assert_array_equal(pseudo.input_map, labels)
    identity = np.stack(np.mgrid[0:32, 0:32]).astype(np.float32)
    np.testing.assert_allclose(pseudo.flow, identity, atol=1e-3)
    assert pseudo.valid.all()
    assert np.abs(pseudo.image.astype(int) - image).mean() > 2
    names = [p["transform"] for p in pseudo.params]
    assert "ColorJitter" in names and "GaussianBlur" in names


def test_same_seed_same_pseudo_exemplar():
    image, labels = smooth_image(32), np.zeros((32, 32), np.uint8)
    a = make_pseudo_exemplar(image, labels, AugmentConfig(), seed=11)
    b = make_pseudo_exemplar(image, labels, AugmentConfig(), seed=11)
    c = make_pseudo_exemplar(image, labels, AugmentConfig(), seed=12)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.flow, b.flow)
    assert a.params == b.params and not np.array_equal(a.image, c.image)


def test_multichannel_maps_fill_per_channel():
    """Pose-like maps: outside the frame the skeleton is 0 and the distance maps are 255 (far)."""
    pose = np.concatenate([np.full((3, 32, 32), 9, np.uint8), np.full((17, 32, 32), 100, np.uint8)])
    cfg = AugmentConfig(rotate_deg=30, scale=(0.7, 0.7), elastic_prob=0.0)
    pseudo = make_pseudo_exemplar(smooth_image(32), pose, cfg, seed=0, map_interpolation="linear",
                                  map_fill=(0,) * 3 + (255,) * 17)
    assert pseudo.input_map.shape == (20, 32, 32)
    corner = pseudo.input_map[:, 0, 0]
    assert (corner[:3] == 0).all() and (corner[3:] == 255).all()
    centre = pseudo.input_map[:, 16, 16]
    assert (centre[:3] == 9).all() and (centre[3:] == 100).all()


def test_inverting_a_pure_translation():
    ys, xs = np.mgrid[0:16, 0:16].astype(np.float64)
    backward = np.stack([ys - 2.5, xs + 1.25], axis=-1)  # pseudo pixel p shows x_B pixel p + (-2.5, 1.25)
    inside = (backward[..., 0] >= 0) & (backward[..., 1] <= 15)
    flow, valid = invert_backward_map(backward, inside)
    np.testing.assert_allclose(flow[0][valid], (ys + 2.5)[valid], atol=1e-6)
    np.testing.assert_allclose(flow[1][valid], (xs - 1.25)[valid], atol=1e-6)
    assert not valid[-2:].any() and not valid[:, :1].any()  # those x_B pixels left the frame
