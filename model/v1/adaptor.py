"""CoCosNet v1 domain adaptor: an input-domain map, or an exemplar photo, to features at H/4."""
from __future__ import annotations

import torch
import torch.nn as nn

from model.attention import SelfAttention
from model.layers import SPADEResBlock, SpectralInstanceConv, leaky_relu

PONO_EPS = 1e-5  # v1's positional normalisation (v2 uses 1e-8)


class DomainAdaptorV1(nn.Module):
    """Five spectral + instance-norm convolutions down to H/4, then three SPADE residual blocks
    modulated by the adaptor's own input (optionally self-attention after the first).

    x: (B, in_ch, H, W) -> (B, 4 nf, H/4, W/4), not normalised. ``kernel`` is the official
    ``adaptor_kernel`` of the two strided convolutions (3 or 4; the padding stays 1).
    """

    def __init__(self, in_ch: int, nf: int, kernel: int = 3, hidden: int = 128, pono: bool = True,
                 nonlocal_attention: bool = False):
        super().__init__()
        self.layer1 = SpectralInstanceConv(in_ch, nf, 3, padding=1)
        self.layer2 = SpectralInstanceConv(nf, 2 * nf, kernel, stride=2, padding=1)
        self.layer3 = SpectralInstanceConv(2 * nf, 4 * nf, 3, padding=1)
        self.layer4 = SpectralInstanceConv(4 * nf, 8 * nf, kernel, stride=2, padding=1)
        self.layer5 = SpectralInstanceConv(8 * nf, 8 * nf, 3, padding=1)
        block = lambda fin, fout: SPADEResBlock(fin, fout, in_ch, hidden, pono, PONO_EPS)  # noqa: E731
        self.head_0 = block(8 * nf, 8 * nf)
        self.attn = SelfAttention(8 * nf, spectral=False) if nonlocal_attention else None
        self.G_middle_0 = block(8 * nf, 8 * nf)
        self.G_middle_1 = block(8 * nf, 4 * nf)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cond = x
        x = self.layer1(x)
        for layer in (self.layer2, self.layer3, self.layer4, self.layer5):
            x = layer(leaky_relu(x))
        x = self.head_0(x, cond)
        if self.attn is not None:
            x = self.attn(x)
        return self.G_middle_1(self.G_middle_0(x, cond), cond)
