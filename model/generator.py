"""SPADE generator modulated by the warped exemplars and the input map."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import SPADEResBlock, in_layout_of, leaky_relu

WARP_RESIDUAL_CLAMP = 0.99


class SPADEGenerator(nn.Module):
    """Decode from an H/32 seed to (B, 3, H, W) in [-1, 1].

    Every block is modulated by ``cond`` = [warped exemplars resized to (H, W) ..., input map],
    with positional normalisation (PONO) instead of batch statistics. ``warp_residual``: the last layer's
    output is added to the finest warp in tanh's pre-activation space, so the output starts as the warp.
    """

    def __init__(self, image_size: tuple[int, int], label_nc: int, num_warps: int, ngf: int = 64,
                 hidden: int = 128, pono: bool = True, warp_residual: bool = False):
        super().__init__()
        self.image_size = image_size
        self.warp_residual = warp_residual
        self.seed_size = (image_size[0] // 32, image_size[1] // 32)
        cond = 3 * num_warps + label_nc
        block = lambda fin, fout: SPADEResBlock(fin, fout, cond, hidden, pono)  # noqa: E731
        self.fc = nn.Conv2d(cond, 8 * ngf, 3, padding=1)
        self.head_0 = block(8 * ngf, 8 * ngf)
        self.G_middle_0 = block(8 * ngf, 8 * ngf)
        self.G_middle_1 = block(8 * ngf, 8 * ngf)
        self.up_0 = block(8 * ngf, 8 * ngf)
        self.up_1 = block(8 * ngf, 4 * ngf)
        self.up_2 = block(4 * ngf, 2 * ngf)
        self.up_3 = block(2 * ngf, ngf)
        self.conv_img = nn.Conv2d(ngf, 3, 3, padding=1)

    def forward(self, input_map: torch.Tensor, warped: list[torch.Tensor], checkpointed: bool = False) -> torch.Tensor:
        """input_map: (B, label_nc, H, W); warped: coarse -> fine (B, 3, h, w) -> (B, 3, H, W).
        ``checkpointed``: recompute each block's SPADE branches in the backward pass (SPADEResBlock)."""
        resized = [F.interpolate(w, size=self.image_size, mode="nearest") if w.shape[-2:] != self.image_size
                   else w for w in warped]
        cond = in_layout_of(torch.cat([*resized, input_map], dim=1), input_map)  # the warps come in either layout
        x = self.fc(F.interpolate(cond, size=self.seed_size, mode="nearest"))
        x = self.head_0(x, cond, checkpointed)
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = self.G_middle_1(self.G_middle_0(x, cond, checkpointed), cond, checkpointed)
        for block in (self.up_0, self.up_1, self.up_2, self.up_3):
            x = block(F.interpolate(x, scale_factor=2, mode="nearest"), cond, checkpointed)
        out = self.conv_img(leaky_relu(x))
        if self.warp_residual:  # the clamp keeps atanh finite: +-0.99 is 1.3 off 0 and 255
            out = out + torch.atanh(resized[-1].clamp(-WARP_RESIDUAL_CLAMP, WARP_RESIDUAL_CLAMP))
        return torch.tanh(out)
