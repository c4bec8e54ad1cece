"""CoCosNet v1 generator: SPADE residual blocks with positional normalisation, modulated by the warped
exemplar (and the input map), with a self-attention block at H/2."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.attention import SelfAttention
from model.layers import SPADEResBlock, in_layout_of, leaky_relu

from .adaptor import PONO_EPS


class GeneratorV1(nn.Module):
    """Decode from an H/32 seed to (B, 3, H, W) in [-1, 1].

    The SPADE condition is the full-resolution warp (B, 3, H, W), concatenated with the input map
    (B, label_nc, H, W) when ``with_map`` (the official ``--CBN_intype warp_mask``).
    """

    def __init__(self, image_size: tuple[int, int], label_nc: int, ngf: int = 64, hidden: int = 128,
                 pono: bool = True, with_map: bool = True, attention: bool = True):
        super().__init__()
        self.seed_size = (image_size[0] // 32, image_size[1] // 32)
        self.with_map = with_map
        cond = 3 + (label_nc if with_map else 0)
        block = lambda fin, fout: SPADEResBlock(fin, fout, cond, hidden, pono, PONO_EPS)  # noqa: E731
        self.fc = nn.Conv2d(cond, 16 * ngf, 3, padding=1)
        self.head_0 = block(16 * ngf, 16 * ngf)
        self.G_middle_0 = block(16 * ngf, 16 * ngf)
        self.G_middle_1 = block(16 * ngf, 16 * ngf)
        self.up_0 = block(16 * ngf, 8 * ngf)
        self.up_1 = block(8 * ngf, 4 * ngf)
        self.attn = SelfAttention(4 * ngf) if attention else None
        self.up_2 = block(4 * ngf, 2 * ngf)
        self.up_3 = block(2 * ngf, ngf)
        self.conv_img = nn.Conv2d(ngf, 3, 3, padding=1)

    def forward(self, input_map: torch.Tensor, warped: list[torch.Tensor], checkpointed: bool = False) -> torch.Tensor:
        """input_map: (B, label_nc, H, W); warped: coarse -> fine, the last (B, 3, H, W) -> (B, 3, H, W).
        ``checkpointed``: recompute each block's SPADE branches in the backward pass (SPADEResBlock)."""
        cond = torch.cat([warped[-1], input_map], dim=1) if self.with_map else warped[-1]
        cond = in_layout_of(cond, input_map)
        up = lambda x: F.interpolate(x, scale_factor=2, mode="nearest")  # noqa: E731
        block = lambda module, x: module(x, cond, checkpointed)  # noqa: E731
        x = self.fc(F.interpolate(cond, size=self.seed_size, mode="nearest"))
        x = up(block(self.head_0, x))
        x = up(block(self.G_middle_1, block(self.G_middle_0, x)))
        x = up(block(self.up_0, x))
        x = up(block(self.up_1, x))
        if self.attn is not None:
            x = self.attn(x)
        x = up(block(self.up_2, x))
        x = block(self.up_3, x)
        return torch.tanh(self.conv_img(leaky_relu(x)))
