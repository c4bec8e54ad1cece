"""Differentiable PatchMatch (CoCosNet v2): propagate -> evaluate K candidates -> GRU refine.

Candidates are stored as offsets (B, 2, K, h, w): channel 0 the row offset, channel 1 the column
offset, relative to the pixel they belong to. All K (or 3K during propagation) candidates are
gathered in one indexing operation.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import get_args

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import MotionGrad
from .gather import gather_dot, gather_mix
from .layers import InstanceNorm, maybe_checkpoint, memory_format_of
from .update import UpdateBlock

# Pixels per chunk of the final continuous read (see PatchMatchGRU._continuous_read): 8 chunks at 512x512.
READ_CHUNK_PIXELS = 1 << 15


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


def candidate_index(offsets: torch.Tensor, truncate: bool) -> torch.Tensor:
    """The flat indices of candidate offsets (B, 2, M, h, w) as contiguous rows (B, h*w, M): the same as
    ``positions_to_index(offsets_to_positions(offsets), truncate).flatten(2).transpose(1, 2)``, computed in
    place in ``offsets``, which it overwrites; no autograd.

    The search calls it on every propagated candidate set: in place, with the conversion to int64 and the
    transposition in one pass, it makes ~4 passes over those tensors instead of ~12. The index is formed in
    float32, as the official one is, and is exact for integer positions while h * w < 2**24."""
    b, _, m, h, w = offsets.shape
    if h * w >= 1 << 24:
        return positions_to_index(offsets_to_positions(offsets), truncate).flatten(2).transpose(1, 2).contiguous()
    rows, cols = offsets[:, 0], offsets[:, 1]
    rows.add_(torch.arange(h, device=offsets.device, dtype=offsets.dtype).view(h, 1)).clamp_(0, h - 1)
    cols.add_(torch.arange(w, device=offsets.device, dtype=offsets.dtype)).clamp_(0, w - 1)
    if not truncate:
        rows.round_()
        cols.round_()
    flat = rows.mul_(w).add_(cols).flatten(2).transpose(1, 2)  # (B, h*w, M), a transposed view
    return torch.empty(b, h * w, m, dtype=torch.long, device=offsets.device).copy_(flat)


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
    Written straight into the result (no padded copies: the search propagates twice per iteration).
    """
    k = offsets.shape[2]
    out = offsets.new_empty(*offsets.shape[:2], 3 * k, *offsets.shape[3:])
    prev, own, nxt = out[:, :, :k], out[:, :, k:2 * k], out[:, :, 2 * k:]
    own.copy_(offsets)
    dim = -1 if horizontal else -2
    n = offsets.shape[dim]
    prev.narrow(dim, 1, n - 1).copy_(offsets.narrow(dim, 0, n - 1))
    prev.narrow(dim, 0, 1).zero_()
    nxt.narrow(dim, 0, n - 1).copy_(offsets.narrow(dim, 1, n - 1))
    nxt.narrow(dim, n - 1, 1).zero_()
    return out


def _table_rows(index: torch.Tensor, n: int) -> torch.Tensor:
    """(B, N', K) indices into each image's N rows -> (B*N', K) rows of the (B*N, C) batch table, contiguous.

    A single image's contiguous indices are used as they are (its offset is 0). Others are summed into a
    contiguous tensor, which makes the gathers' ``contiguous()`` free instead of a second pass over
    (N', K) int64 (100 MB at 512x512 for the search's 48 candidates)."""
    b = index.shape[0]
    if b == 1 and index.is_contiguous():
        return index[0]
    rows = torch.empty(index.shape, dtype=index.dtype, device=index.device)
    return torch.add(index, (torch.arange(b, device=index.device) * n).view(b, 1, 1), out=rows).flatten(0, 1)


