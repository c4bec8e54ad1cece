"""Self-attention block (SAGAN, Zhang et al. 2019) as CoCosNet v1 uses it in its generator, discriminator
and, optionally, domain adaptors."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import spectral_norm

from .layers import in_layout_of


class SelfAttention(nn.Module):
    """x + gamma * attention(x): every position attends to a 2x2 max-pooled grid of all positions.

    x: (B, C, H, W) with C divisible by 8 and H, W even -> (B, C, H, W). ``gamma`` starts at 0, so the
    block starts as the identity. Memory: one (B, HW, HW/4) matrix.
    """

    def __init__(self, channels: int, spectral: bool = True):
        super().__init__()
        if channels % 8:
            raise ValueError(f"self-attention needs channels divisible by 8, got {channels}")
        wrap = spectral_norm if spectral else (lambda conv: conv)
        self.theta = wrap(nn.Conv2d(channels, channels // 8, 1, bias=False))
        self.phi = wrap(nn.Conv2d(channels, channels // 8, 1, bias=False))
        self.g = wrap(nn.Conv2d(channels, channels // 2, 1, bias=False))
        self.o = wrap(nn.Conv2d(channels // 2, channels, 1, bias=False))
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        query = self.theta(x).flatten(2)  # (B, C/8, HW)
        key = F.max_pool2d(self.phi(x), 2).flatten(2)  # (B, C/8, HW/4)
        value = F.max_pool2d(self.g(x), 2).flatten(2)  # (B, C/2, HW/4)
        attn = F.softmax(torch.bmm(query.transpose(1, 2), key), dim=-1)  # (B, HW, HW/4)
        out = in_layout_of(torch.bmm(value, attn.transpose(1, 2)).view(b, c // 2, h, w), x)
        return x + self.gamma * self.o(out)
