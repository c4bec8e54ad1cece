"""Evaluation metrics: correspondence, reconstruction, style, and distribution distances.

Each function is pure (tensors in, numbers or tensors out) so evaluation can sum over batches:
the correspondence and colour terms return sums and counts, not means.

Conventions: images are (B, 3, H, W) in [-1, 1]; positions are (B, 2, H, W) (row, col) in pixels of
the exemplar at full resolution; `valid` is (B, 1, H, W) bool.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

# ---------------------------------------------------------------- correspondence


def upsample_matches(matches: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 2, h, w) (row, col) on an h x w grid -> (B, 2, H, W) positions in full-resolution pixels.

    A level pixel covers s x s full-resolution pixels (s = H / h); pixel centres map as p' = (p + 0.5) * s - 0.5,
    and every full-resolution pixel takes the match of the level pixel that covers it.
    """
    h, w = matches.shape[-2:]
    scale = torch.tensor([size[0] / h, size[1] / w], dtype=torch.float32, device=matches.device).view(1, 2, 1, 1)
    positions = (matches.float() + 0.5) * scale - 0.5
    return F.interpolate(positions, size=size, mode="nearest")


def endpoint_errors(predicted: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W) positions -> (B, 1, H, W) Euclidean distance in pixels."""
    return (predicted.float() - truth.float()).norm(dim=1, keepdim=True)


def error_sums(errors: torch.Tensor, thresholds: Sequence[float]) -> dict[str, float]:
    """End-point errors of the valid pixels (1-D) -> sums {"count", "epe", "pck_<t>"...}; divide by count for
    EPE and PCK (fractions). Sums, so that batches add up."""
    sums = {"count": float(errors.numel()), "epe": float(errors.sum())}
    for t in thresholds:
        sums[f"pck_{t:g}"] = float((errors <= t).sum())
    return sums


def identifiable(exemplar: torch.Tensor, flow: torch.Tensor, valid: torch.Tensor, gradient: float,
                 window: int = 5) -> torch.Tensor:
    """Pixels whose ground-truth match is identifiable: (B, 1, H, W) bool.

    exemplar (B, 3, H', W') in [-1, 1]; flow (B, 2, H, W) each pixel's (row, col) in it; valid (B, 1, H, W) bool.
    A match is identifiable where the exemplar's grey level varies in every direction around it: the smaller
    eigenvalue of its structure tensor over a `window` x `window` patch (Shi and Tomasi's corner measure) is at
    least gradient**2 (gradient in [0, 1] units per pixel). Inside flat regions and along straight edges or
    stripes a match can slide without changing what it sees; there no method can be scored on its position.
    """
    grey = to_unit(exemplar).mean(1, keepdim=True)
    gy, gx = torch.gradient(grey, dim=(2, 3))
    box = lambda t: F.avg_pool2d(t, window, stride=1, padding=window // 2, count_include_pad=False)  # noqa: E731
    sxx, syy, sxy = box(gx * gx), box(gy * gy), box(gx * gy)
    smaller = (sxx + syy) / 2 - (((sxx - syy) / 2) ** 2 + sxy ** 2).sqrt()  # (B, 1, H', W')
    h, w = smaller.shape[-2:]
    rows = flow[:, 0].round().long().clamp(0, h - 1)
    cols = flow[:, 1].round().long().clamp(0, w - 1)
    at_match = smaller.flatten(1).gather(1, (rows * w + cols).flatten(1)).view_as(valid)
    return valid & (at_match >= gradient ** 2)


def identity_positions(shape: tuple[int, int], batch: int = 1) -> torch.Tensor:
    """(B, 2, H, W) every pixel matched to itself: the no-motion baseline."""
    rows, cols = torch.meshgrid(torch.arange(shape[0]), torch.arange(shape[1]), indexing="ij")
    return torch.stack([rows, cols]).float().unsqueeze(0).expand(batch, -1, -1, -1)


# ---------------------------------------------------------------- reconstruction


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped (generator outputs can overshoot slightly)."""
    return ((images.float() + 1) / 2).clamp(0, 1)


def psnr(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) PSNR in dB of images in [-1, 1], computed on the [0, 1] scale (data range 1)."""
    mse = (to_unit(output) - to_unit(target)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def l1(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) mean absolute error on the [0, 1] scale."""
    return (to_unit(output) - to_unit(target)).abs().flatten(1).mean(1)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-coords**2 / (2 * sigma**2))
    return g / g.sum()


