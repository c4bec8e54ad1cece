"""CoCosNet v1 cross-domain correspondence: both inputs are mapped to a shared domain at H/4, then every
input position attends to every exemplar position (a temperature softmax over their correlation), and
the attention warps the exemplar (and its map) onto the input."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import ModelConfig
from model.layers import ResidualBlock, channel_normalize

from .adaptor import DomainAdaptorV1

FEATURE_EPS = sys.float_info.epsilon  # the official feature_normalize adds the float epsilon to the norm
TRUNK_BLOCKS = 4


def patch_features(x: torch.Tensor, kernel: int, center_channels: bool) -> torch.Tensor:
    """(B, C, h, w) -> (B, C k^2, h w): each position's zero-padded k x k neighbourhood as one vector,
    centred (over its C k^2 entries with PONO-C, else over positions) and unit-normalised."""
    x = F.unfold(x, kernel, padding=kernel // 2) if kernel > 1 else x.flatten(2)
    x = x - x.mean(dim=1 if center_channels else -1, keepdim=True)
    return x / (torch.norm(x, 2, 1, keepdim=True) + FEATURE_EPS)


def attend(attention: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """attention (B, N, M) rows over the M positions of values (B, C, M) -> (B, C, N)."""
    return torch.matmul(attention, values.transpose(1, 2)).transpose(1, 2).contiguous()


def warp_patches(attention: torch.Tensor, image: torch.Tensor, scale: int) -> torch.Tensor:
    """Warp whole scale x scale patches of image (B, C, H, W) with attention over its (H/s)(W/s) patches
    -> (B, C, H, W) (official --warp_patch)."""
    patches = F.unfold(image, scale, stride=scale)  # (B, C s^2, hw)
    return F.fold(attend(attention, patches), image.shape[-2:], scale, stride=scale)


def best_match(attention: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, hw, hw) -> (B, 2, h, w) float (row, col) of the most attended exemplar position."""
    index = attention.argmax(dim=-1).view(-1, *size)
    return torch.stack([torch.div(index, size[1], rounding_mode="floor"), index % size[1]], dim=1).float()


@dataclass
class CorrespondenceV1Output:
    warped: list[torch.Tensor]  # [(B, 3, H/4, W/4), (B, 3, H, W)]: the warp and the generator's upsampled warp
    matches: list[torch.Tensor]  # [(B, 2, H/4, W/4)] exemplar (row, col) of each position's best match
    cycle: torch.Tensor | None  # exemplar -> input -> exemplar warp (training only), like the supervised warp
    warp_mask: torch.Tensor | None  # (B, label_nc, H/4, W/4) the exemplar map warped (cfg.warp_mask)
    domain_features: list[tuple[torch.Tensor, torch.Tensor]] | None  # [(from x_A, from x_B)] at H/4
    candidates: list[torch.Tensor] = field(default_factory=list)  # PatchMatch candidates: none in v1


class CorrespondenceV1(nn.Module):
    """Warp the exemplar onto the input through one dense attention at H/4.

    input_map (B, label_nc, H, W), exemplar (B, 3, H, W), exemplar_map (B, label_nc, H, W).
    The image adaptor sees the exemplar photo alone; with ``maskmix`` the maps join the features in the
    residual trunk shared by both sides. ``ngf`` sets the widths, as the official ``--ngf`` does.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        adaptor = dict(nf=cfg.ngf, kernel=cfg.adaptor_kernel, hidden=cfg.spade_hidden, pono=cfg.pono,
                       nonlocal_attention=cfg.adaptor_nonlocal)
        self.adaptive_model_seg = DomainAdaptorV1(cfg.label_nc, **adaptor)
        self.adaptive_model_img = DomainAdaptorV1(3, **adaptor)
        trunk = 4 * cfg.ngf + (cfg.label_nc if cfg.maskmix else 0)
        self.layer = nn.Sequential(*[ResidualBlock(trunk) for _ in range(TRUNK_BLOCKS)])
        self.theta = nn.Conv2d(trunk, cfg.match_channels, 1)
        self.phi = nn.Conv2d(trunk, cfg.match_channels, 1)

    def features(self, adaptor: nn.Module, image: torch.Tensor) -> torch.Tensor:
        """Adaptor output unit-normalised over channels: (B, 4 ngf, H/4, W/4)."""
        return channel_normalize(adaptor(image), eps=FEATURE_EPS)

    def matching(self, features: torch.Tensor, domain_map: torch.Tensor, projection: nn.Conv2d) -> torch.Tensor:
        """Domain features (+ the map with maskmix) -> trunk -> theta/phi -> (B, match_channels k^2, hw)."""
        if self.cfg.maskmix:
            features = torch.cat([features, F.interpolate(domain_map, size=features.shape[-2:], mode="nearest")], 1)
        return patch_features(projection(self.layer(features)), self.cfg.match_kernel, self.cfg.pono_c)

    def forward(self, input_map: torch.Tensor, exemplar: torch.Tensor, exemplar_map: torch.Tensor,
                target: torch.Tensor | None = None) -> CorrespondenceV1Output:
        """``target`` (x_B, the photo of input_map) adds the domain-alignment feature pair."""
        feat_a = self.features(self.adaptive_model_seg, input_map)
        feat_b = self.features(self.adaptive_model_img, exemplar)
        domain = None if target is None else [(feat_a, self.features(self.adaptive_model_img, target))]
        size = tuple(feat_a.shape[-2:])
        query = self.matching(feat_a, input_map, self.theta)
        key = self.matching(feat_b, exemplar_map, self.phi)
        logits = torch.matmul(query.transpose(1, 2), key) / self.cfg.temperature  # (B, hw, hw)
        attention = F.softmax(logits, dim=-1)

        scale = exemplar.shape[-2] // size[0]
        warp = attend(attention, F.avg_pool2d(exemplar, scale).flatten(2)).unflatten(2, size)
        if self.cfg.warp_upsample == "patch":
            fine = warp_patches(attention, exemplar, scale)
        else:
            fine = F.interpolate(warp, size=exemplar.shape[-2:], mode=self.cfg.warp_upsample,
                                 **({"align_corners": False} if self.cfg.warp_upsample == "bilinear" else {}))
        warp_mask = None
        if self.cfg.warp_mask:
            small_map = F.interpolate(exemplar_map, size=size, mode="nearest")
            warp_mask = attend(attention, small_map.flatten(2)).unflatten(2, size)
        cycle = None
        if self.training:  # back from the input to the exemplar, with the softmax over the other axis
            back = F.softmax(logits.transpose(1, 2), dim=-1)
            if self.cfg.warp_upsample == "patch":
                cycle = warp_patches(back, fine, scale)
            else:
                cycle = attend(back, warp.flatten(2)).unflatten(2, size)
        return CorrespondenceV1Output([warp, fine], [best_match(attention, size)], cycle, warp_mask, domain)