def candidate_dots(left: torch.Tensor, right: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Dot products of each pixel's feature with the features at its K candidate positions.

    left: (B, n, C) the pixels' features as rows, right: (B, N, C) the table, index: (B, n, K) in [0, N)
    -> (B, n, K).
    """
    b, n, c = right.shape
    return gather_dot(left.reshape(-1, c), right.reshape(b * n, c), _table_rows(index, n)).view(index.shape)


def candidate_mix(weight: torch.Tensor, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Weighted sum of each pixel's K candidate rows: weight (B, n, K), table (B, N, C), index (B, n, K)
    -> (B, n, C)."""
    b, n, c = table.shape
    return gather_mix(weight.flatten(0, 1), table.reshape(b * n, c), _table_rows(index, n)).view(b, -1, c)


def bilinear_corners(positions: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Continuous (B, 2, K, N) positions in an (h, w) frame -> the 4 corner flat indices (B, N, K, 4) and
    their bilinear weights (B, N, K, 4); weights carry the gradient w.r.t. the positions."""
    pos = positions.permute(0, 3, 2, 1)  # (B, N, K, 2)
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
    warp: torch.Tensor  # (B, V, h, w) exemplar (its V channels) warped by the candidate softmax
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

    Matching scores and their softmax are computed in float32 whatever the autocast dtype: the
    temperature (0.01) multiplies the rounding error of a bf16 dot product by 100.

    The final candidates depend differentiably on the last update alone: the search re-derives them
    from integer positions. So the earlier updates reach the loss only through the hidden state they
    pass on, and their offset heads never need a graph.

    ``grad_iters``: the GRU is trained through the last ``grad_iters`` iterations only (None: all); the
    earlier ones, and below all of them the initial hidden layer, run without a graph. This cuts the
    gradient through the hidden state's past.

    ``motion_grad``: which tracked iterations train the motion encoder. "last": the last update only; the
    earlier ones train the recurrence alone (their motion features enter it as constants, so the
    backward pass neither recomputes nor differentiates the encoder there). "all": every tracked
    iteration (full backpropagation through time).

    Parameters left without a gradient are frozen (``requires_grad=False``).
    """

    def __init__(self, feat_ch: int, num_candidates: int = 16, iters: int = 5, temperature: float = 0.01,
                 official_compat: bool = False, hidden_dim: int = 32, grad_iters: int | None = None,
                 motion_grad: MotionGrad = "last"):
        super().__init__()
        if motion_grad not in get_args(MotionGrad):
            raise ValueError(f"motion_grad must be one of {get_args(MotionGrad)}, got {motion_grad!r}")
        self.num_candidates = num_candidates
        self.iters = iters
        self.grad_iters = iters if grad_iters is None else min(grad_iters, iters)
        self.motion_grad = motion_grad
        self.temperature = temperature
        self.official_compat = official_compat
        norm, relu = InstanceNorm(hidden_dim), nn.ReLU(inplace=True)
        self.initial_layer = nn.Sequential(
            nn.Conv2d(2 * feat_ch, hidden_dim, 3, padding=1), norm, relu,
            nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1), norm, relu,
        )
        self.refine_net = UpdateBlock(num_candidates, hidden_dim)
        # Parameters no gradient can reach are frozen, so DDP does not wait for their gradients.
        self.initial_layer.requires_grad_(self.grad_iters == iters)
        self.refine_net.requires_grad_(self.grad_iters > 0)

    def _evaluate(self, left, right, offsets, layout: torch.memory_format):
        """Score all candidates and keep the top K.

        left, right: (B, N, C); offsets (B, 2, M, h, w) -> offsets (B, 2, K, h, w), probs (B, K, h, w) in ``layout``
        (the GRU's convolutions keep their input's).
        """
        b, _, m, h, w = offsets.shape
        index = candidate_index(offsets, truncate=self.official_compat)  # (B, N, M); overwrites the offsets
        prob = F.softmax(candidate_dots(left, right, index) / self.temperature, dim=-1)
        top_prob, top = torch.topk(prob, self.num_candidates, dim=-1)
        kept = torch.gather(index, -1, top).transpose(1, 2).reshape(b, -1, h, w)
        prob = top_prob.view(b, h, w, -1).permute(0, 3, 1, 2)  # channels-last strides, also at B = 1
        return index_to_offsets(kept), prob.contiguous(memory_format=layout)

    @torch.no_grad()
    def _search(self, left, right, offsets, horizontal_first: bool, layout: torch.memory_format):
        offsets, _ = self._evaluate(left, right, propagate(offsets, horizontal_first), layout)
        return self._evaluate(left, right, propagate(offsets, not horizontal_first), layout)

    def _initial_hidden(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        return self.initial_layer(torch.cat([left, right], dim=1))

    def _update(self, hidden, corr, flow, checkpointed: bool, last: bool):
        """One GRU update -> (new hidden state, offset delta (B, 2K, h, w)).

        Its three parts are checkpointed one by one, so a recomputation holds one part's activations
        at a time (at 512x512 the whole block's are ~1 GiB). Only the last update's delta reaches a loss;
        the motion features of the others carry gradient only with ``motion_grad="all"``.
        """
        block = self.refine_net
        part = lambda fn, *args: maybe_checkpoint(checkpointed and torch.is_grad_enabled(), fn, *args)  # noqa: E731
        with torch.set_grad_enabled(torch.is_grad_enabled() and (last or self.motion_grad == "all")):
            motion = part(block.encoder, flow, corr)
        hidden = part(block.gru, hidden, motion)
        with torch.set_grad_enabled(torch.is_grad_enabled() and last):
            return hidden, part(block.flow_head, hidden)

    def _continuous_read(self, left_rows, right_rows, image_rows, positions, checkpointed: bool):
        """Score and warp at continuous positions: each candidate's feature and colour are bilinear
        in its four corner pixels, so the scores and the warp are differentiable in the positions.

        (B, N, C), (B, N, C), (B, N, V), positions (B, 2, K, h, w) -> warp (B, N, V), prob (B, N, K).

        Pixels are read READ_CHUNK_PIXELS at a time (every pixel's read is independent of the
        others'), each chunk ``checkpointed`` on its own: a recomputation in the backward pass then
        holds one chunk's corner indices, weights and scores (64 per pixel each) instead of the
        whole level's (the correspondence's peak at 512x512 fell from 4.43 to 4.11 GiB).
        """
        h, w = positions.shape[-2:]
        positions = positions.flatten(3)  # (B, 2, K, N)
        parts = [maybe_checkpoint(checkpointed, self._read_pixels, left_rows[:, s:s + READ_CHUNK_PIXELS],
                                  right_rows, image_rows, positions[..., s:s + READ_CHUNK_PIXELS], h, w)
                 for s in range(0, h * w, READ_CHUNK_PIXELS)]
        if len(parts) == 1:
            return parts[0]
        return torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)

    def _read_pixels(self, left_rows, right_rows, image_rows, positions, h: int, w: int):
        """The continuous read of n pixels: left_rows (B, n, C) their features, positions (B, 2, K, n)
        their candidates; right_rows, image_rows the whole (B, N, C), (B, N, V) tables
        -> warp (B, n, V), prob (B, n, K)."""
        b, _, k = positions.shape[:3]
        corners, weight = bilinear_corners(positions, h, w)  # (B, n, K, 4) each
        corners = corners.flatten(2)
        dots = candidate_dots(left_rows, right_rows, corners).view(b, -1, k, 4)
        prob = F.softmax((dots * weight).sum(-1) / self.temperature, dim=-1)
        warp = candidate_mix((prob.unsqueeze(-1) * weight).flatten(2), image_rows, corners)
        return warp, prob

    def forward(self, left: torch.Tensor, right: torch.Tensor, exemplar: torch.Tensor,
                offsets: torch.Tensor, checkpointed: bool = False) -> PatchMatchResult:
        """left: (B, C, h, w) input features, right: (B, C, h, w) exemplar features,
        exemplar: (B, V, h, w) image to warp (its colours, possibly followed by other channels),
        offsets: (B, 2, K, h, w) initial candidates.

        ``checkpointed``: keep only the inputs of each GRU update's parts for the backward pass and
        recompute the parts there; the same for the initial layer and the final continuous read. The
        search itself runs without a graph, so it is never recomputed.
        """
        b, c, h, w = left.shape
        layout = memory_format_of(left)
        left, right, exemplar = left.float(), right.float(), exemplar.float()
        # Rows must be contiguous: every candidate gather and dot product walks them.
        left_rows = left.flatten(2).transpose(1, 2).contiguous()
        right_rows = right.flatten(2).transpose(1, 2).contiguous()
        image_rows = exemplar.flatten(2).transpose(1, 2).contiguous()
        offsets = offsets.detach()
        # With integer candidates (official) nothing downstream depends on the GRU differentiably,
        # so recording its graph would only hold every iteration's activations in memory.
        grad = torch.is_grad_enabled() and not self.official_compat
        first_tracked = self.iters - self.grad_iters
        with torch.set_grad_enabled(grad and first_tracked == 0):
            hidden = maybe_checkpoint(checkpointed and torch.is_grad_enabled(), self._initial_hidden, left, right)
        for it in range(self.iters):
            horizontal_first = random.random() < 0.5 if self.official_compat else it % 2 == 0
            offsets, corr = self._search(left_rows, right_rows, offsets, horizontal_first, layout)
            flow = offsets.flatten(1, 2).contiguous(memory_format=layout)
            with torch.set_grad_enabled(grad and it >= first_tracked):
                hidden, delta = self._update(hidden, corr, flow, checkpointed, last=it == self.iters - 1)
            offsets = offsets + delta.view_as(offsets)
        positions = offsets_to_positions(offsets)
        if self.official_compat:
            index = positions_to_index(positions, truncate=True).flatten(2).transpose(1, 2)
            prob = F.softmax(candidate_dots(left_rows, right_rows, index) / self.temperature, dim=-1)
            warp = candidate_mix(prob, image_rows, index)
            pos_rows = torch.stack([torch.div(index, w, rounding_mode="floor"), index % w], -1).float()
        else:
            warp, prob = self._continuous_read(left_rows, right_rows, image_rows, positions,
                                               checkpointed and torch.is_grad_enabled())
            index = positions_to_index(positions.detach(), truncate=False).flatten(2).transpose(1, 2)
            pos_rows = positions.detach().flatten(3).permute(0, 3, 2, 1)  # (B, N, K, 2)
        best = torch.gather(pos_rows, 2, prob.argmax(-1)[..., None, None].expand(-1, -1, 1, 2)).squeeze(2)
        to_map = lambda t: t.transpose(1, 2).reshape(b, 2, h, w)  # noqa: E731
        return PatchMatchResult(
            warp=warp.transpose(1, 2).reshape(b, -1, h, w),
            best=to_map(best), first=to_map(pos_rows[:, :, 0]),
            index=index, prob=prob,
        )

