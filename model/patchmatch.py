"""Differentiable PatchMatch (CoCosNet v2): propagate -> evaluate K candidates -> GRU refine.

Candidates are stored as offsets (B, 2, K, h, w): channel 0 the row offset, channel 1 the column
offset, relative to the pixel they belong to. All K (or 3K during propagation) candidates are
gathered in one indexing operation.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .update import UpdateBlock

# Upper bound on gathered candidate features held at once (elements), to keep memory flat at 512+.
_GATHER_BUDGET = 1 << 24


def pixel_grid(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(2, h, w): the row and column of every pixel."""
    rows = torch.arange(h, device=device, dtype=dtype).view(h, 1).expand(h, w)
    cols = torch.arange(w, device=device, dtype=dtype).view(1, w).expand(h, w)
    return torch.stack([rows, cols])


def offsets_to_positions(offsets: torch.Tensor) -> torch.Tensor:
    """(B, 2, K, h, w) offsets -> absolute (row, col) positions clamped into the frame."""
    h, w = offsets.shape[-2:]
    grid = pixel_grid(h, w, offsets.device, offsets.dtype).unsqueeze(1)
    rows = (grid[0] + offsets[:, 0]).clamp(0, h - 1)
    cols = (grid[1] + offsets[:, 1]).clamp(0, w - 1)
    return torch.stack([rows, cols], dim=1)


def positions_to_index(positions: torch.Tensor, truncate: bool) -> torch.Tensor:
    """(B, 2, K, h, w) positions -> (B, K, h, w) flat indices ``row * w + col``.

    ``truncate`` reproduces the official rounding: the float index is truncated as a whole,
    so a fractional row leaks into the column. Otherwise each coordinate is rounded.
    """
    w = positions.shape[-1]
    if truncate:
        return (positions[:, 0] * w + positions[:, 1]).long()
    return positions[:, 0].round().long() * w + positions[:, 1].round().long()


def index_to_offsets(index: torch.Tensor) -> torch.Tensor:
    """(B, K, h, w) flat indices -> (B, 2, K, h, w) integer-valued float offsets."""
    h, w = index.shape[-2:]
    grid = pixel_grid(h, w, index.device).unsqueeze(1)
    rows = torch.div(index, w, rounding_mode="floor").float()
    cols = torch.remainder(index, w).float()
    return torch.stack([rows - grid[0], cols - grid[1]], dim=1)


