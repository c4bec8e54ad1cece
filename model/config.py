"""Typed configuration of the CoCosNet model (one dataclass, no option objects)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

Correspondence = Literal["patchmatch", "global"]
Checkpointing = Literal["auto", "none", "iterations", "full"]
CHECKPOINTING = ("auto", "none", "iterations", "full")
# `auto` checkpoints in training from this image side up: below it the activations are small and
# recomputing them would only cost time.
AUTO_CHECKPOINT_MIN_SIDE = 256


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the correspondence network, the generator and the discriminator.

    Defaults are the official CoCosNet-v2 DeepFashionHD configuration, except the image size.
    """

    image_size: tuple[int, int] = (256, 256)  # (H, W), each a multiple of 32
    label_nc: int = 20  # channels of the input-domain map x_A (one-hot classes, edges, pose)
    nef: int = 32  # width of the domain adaptors (feature pyramid)
    ngf: int = 64  # width of the generator
    ndf: int = 64  # width of the discriminator
    correspondence: Correspondence = "patchmatch"  # "patchmatch" = v2, "global" = v1
    patchmatch_iters: int = 5
    search_window: int = 4  # per side; candidates = search_window ** 2
    search_dilation: int = 2
    temperature: float = 0.01
    pono: bool = True  # positional normalisation in every SPADE block
    pono_c: bool = True  # channel-wise centring of the matching features
    adaptor_kernel: int = 3  # kernel of the adaptors' strided convolutions (official featEnc_kernel)
    spade_hidden: int = 128
    num_d: int = 2  # discriminators in the multiscale PatchGAN
    n_layers_d: int = 4
    official_compat: bool = False  # reproduce the official forward exactly (integer PatchMatch)
    # Activation checkpointing in training (recompute in the backward pass instead of storing):
    # "iterations" = each PatchMatch iteration's GRU update, its initial layer and the final continuous
    # read; "full" = those plus the domain adaptors' layers and the generator's SPADE branches;
    # "auto" = "full" in training at >= 256 px (shorter image side), else "none". Losses and gradients
    # are the same either way (bit for bit on CPU); memory and time are not.
    checkpointing: Checkpointing = "auto"

    def __post_init__(self) -> None:
        h, w = self.image_size
        if h % 32 or w % 32 or h < 64 or w < 64:
            # The generator starts at H/32, where SPADE's reflection padding needs at least 2 pixels.
            raise ValueError(f"image_size must be multiples of 32 and at least 64, got {self.image_size}")
        if self.correspondence not in ("patchmatch", "global"):
            raise ValueError(f"correspondence must be 'patchmatch' or 'global', got {self.correspondence!r}")
        if self.label_nc < 1:
            raise ValueError(f"label_nc must be >= 1, got {self.label_nc}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.checkpointing not in CHECKPOINTING:
            raise ValueError(f"checkpointing must be one of {CHECKPOINTING}, got {self.checkpointing!r}")
        if self.patchmatch_iters < 1:
            raise ValueError(f"patchmatch_iters must be >= 1, got {self.patchmatch_iters}")
        object.__setattr__(self, "image_size", (int(h), int(w)))

    @property
    def num_candidates(self) -> int:
        return self.search_window**2

    @property
    def num_levels(self) -> int:
        """Pyramid levels used: H/8, H/4, H/2, H for v2; H/8, H/4 for v1 (matching at H/4)."""
        return 4 if self.correspondence == "patchmatch" else 2

    def checkpoint_levels(self, training: bool) -> tuple[bool, bool]:
        """(checkpoint the PatchMatch iterations, checkpoint the domain adaptors and the generator) when
        autograd records a graph; ``training`` (the module's mode) decides only for "auto"."""
        mode = self.checkpointing
        if mode == "auto":
            mode = "full" if training and min(self.image_size) >= AUTO_CHECKPOINT_MIN_SIDE else "none"
        return mode in ("iterations", "full"), mode == "full"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["image_size"] = list(self.image_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        d = dict(d)
        if "image_size" in d:
            d["image_size"] = tuple(d["image_size"])
        return cls(**d)