def ssim(output: torch.Tensor, target: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """(B,) structural similarity (Wang et al. 2004: Gaussian 11x11, sigma 1.5, K1 0.01, K2 0.03) on the
    [0, 1] scale, averaged over channels and the valid (unpadded) window positions."""
    x, y = to_unit(output), to_unit(target)
    c = x.shape[1]
    g = gaussian_window(window, sigma).to(x.device)
    def blur(t: torch.Tensor) -> torch.Tensor:  # separable Gaussian, no padding
        t = F.conv2d(t, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        return F.conv2d(t, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)


def sharpness(output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(B,) mean |Laplacian| of the output over the reference's, on the [0, 1] scale: 1 as detailed as the
    reference, below 1 blurred (a 3x3 box blur of white noise gives 0.13), above 1 noisier."""
    kernel = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]], device=output.device).view(1, 1, 3, 3)
    def detail(images: torch.Tensor) -> torch.Tensor:
        x = to_unit(images)
        return F.conv2d(x.flatten(0, 1).unsqueeze(1), kernel).abs().view(x.shape[0], -1).mean(1)
    return detail(output) / detail(reference).clamp_min(1e-6)


# ---------------------------------------------------------------- style fidelity


def class_colour_errors(output: torch.Tensor, ideal: torch.Tensor, labels: torch.Tensor,
                        classes: Sequence[Sequence[int]] | None = None) -> list[float]:
    """Per (image, class) distance between mean colours, in 0-255 RGB units.

    output, ideal: (B, 3, H, W) in [-1, 1]; labels: (B, H, W) class ids of the input;
    classes: per image, the classes to score (default: every class present in its label map).
    """
    errors = []
    out, ref = to_unit(output) * 255, to_unit(ideal) * 255
    for b in range(output.shape[0]):
        wanted = classes[b] if classes is not None else labels[b].unique().tolist()
        for c in wanted:
            mask = labels[b] == c
            if not mask.any():
                continue
            errors.append(float((out[b][:, mask].mean(1) - ref[b][:, mask].mean(1)).norm()))
    return errors


def class_match_rates(positions: torch.Tensor, labels: torch.Tensor, exemplar_labels: torch.Tensor,
                      classes: Sequence[Sequence[int]]) -> list[float]:
    """Per (image, class): the share of the input's pixels of that class whose match lands on the same class in
    the exemplar (a warp that reads the wrong region gets the wrong colours, whatever its precision).

    positions: (B, 2, H, W) matched exemplar (row, col) per input pixel; labels, exemplar_labels: (B, H, W) class
    ids; classes: per image, the classes to score.
    """
    h, w = exemplar_labels.shape[-2:]
    rows = positions[:, 0].round().long().clamp(0, h - 1)
    cols = positions[:, 1].round().long().clamp(0, w - 1)
    rates = []
    for b in range(positions.shape[0]):
        landed = exemplar_labels[b][rows[b], cols[b]]  # (H, W) the class each input pixel reads
        for c in classes[b]:
            mask = labels[b] == c
            if mask.any():
                rates.append(float((landed[mask] == c).float().mean()))
    return rates


def channel_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, H, W) -> channel-wise mean and standard deviation, each (B, C)."""
    flat = features.flatten(2)
    return flat.mean(2), flat.std(2)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, D), (B, D) -> (B,) cosine similarity."""
    return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1, eps=1e-8)


STYLE_LAYERS = ("r12", "r22")  # low-level: colour and texture
SEMANTIC_LAYERS = ("r32", "r42", "r52")  # high-level: content


def style_scores(vgg: Callable[..., list[torch.Tensor]], output: torch.Tensor, exemplar: torch.Tensor,
                 target: torch.Tensor) -> dict[str, torch.Tensor]:
    """CoCosNet's style relevance and semantic consistency, each (B,) in [-1, 1], averaged over layers.

    colour: cosine similarity of the channel-wise means of low-level VGG features (output vs exemplar);
    texture: the same for channel-wise standard deviations; semantic: cosine similarity of high-level
    features (output vs the input's own photo).
    """
    layers = STYLE_LAYERS + SEMANTIC_LAYERS
    out_f, ex_f, tgt_f = vgg(output, layers), vgg(exemplar, STYLE_LAYERS), vgg(target, SEMANTIC_LAYERS)
    colour, texture = [], []
    for o, e in zip(out_f[: len(STYLE_LAYERS)], ex_f):
        (om, osd), (em, esd) = channel_stats(o), channel_stats(e)
        colour.append(cosine(om, em))
        texture.append(cosine(osd, esd))
    semantic = [cosine(o, t) for o, t in zip(out_f[len(STYLE_LAYERS):], tgt_f)]
    mean = lambda xs: torch.stack(xs).mean(0)  # noqa: E731
    return {"vgg_colour": mean(colour), "vgg_texture": mean(texture), "semantic": mean(semantic)}


# ---------------------------------------------------------------- distribution distances


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two (N, D) feature sets (FID when the features are Inception's).

    tr(sqrt(S_a S_b)) is computed as the sum of square roots of the eigenvalues of sqrt(S_a) S_b sqrt(S_a),
    a symmetric PSD matrix, which stays stable when few samples make the covariances singular.
    """
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if a.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"need two (N >= 2, D) feature sets of the same D, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    vals, vecs = np.linalg.eigh(cov_a)
    sqrt_a = (vecs * np.sqrt(vals.clip(min=0))) @ vecs.T
    cross = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clip(min=0)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(cross).sum())


def laplacian_pyramid(images: torch.Tensor, min_size: int = 16) -> list[torch.Tensor]:
    """(B, C, H, W) -> band-pass levels, fine to coarse, the last a low-pass of side >= min_size."""
    kernel = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16
    kernel = (kernel[:, None] * kernel[None, :]).to(images)
    c = images.shape[1]
    weight = kernel.expand(c, 1, 5, 5)
    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(t, (2, 2, 2, 2), mode="reflect"), weight, groups=c)
    levels, current = [], images
    while min(current.shape[-2:]) // 2 >= min_size:
        down = blur(current)[..., ::2, ::2]
        up = F.interpolate(down, size=current.shape[-2:], mode="bilinear", align_corners=False)
        levels.append(current - up)
        current = down
    levels.append(current)
    return levels


def random_patches(images: torch.Tensor, per_image: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """(B, C, H, W) -> (B * per_image, C * size * size) patches at random positions."""
    b, c, h, w = images.shape
    rows = torch.randint(0, h - size + 1, (b, per_image), generator=generator)
    cols = torch.randint(0, w - size + 1, (b, per_image), generator=generator)
    offsets = torch.arange(size)
    r = (rows[..., None, None] + offsets[:, None]).expand(-1, -1, size, size)  # (B, P, s, s)
    q = (cols[..., None, None] + offsets[None, :]).expand(-1, -1, size, size)
    batch = torch.arange(b)[:, None, None, None].expand_as(r)
    patches = images.permute(0, 2, 3, 1)[batch, r, q]  # (B, P, s, s, C)
    return patches.permute(0, 1, 4, 2, 3).reshape(b * per_image, -1)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, directions: int, repeats: int,
                       generator: torch.Generator) -> float:
    """Mean 1-D Wasserstein distance between (N, D) point sets along random unit directions."""
    n = min(len(a), len(b))
    total = 0.0
    for _ in range(repeats):
        dirs = torch.randn(a.shape[1], directions, generator=generator)
        dirs = dirs / dirs.norm(dim=0, keepdim=True)
        pa, pb = (a[:n] @ dirs).sort(0).values, (b[:n] @ dirs).sort(0).values
        total += float((pa - pb).abs().mean())
    return total / repeats


def normalise_per_channel(patches: torch.Tensor, channels: int) -> torch.Tensor:
    """(N, C * s * s) -> the same with every channel at zero mean, unit std over all patches and pixels."""
    x = patches.view(len(patches), channels, -1)
    mean, std = x.mean(dim=(0, 2), keepdim=True), x.std(dim=(0, 2), keepdim=True).clamp_min(1e-8)
    return ((x - mean) / std).view(len(patches), -1)


def swd(images_a: torch.Tensor, images_b: torch.Tensor, patches_per_image: int = 128, patch_size: int = 7,
        directions: int = 128, repeats: int = 4, seed: int = 0) -> list[float]:
    """Sliced Wasserstein distance between two image sets per Laplacian-pyramid level (Karras et al. 2018):
    7x7 patches, each level's descriptors normalised per channel, x 1e3 as usually reported. -> fine to coarse."""
    generator = torch.Generator().manual_seed(seed)
    distances = []
    for level_a, level_b in zip(laplacian_pyramid(images_a.float()), laplacian_pyramid(images_b.float())):
        pa = random_patches(level_a, patches_per_image, patch_size, generator)
        pb = random_patches(level_b, patches_per_image, patch_size, generator)
        channels = level_a.shape[1]
        pa, pb = normalise_per_channel(pa, channels), normalise_per_channel(pb, channels)
        distances.append(1e3 * sliced_wasserstein(pa, pb, directions, repeats, generator))
    return distances


def mean_or_nan(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else math.nan