def window_offsets(window: int, dilation: int, device=None) -> torch.Tensor:
    """(2, window**2) offsets of a dilated window, row-major, centred like the official code."""
    steps = (torch.arange(window, device=device) - (window - 1) // 2) * dilation
    rows = steps.view(window, 1).expand(window, window).reshape(-1)
    cols = steps.view(1, window).expand(window, window).reshape(-1)
    return torch.stack([rows, cols]).float()


def seed_from_coarse(best: torch.Tensor, size: tuple[int, int], window: int, dilation: int) -> torch.Tensor:
    """Initial candidates at the next level from the coarse best match.

    best: (B, 2, h, w) absolute (row, col) match per coarse pixel -> (B, 2, K, H, W) offsets:
    the coarse offset doubled, spread over a dilated window, then upsampled (nearest) x2.
    """
    h, w = best.shape[-2:]
    coarse = best - pixel_grid(h, w, best.device, best.dtype)
    window_off = window_offsets(window, dilation, best.device).view(1, 2, -1, 1, 1)
    spread = 2 * coarse.unsqueeze(2) + window_off  # (B, 2, K, h, w)
    b, _, k = spread.shape[:3]
    up = F.interpolate(spread.reshape(b, 2 * k, h, w), size=size, mode="nearest")
    return up.view(b, 2, k, *size)


def propagate(offsets: torch.Tensor, horizontal: bool) -> torch.Tensor:
    """Give every pixel its neighbours' candidates too: (B, 2, K, h, w) -> (B, 2, 3K, h, w).

    Order: previous neighbour's K, own K, next neighbour's K; missing neighbours give zero offsets.
    """
    if horizontal:
        prev = F.pad(offsets[..., :-1], (1, 0))
        nxt = F.pad(offsets[..., 1:], (0, 1))
    else:
        prev = F.pad(offsets[..., :-1, :], (0, 0, 1, 0))
        nxt = F.pad(offsets[..., 1:, :], (0, 0, 0, 1))
    return torch.cat([prev, offsets, nxt], dim=2)


def _gather_dot(left: torch.Tensor, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """left (B, n, C), table (B*N, C), index (B, n, K) global rows -> (B, n, K) dot products."""
    b, n, k = index.shape
    picked = table.index_select(0, index.reshape(-1)).view(b, n, k, -1)
    return (picked * left.unsqueeze(2)).sum(-1)


def candidate_dots(left: torch.Tensor, right: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Dot products of each pixel's feature with the features at its K candidate positions.

    left, right: (B, N, C) features as rows; index: (B, N, K) in [0, N) -> (B, N, K).
    Chunked over pixels to bound memory; under autograd each chunk is recomputed in the
    backward pass instead of storing the gathered (N, K, C) features.
    """
    b, n, c = right.shape
    k = index.shape[-1]
    table = right.reshape(b * n, c)
    index = index + (torch.arange(b, device=index.device) * n).view(b, 1, 1)
    chunk = max(1, _GATHER_BUDGET // max(1, b * k * c))
    grad = torch.is_grad_enabled() and (left.requires_grad or right.requires_grad)
    parts = []
    for start in range(0, n, chunk):
        args = (left[:, start:start + chunk], table, index[:, start:start + chunk])
        parts.append(checkpoint(_gather_dot, *args, use_reentrant=False) if grad else _gather_dot(*args))
    return torch.cat(parts, dim=1)


def gather_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table (B, N, C), index (B, N, K) -> (B, N, K, C)."""
    b, n, c = table.shape
    flat = index + (torch.arange(b, device=index.device) * n).view(b, 1, 1)
    return table.reshape(b * n, c).index_select(0, flat.reshape(-1)).view(*index.shape, c)


def bilinear_corners(positions: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Continuous (B, 2, K, h, w) positions -> the 4 corner flat indices (B, N, K, 4) and their
    bilinear weights (B, N, K, 4); weights carry the gradient w.r.t. the positions."""
    b, _, k = positions.shape[:3]
    pos = positions.flatten(3).permute(0, 3, 2, 1)  # (B, N, K, 2)
    top_left = pos.detach().floor()
    frac = pos - top_left
    r0, c0 = top_left[..., 0].long(), top_left[..., 1].long()
    r1, c1 = (r0 + 1).clamp(max=h - 1), (c0 + 1).clamp(max=w - 1)
    fr, fc = frac[..., 0], frac[..., 1]
    index = torch.stack([r0 * w + c0, r0 * w + c1, r1 * w + c0, r1 * w + c1], dim=-1)
    weight = torch.stack([(1 - fr) * (1 - fc), (1 - fr) * fc, fr * (1 - fc), fr * fc], dim=-1)
    return index, weight


@dataclass
class PatchMatchResult:
    warp: torch.Tensor  # (B, 3, h, w) exemplar warped by the candidate softmax
    best: torch.Tensor  # (B, 2, h, w) (row, col) of each pixel's most probable candidate
    first: torch.Tensor  # (B, 2, h, w) (row, col) of candidate 0, which seeds the next level officially
    index: torch.Tensor  # (B, h*w, K) flat candidate indices (integer positions)
    prob: torch.Tensor  # (B, h*w, K) candidate softmax


class PatchMatchGRU(nn.Module):
    """Iterative PatchMatch with a ConvGRU that refines candidate offsets.

    In the default mode the final candidates are read at continuous positions (bilinear), so the
    warp loss reaches the GRU. ``official_compat`` reproduces the official forward: integer
    candidates (truncated indices) and one ``random.random() < 0.5`` draw per iteration choosing
    horizontal-then-vertical propagation; the default mode alternates the order instead.
    """

    def __init__(self, feat_ch: int, num_candidates: int = 16, iters: int = 5, temperature: float = 0.01,
                 official_compat: bool = False, hidden_dim: int = 32):
        super().__init__()
        self.num_candidates = num_candidates
        self.iters = iters
        self.temperature = temperature
        self.official_compat = official_compat
        norm, relu = nn.InstanceNorm2d(hidden_dim, affine=False), nn.ReLU(inplace=True)
        self.initial_layer = nn.Sequential(
            nn.Conv2d(2 * feat_ch, hidden_dim, 3, padding=1), norm, relu,
            nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1), norm, relu,
        )
        self.refine_net = UpdateBlock(num_candidates, hidden_dim)

    def _evaluate(self, left, right, offsets):
        """Score all candidates and keep the top K.

        left, right: (B, N, C); offsets (B, 2, M, h, w) -> offsets (B, 2, K, h, w), probs (B, K, h, w).
        """
        b, _, m, h, w = offsets.shape
        index = positions_to_index(offsets_to_positions(offsets), truncate=self.official_compat)
        index = index.flatten(2).transpose(1, 2)  # (B, N, M)
        prob = F.softmax(candidate_dots(left, right, index) / self.temperature, dim=-1)
        top_prob, top = torch.topk(prob, self.num_candidates, dim=-1)
        kept = torch.gather(index, -1, top).transpose(1, 2).reshape(b, -1, h, w)
        return index_to_offsets(kept), top_prob.transpose(1, 2).reshape(b, -1, h, w)

    @torch.no_grad()
    def _search(self, left, right, offsets, horizontal_first: bool):
        offsets, _ = self._evaluate(left, right, propagate(offsets, horizontal_first))
        return self._evaluate(left, right, propagate(offsets, not horizontal_first))

    def forward(self, left: torch.Tensor, right: torch.Tensor, exemplar: torch.Tensor,
                offsets: torch.Tensor) -> PatchMatchResult:
        """left: (B, C, h, w) input features, right: (B, C, h, w) exemplar features,
        exemplar: (B, 3, h, w) image to warp, offsets: (B, 2, K, h, w) initial candidates."""
        b, c, h, w = left.shape
        # Rows must be contiguous: every candidate gather and dot product walks them.
        left_rows = left.flatten(2).transpose(1, 2).contiguous()
        right_rows = right.flatten(2).transpose(1, 2).contiguous()
        offsets = offsets.detach()
        # With integer candidates (official) nothing downstream depends on the GRU differentiably,
        # so recording its graph would only hold every iteration's activations in memory.
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.official_compat):
            hidden = self.initial_layer(torch.cat([left, right], dim=1))
            for it in range(self.iters):
                horizontal_first = random.random() < 0.5 if self.official_compat else it % 2 == 0
                offsets, corr = self._search(left_rows, right_rows, offsets, horizontal_first)
                hidden, delta = self.refine_net(hidden, corr, offsets.flatten(1, 2))
                offsets = offsets + delta.view_as(offsets)
        positions = offsets_to_positions(offsets)
        image_rows = exemplar.flatten(2).transpose(1, 2)
        if self.official_compat:
            index = positions_to_index(positions, truncate=True).flatten(2).transpose(1, 2)
            prob = F.softmax(candidate_dots(left_rows, right_rows, index) / self.temperature, dim=-1)
            warp = (gather_rows(image_rows, index) * prob.unsqueeze(-1)).sum(2)
        else:
            corners, weight = bilinear_corners(positions, h, w)
            k = corners.shape[2]
            dots = candidate_dots(left_rows, right_rows, corners.flatten(2)).view(b, -1, k, 4)
            prob = F.softmax((dots * weight).sum(-1) / self.temperature, dim=-1)
            colours = (gather_rows(image_rows, corners.flatten(2)).view(b, -1, k, 4, 3) * weight.unsqueeze(-1)).sum(3)
            warp = (colours * prob.unsqueeze(-1)).sum(2)
            index = positions_to_index(positions.detach(), truncate=False).flatten(2).transpose(1, 2)
        pos_rows = positions.flatten(3).permute(0, 3, 2, 1)  # (B, N, K, 2)
        if self.official_compat:
            pos_rows = torch.stack([torch.div(index, w, rounding_mode="floor"), index % w], -1).float()
        best = torch.gather(pos_rows, 2, prob.argmax(-1)[..., None, None].expand(-1, -1, 1, 2)).squeeze(2)
        to_map = lambda t: t.transpose(1, 2).reshape(b, 2, h, w)  # noqa: E731
        return PatchMatchResult(
            warp=warp.transpose(1, 2).reshape(b, 3, h, w),
            best=to_map(best), first=to_map(pos_rows[:, :, 0]),
            index=index, prob=prob,
        )
