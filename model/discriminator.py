"""Multiscale PatchGAN discriminator (pix2pixHD / SPADE), conditioned on the input-domain map.

Module names follow the official CoCosNet-v2 ``netD`` (``discriminator_{i}.model{n}...``, old-style
spectral norm with ``weight_orig``/``weight_u``/``weight_v``), so official checkpoints load after
dropping their unused ``dec.*`` keys.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.attention import SelfAttention
from model.config import ModelConfig
from model.layers import SpectralInstanceConv

_KERNEL = 4
_PADDING = 1  # the official int((4 - 1) / 2): outputs shrink by one pixel at stride 1
_MAX_CHANNELS = 512


def _leaky_relu() -> nn.LeakyReLU:
    return nn.LeakyReLU(0.2)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: (B, in_ch, H, W) -> intermediate features, the last one a (B, 1, h, w) map.

    ``n_layers`` convolutions before the prediction; all but the last stride 2. The first and the
    prediction convolutions are plain (with bias), the middle ones spectral + instance norm.
    ``attention`` (CoCosNet v1's --use_attention) adds self-attention before the last intermediate stage.
    """

    def __init__(self, in_channels: int, ndf: int = 64, n_layers: int = 4, attention: bool = False):
        super().__init__()
        if n_layers < 1 or (attention and n_layers < 2):
            raise ValueError(f"n_layers must be >= 1 (>= 2 with attention), got {n_layers}")
        stages: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(in_channels, ndf, _KERNEL, stride=2, padding=_PADDING), _leaky_relu())
        ]
        channels = ndf
        for n in range(1, n_layers):
            out_channels = min(channels * 2, _MAX_CHANNELS)
            # The last intermediate layer keeps the resolution: a larger receptive field per patch.
            stride = 1 if n == n_layers - 1 else 2
            if attention and n == n_layers - 1:
                self.attn = SelfAttention(channels)
            conv = SpectralInstanceConv(channels, out_channels, _KERNEL, stride, _PADDING)
            stages.append(nn.Sequential(conv, _leaky_relu()))
            channels = out_channels
        stages.append(nn.Sequential(nn.Conv2d(channels, 1, _KERNEL, stride=1, padding=_PADDING)))
        self.num_stages = len(stages)
        self.attention_stage = n_layers - 1 if attention else None
        for n, stage in enumerate(stages):
            self.add_module(f"model{n}", stage)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for n in range(self.num_stages):
            if n == self.attention_stage:
                x = self.attn(x)
            x = getattr(self, f"model{n}")(x)
            features.append(x)
        return features


class MultiscaleDiscriminator(nn.Module):
    """``cfg.num_d`` PatchGANs; discriminator i sees the input downsampled i times by 2.

    Input: cat(input map (B, label_nc, H, W), image (B, 3, H, W)). CoCosNet v1 with ``cfg.attention``
    adds self-attention to each PatchGAN, as the official v1 netD does.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.num_d < 1:
            raise ValueError(f"num_d must be >= 1, got {cfg.num_d}")
        self.num_d = cfg.num_d
        attention = cfg.version == 1 and cfg.attention
        for i in range(cfg.num_d):
            self.add_module(f"discriminator_{i}",
                            NLayerDiscriminator(cfg.label_nc + 3, cfg.ndf, cfg.n_layers_d, attention))

    @staticmethod
    def downsample(x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2)); border averages exclude the padding."""
        return F.avg_pool2d(x, kernel_size=3, stride=2, padding=1, count_include_pad=False)

    def forward(self, input_map: torch.Tensor, image: torch.Tensor) -> list[list[torch.Tensor]]:
        """Per discriminator (finest first), its intermediate features; the last is the prediction."""
        x = torch.cat([input_map, image], dim=1)
        outputs = []
        for i in range(self.num_d):
            if i > 0:
                x = self.downsample(x)
            outputs.append(getattr(self, f"discriminator_{i}")(x))
        return outputs
