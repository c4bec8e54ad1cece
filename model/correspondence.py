"""Cross-domain correspondence (v2): domain-aligned feature pyramid, full attention at the coarsest
level, then hierarchical PatchMatch."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .patchmatch import PatchMatchGRU, seed_from_coarse
from .pyramid import DomainAdaptor


def matching_features(x: torch.Tensor, center: bool, eps: float = 1e-10) -> torch.Tensor:
    """Centre over channels (PONO-C) and unit-normalise each position. (B, C, h, w) -> same."""
    if center:
        x = x - x.mean(dim=1, keepdim=True)
    return x / (torch.norm(x, 2, 1, keepdim=True) + eps)


def downsample_to(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Average-pool (B, C, H, W) by the integer factor that gives ``size``."""
    factor = image.shape[-2] // size[0]
    return image if factor == 1 else F.avg_pool2d(image, factor, stride=factor)


@dataclass
class AttentionResult:
    warp: torch.Tensor  # (B, V, h, w): the exemplar's V channels
    best: torch.Tensor  # (B, 2, h, w) (row, col) of the most attended exemplar position
    cycle: torch.Tensor | None  # (B, 3, h, w) exemplar -> input -> exemplar warp


def global_attention(query: torch.Tensor, key: torch.Tensor, exemplar: torch.Tensor, temperature: float,
                     with_cycle: bool) -> AttentionResult:
    """Full correlation between every input position and every exemplar position.

    query, key: (B, C, h, w) normalised features; exemplar: (B, V, h, w) (the image, possibly with more
    channels after its first 3, e.g. its map). The warp is ``softmax(q k^T / temperature) @ exemplar`` and the
    cycle warp ``softmax(k q^T / temperature) @ warp[:, :3]``, both through ``scaled_dot_product_attention`` (its
    flash kernels on CPU and CUDA keep one row block of the (hw, hw) matrix at a time, forward and
    backward); the best match is the argmax of the logits, taken a row block at a time. Memory is
    O(hw * C) instead of two or three (hw, hw) matrices (64 MiB each at 64x64 features, 1 GiB at
    128x128). Scores run in float32 under autocast: at temperature 0.01 a bf16 product puts the logits
    off by up to ~0.5 (mean 0.04; 64x64 smooth unit features, 32 channels) and moves 0.3% of the argmaxes.
    """
    b, c, h, w = query.shape
    with torch.autocast(query.device.type, enabled=False):
        q_rows = query.float().flatten(2).transpose(1, 2)  # (B, hw, C)
        k_rows = key.float().flatten(2).transpose(1, 2)
        image_rows = exemplar.float().flatten(2).transpose(1, 2)  # (B, hw, V)
        warp = _attend(q_rows, k_rows, image_rows, temperature)
        cycle = _attend(k_rows, q_rows, warp[..., :3], temperature) if with_cycle else None
        index = _best_key(q_rows.detach(), k_rows.detach())
    best = torch.stack([torch.div(index, w, rounding_mode="floor"), index % w], dim=1).float()
    to_map = lambda t: t.transpose(1, 2).reshape(b, -1, h, w)  # noqa: E731
    return AttentionResult(to_map(warp), best.view(b, 2, h, w), None if cycle is None else to_map(cycle))


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(query key^T / temperature) value for (B, L, C), (B, S, C), (B, S, V) -> (B, L, V).

    The CPU flash kernel needs equal head sizes, so the narrower side is zero-padded (zeros change
    neither the dot products nor the output's first V columns).
    """
    v, width = value.shape[-1], max(query.shape[-1], value.shape[-1])
    pad = lambda t: F.pad(t, (0, width - t.shape[-1])).unsqueeze(1)  # noqa: E731  (B, 1 head, L, width)
    out = F.scaled_dot_product_attention(pad(query), pad(key), pad(value), scale=1.0 / temperature)
    return out[:, 0, :, :v]


def _best_key(query: torch.Tensor, key: torch.Tensor, block_elements: int = 1 << 24) -> torch.Tensor:
    """(B, L, C), (B, S, C) -> (B, L) index of each query's highest-scoring key, a row block at a time."""
    rows = max(1, block_elements // key.shape[1])
    return torch.cat([torch.bmm(query[:, s:s + rows], key.transpose(1, 2)).argmax(-1)
                      for s in range(0, query.shape[1], rows)], dim=1)


@dataclass
class CorrespondenceOutput:
    warped: list[torch.Tensor]  # coarse -> fine (B, 3, h, w)
    matches: list[torch.Tensor]  # coarse -> fine (B, 2, h, w): exemplar (row, col) of the best match
    cycle: torch.Tensor | None  # (B, 3, h0, w0), training only
    candidates: list[torch.Tensor]  # per PatchMatch level (B, h*w, K) flat candidate indices
    domain_features: list[tuple[torch.Tensor, torch.Tensor]] | None  # (from x_A, from x_B) per level
    matching: list[tuple[torch.Tensor, torch.Tensor]]  # coarse -> fine (query, key) (B, nef, h, w) unit features


class Correspondence(nn.Module):
    """Warp the exemplar onto the input.

    input_map (B, label_nc, H, W), exemplar (B, 3, H, W), exemplar_map (B, label_nc, H, W).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        nf = cfg.nef
        adaptor = dict(nf=nf, kernel=cfg.adaptor_kernel, hidden=cfg.spade_hidden, pono=cfg.pono)
        self.adaptive_model_seg = DomainAdaptor(cfg.label_nc, **adaptor)
        self.adaptive_model_img = DomainAdaptor(cfg.label_nc + 3, **adaptor)
        level_ch = [4 * nf, 4 * nf, 2 * nf, nf]
        for i, channels in enumerate(level_ch):
            self.add_module(f"theta_{i}", nn.Conv2d(channels, nf, 1))
            self.add_module(f"phi_{i}", nn.Conv2d(channels, nf, 1))
        self.patch_match = PatchMatchGRU(nf, cfg.num_candidates, cfg.patchmatch_iters, cfg.temperature,
                                         cfg.official_compat, grad_iters=cfg.gru_grad_iters,
                                         motion_grad=cfg.gru_motion_grad)

    def forward(self, input_map: torch.Tensor, exemplar: torch.Tensor, exemplar_map: torch.Tensor,
                target: torch.Tensor | None = None) -> CorrespondenceOutput:
        """``target`` (x_B, the photo of input_map) adds the domain-alignment feature pairs."""
        grad = torch.is_grad_enabled()
        iters_ckpt, adaptor_ckpt = self.cfg.checkpoint_levels(self.training) if grad else (False, False)
        feats_a = self.adaptive_model_seg(input_map, adaptor_ckpt)
        feats_b = self.adaptive_model_img(torch.cat([exemplar, exemplar_map], dim=1), adaptor_ckpt)
        domain = None
        if target is not None:
            feats_pair = self.adaptive_model_img(torch.cat([target, input_map], dim=1), adaptor_ckpt)
            domain = list(zip(feats_a, feats_pair))
        center = self.cfg.pono_c
        warped, matches, candidates, matching, cycle, best = [], [], [], [], None, None
        for i in range(len(feats_a)):
            query = matching_features(getattr(self, f"theta_{i}")(feats_a[i]), center)
            key = matching_features(getattr(self, f"phi_{i}")(feats_b[i]), center)
            matching.append((query, key))
            size = tuple(query.shape[-2:])
            image = downsample_to(exemplar, size)
            if best is None:
                res = global_attention(query, key, image, self.cfg.temperature, with_cycle=self.training)
                cycle, best = res.cycle, res.best
            else:
                seed = seed_from_coarse(best, size, self.cfg.search_window, self.cfg.search_dilation)
                res = self.patch_match(query, key, image, seed, checkpointed=iters_ckpt)
                candidates.append(res.index)
                best = res.first if self.cfg.official_compat else res.best
            warped.append(res.warp)
            matches.append(res.best)
        return CorrespondenceOutput(warped, matches, cycle, candidates, domain, matching)
