"""Evaluation metrics (pipeline/metrics.py) on inputs whose answers are known in closed form."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline import metrics as M


def test_upsample_matches_maps_level_pixel_centres_to_full_resolution():
    identity = M.identity_positions((16, 16))
    positions = M.upsample_matches(identity, (64, 64))
    # Level pixel i covers full-resolution pixels 4i..4i+3, whose centre is 4i + 1.5.
    assert positions[0, 0, 5, 0] == pytest.approx(4 * 1 + 1.5)
    assert positions[0, 1, 0, 63] == pytest.approx(4 * 15 + 1.5)
    assert (positions - M.identity_positions((64, 64))).abs().max() <= 1.5 + 1e-6


def test_error_sums_count_only_valid_pixels():
    truth = M.identity_positions((4, 4))
    predicted = truth.clone()
    predicted[0, 1, 0, 0] += 3.0  # 3 px off
    predicted[0, 0, 1, 1] += 6.0  # 6 px off
    predicted[0, 0, 3, 3] += 100.0  # invalid pixel: ignored
    valid = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    valid[0, 0, 3, 3] = False
    sums = M.error_sums(M.endpoint_errors(predicted, truth)[valid], (1.0, 3.0, 5.0))
    assert sums["count"] == 15
    assert sums["epe"] == pytest.approx(9.0)
    assert (sums["pck_1"], sums["pck_3"], sums["pck_5"]) == (13, 14, 14)


def test_identifiable_pixels_are_textured_in_every_direction():
    """Flat regions and stripes let a match slide without changing what it sees; fine noise and corners do not."""
    h = w = 32
    rows, cols = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    flow, valid = torch.stack([rows, cols])[None], torch.ones(1, 1, h, w, dtype=torch.bool)
    flat = torch.zeros(1, 3, h, w)
    stripes = torch.sin(cols / 2).expand(1, 3, h, w)
    noise = torch.rand(1, 1, h, w, generator=torch.Generator().manual_seed(0)).expand(1, 3, h, w) * 2 - 1
    square = torch.full((1, 3, h, w), -1.0)
    square[..., 8:24, 8:24] = 1.0

    def share(exemplar):
        return M.identifiable(exemplar, flow, valid, gradient=0.02).float().mean().item()

    assert share(flat) == 0 and share(stripes) == 0 and share(noise) > 0.95
    corners = M.identifiable(square, flow, valid, gradient=0.02)[0, 0]
    assert corners[8, 8] and corners[23, 23] and not corners[16, 8] and not corners[16, 16]  # corner, edge, inside
    assert not M.identifiable(noise, flow, torch.zeros_like(valid), gradient=0.02).any()  # only valid pixels
    shifted = flow + torch.tensor([3.0, -2.0]).view(1, 2, 1, 1)  # read at each pixel's match, not at the pixel
    moved = M.identifiable(square, shifted, valid, gradient=0.02)[0, 0]
    assert moved[5, 10] and not moved[8, 8]


def test_psnr_l1_ssim_known_values():
    a = torch.full((2, 3, 32, 32), -1.0)  # black
    b = torch.zeros(2, 3, 32, 32)  # mid grey: 0.5 on the [0, 1] scale
    assert M.psnr(a, b).tolist() == pytest.approx([10 * math.log10(1 / 0.25)] * 2)
    assert M.l1(a, b).tolist() == pytest.approx([0.5, 0.5])
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert M.ssim(x, x).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    # Constant images: SSIM = (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1), the contrast term being 1.
    ca, cb, c1 = 0.2, 0.6, 0.01**2
    expected = (2 * ca * cb + c1) / (ca**2 + cb**2 + c1)
    got = M.ssim(torch.full((1, 3, 16, 16), ca * 2 - 1), torch.full((1, 3, 16, 16), cb * 2 - 1))
    assert float(got) == pytest.approx(expected, rel=1e-4)
    assert float(M.ssim(x[:1], torch.rand(1, 3, 32, 32) * 2 - 1)) < 0.2


def test_class_colour_errors_per_image_and_class():
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, :, 2:] = 1
    ideal = torch.zeros(1, 3, 4, 4)  # grey 127.5 everywhere
    output = ideal.clone()
    output[0, 0, :, 2:] = 1.0  # class 1: red channel 255 instead of 127.5
    errors = M.class_colour_errors(output, ideal, labels)
    assert errors == pytest.approx([0.0, 127.5])
    assert M.class_colour_errors(output, ideal, labels, classes=[[1, 7]]) == pytest.approx([127.5])


def test_class_match_rates_per_image_and_class():
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, :, 2:] = 1  # input: class 0 left, class 1 right
    exemplar_labels = labels.flip(-1)  # exemplar: class 1 left, class 0 right
    mirrored = M.identity_positions((4, 4)).clone()
    mirrored[:, 1] = 3 - mirrored[:, 1]
    assert M.class_match_rates(mirrored, labels, exemplar_labels, [[0, 1]]) == pytest.approx([1.0, 1.0])
    assert M.class_match_rates(M.identity_positions((4, 4)), labels, exemplar_labels, [[0, 1]]) == [0.0, 0.0]
    half = mirrored.clone()
    half[:, 1, :2] = 0.4  # class 1's top two rows read column 0 (rounded), which is class 1: still right
    half[:, 1, 2:, 2:] = 2.6  # class 1's bottom rows read column 3: class 0
    assert M.class_match_rates(half, labels, exemplar_labels, [[1, 5]]) == pytest.approx([0.5])


def test_sharpness_is_one_for_the_reference_and_falls_with_blur():
    torch.manual_seed(0)
    texture = torch.rand(2, 3, 32, 32) * 2 - 1
    box = torch.nn.functional.avg_pool2d(texture, 3, stride=1, padding=1, count_include_pad=False)
    assert M.sharpness(texture, texture).tolist() == pytest.approx([1.0, 1.0])
    blurred = M.sharpness(box, texture)
    assert blurred.shape == (2,) and (blurred > 0.1).all() and (blurred < 0.2).all()
    assert (M.sharpness(torch.zeros_like(texture), texture) == 0).all()  # flat output: no detail at all
    assert (M.sharpness(texture, box) > 5).all()  # noisier than its reference


def test_style_scores_are_one_for_identical_images():
    torch.manual_seed(0)
    from model.vgg import load_vgg19

    with pytest.warns(UserWarning, match="RANDOM"):
        vgg = load_vgg19("random")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    scores = M.style_scores(vgg, x, x, x)
    for name in ("vgg_colour", "vgg_texture", "semantic"):
        assert scores[name].tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    other = M.style_scores(vgg, x, torch.rand(2, 3, 32, 32) * 2 - 1, x.flip(-1))
    assert all(float(v.max()) < 1.0 - 1e-4 for v in other.values())


def test_frechet_distance_matches_the_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 4))
    assert M.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shifted = a + np.array([1.0, 2.0, 0.0, 0.0])
    assert M.frechet_distance(a, shifted) == pytest.approx(5.0, abs=1e-6)  # same covariance: |d mu|^2
    scaled = a * 2  # |mu|^2 + tr(S + 4S - 2 * 2S) = |mu|^2 + tr(S)
    expected = (a.mean(0) ** 2).sum() + np.trace(np.cov(a, rowvar=False))
    assert M.frechet_distance(a, scaled) == pytest.approx(expected, rel=1e-6)
    scipy_linalg = pytest.importorskip("scipy.linalg")
    b = rng.normal(size=(300, 4)) @ rng.normal(size=(4, 4)) + 0.5
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    reference = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * scipy_linalg.sqrtm(ca @ cb).real)
    assert M.frechet_distance(a, b) == pytest.approx(reference, rel=1e-6)
    with pytest.raises(ValueError, match="feature sets"):
        M.frechet_distance(a[:, :3], a)


def test_swd_is_small_for_the_same_distribution_and_large_for_another_texture():
    torch.manual_seed(0)
    a, b = torch.rand(16, 3, 64, 64) * 2 - 1, torch.rand(16, 3, 64, 64) * 2 - 1
    stripes = b[:, :, :1, :].expand(-1, -1, 64, -1)  # another texture: every column constant
    same, different = M.swd(a, b), M.swd(a, stripes)
    assert len(same) == 3  # 64 -> 32 -> 16
    assert min(different) > 2 * max(same)
    assert M.swd(a, b) == M.swd(a, b)  # seeded


def test_laplacian_pyramid_reconstructs_the_image():
    x = torch.rand(2, 3, 64, 64)
    levels = M.laplacian_pyramid(x)
    image = levels[-1]
    for band in reversed(levels[:-1]):
        image = torch.nn.functional.interpolate(image, size=band.shape[-2:], mode="bilinear",
                                                align_corners=False) + band
    assert torch.allclose(image, x, atol=1e-5)
