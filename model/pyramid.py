"""Domain adaptors: map an input-domain map, or an exemplar photo with its map, into a shared
feature domain at four resolutions (H/8, H/4, H/2, H)."""
from __future__ import annotations

import torch
import torch.nn as nn

from .layers import (ResidualBlock, SPADEResBlock, SpectralInstanceConv, channel_normalize, leaky_relu,
                     maybe_checkpoint, spectral_weight)


class DomainAdaptor(nn.Module):
    """Encoder (H -> H/8) and a SPADE decoder with skip connections back to H.

    The decoder is modulated by the adaptor's own input, so the features keep its layout.
    x: (B, in_ch, H, W) -> [(B, 4nf, H/8, W/8), (B, 4nf, H/4, W/4), (B, 2nf, H/2, W/2), (B, nf, H, W)],
    each unit-normalised over channels.
    """

    def __init__(self, in_ch: int, nf: int, kernel: int = 3, hidden: int = 128, pono: bool = True):
        super().__init__()
        pad = (kernel - 1) // 2
        self.layer1 = SpectralInstanceConv(in_ch, nf, 3, padding=pad)
        self.layer2 = nn.Sequential(SpectralInstanceConv(nf, 2 * nf, 3, padding=1), ResidualBlock(2 * nf))
        self.layer3 = nn.Sequential(SpectralInstanceConv(2 * nf, 4 * nf, kernel, 2, pad), ResidualBlock(4 * nf))
        self.layer4 = nn.Sequential(SpectralInstanceConv(4 * nf, 4 * nf, kernel, 2, pad), ResidualBlock(4 * nf))
        self.layer5 = nn.Sequential(SpectralInstanceConv(4 * nf, 4 * nf, kernel, 2, pad), ResidualBlock(4 * nf))
        decoder = [(4 * nf, 4 * nf), (4 * nf, 4 * nf), (4 * nf, 2 * nf), (2 * nf, nf)]
        names = ["head_0", "G_middle_0", "G_middle_1", "G_middle_2"]
        for name, (fin, fout) in zip(names, decoder):
            self.add_module(name, SPADEResBlock(fin, fout, in_ch, hidden, pono))
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)

    def forward(self, x: torch.Tensor, checkpointed: bool = False) -> list[torch.Tensor]:
        """``checkpointed``: keep only each layer's input and output for the backward pass and recompute
        the layers there (at 512x512 the two adaptors otherwise keep ~9 GiB of activations)."""
        cond = x
        skips = [maybe_checkpoint(checkpointed, self.layer1, x, spectral_weight(self.layer1[0]))]
        for layer in (self.layer2, self.layer3, self.layer4, self.layer5):
            skips.append(maybe_checkpoint(checkpointed, _encode, layer, spectral_weight(layer[0][0]), skips[-1]))
        _, x2, x3, x4, x5 = skips
        feats = [self.head_0(x5, cond, checkpointed)]
        blocks = [self.G_middle_0, self.G_middle_1, self.G_middle_2]
        for block, skip in zip(blocks, (x4, x3, x2)):
            feats.append(block(self.up(feats[-1]) + skip, cond, checkpointed))
        return [channel_normalize(f) for f in feats]


def _encode(layer: nn.Sequential, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """layer = (SpectralInstanceConv, ResidualBlock) applied to leaky_relu(x), with the convolution's
    ``spectral_weight`` given."""
    conv, residual = layer
    return residual(conv(leaky_relu(x), weight))
