"""CoCosNet: exemplar-based translation = correspondence (warp the exemplar) + generator."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .config import ModelConfig
from .correspondence import Correspondence
from .generator import SPADEGenerator
from .layers import init_xavier
from .v1 import CorrespondenceV1, GeneratorV1


@dataclass
class CoCosNetOutput:
    image: torch.Tensor  # (B, 3, H, W) in [-1, 1]
    warped: list[torch.Tensor]  # coarse -> fine (B, 3, h, w)
    matches: list[torch.Tensor]  # coarse -> fine (B, 2, h, w): exemplar (row, col) of each pixel's best match
    cycle: torch.Tensor | None  # (B, 3, h0, w0) exemplar -> input -> exemplar (training only)
    candidates: list[torch.Tensor]  # per PatchMatch level (B, h*w, K) flat candidate indices
    domain_features: list[tuple[torch.Tensor, torch.Tensor]] | None  # L_domain pairs, when a target is given
    warp_mask: torch.Tensor | None = None  # v1: (B, label_nc, H/4, W/4) the exemplar map warped
    matching: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # v2: per level (query, key) unit features


def activation_layout(setting: str, device: torch.device) -> torch.memory_format:
    """The memory format of ``ModelConfig.memory_format`` on ``device`` ("auto": channels-last on AVX-512 CPUs)."""
    if setting == "auto":
        avx512 = device.type == "cpu" and "AVX512" in torch.backends.cpu.get_cpu_capability()
        setting = "channels_last" if avx512 else "contiguous"
    return torch.channels_last if setting == "channels_last" else torch.contiguous_format


class CoCosNet(nn.Module):
    """Holds the correspondence network and the generator (discriminator and VGG live beside it):
    CoCosNet v2 by default, CoCosNet v1 (model/v1/) for ``cfg.version == 1``."""

    def __init__(self, cfg: ModelConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or ModelConfig()
        if cfg.version == 1:
            self.corr = CorrespondenceV1(cfg)
            self.generator = GeneratorV1(cfg.image_size, cfg.label_nc, cfg.ngf, cfg.spade_hidden, cfg.pono,
                                         cfg.generator_input == "warp_mask", cfg.attention)
        else:
            self.corr = Correspondence(cfg)
            self.generator = SPADEGenerator(cfg.image_size, cfg.label_nc, 4, cfg.ngf, cfg.spade_hidden, cfg.pono,
                                            cfg.warp_residual)
        init_xavier(self)

    def correspondence(self, input_map: torch.Tensor, exemplar: torch.Tensor, exemplar_map: torch.Tensor,
                       target: torch.Tensor | None = None):
        self._check_inputs(input_map, exemplar, exemplar_map)
        input_map, exemplar, exemplar_map = map(self._layout, (input_map, exemplar, exemplar_map))
        return self.corr(input_map, exemplar, exemplar_map, None if target is None else self._layout(target))

    def generate(self, input_map: torch.Tensor, warped: list[torch.Tensor]) -> torch.Tensor:
        checkpointed = torch.is_grad_enabled() and self.cfg.checkpoint_levels(self.training)[1]
        return self.generator(self._layout(input_map), warped, checkpointed)

    def forward(self, input_map: torch.Tensor, exemplar: torch.Tensor, exemplar_map: torch.Tensor,
                target: torch.Tensor | None = None) -> CoCosNetOutput:
        """input_map (B, label_nc, H, W), exemplar (B, 3, H, W) in [-1, 1], exemplar_map like input_map;
        target (x_B, optional) adds the domain-alignment feature pairs used by L_domain."""
        corr = self.correspondence(input_map, exemplar, exemplar_map, target)
        image = self.generate(input_map, corr.warped)
        return CoCosNetOutput(image, corr.warped, corr.matches, corr.cycle, corr.candidates, corr.domain_features,
                              getattr(corr, "warp_mask", None), getattr(corr, "matching", None))

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the activations' layout: every convolution downstream keeps its input's. (A one-hot map made
        as ``F.one_hot(ids).permute(0, 3, 1, 2)`` is channels-last whatever the setting.)"""
        return x.contiguous(memory_format=activation_layout(self.cfg.memory_format, x.device))

    def _check_inputs(self, input_map, exemplar, exemplar_map) -> None:
        h, w = self.cfg.image_size
        expected = {"input_map": self.cfg.label_nc, "exemplar": 3, "exemplar_map": self.cfg.label_nc}
        for name, t in zip(expected, (input_map, exemplar, exemplar_map)):
            if t.dim() != 4 or t.shape[1] != expected[name] or tuple(t.shape[-2:]) != (h, w):
                raise ValueError(f"{name} must be (B, {expected[name]}, {h}, {w}), got {tuple(t.shape)}")
