"""Typed configuration of the CoCosNet model (one dataclass, no option objects)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, get_args

WarpUpsample = Literal["nearest", "bilinear", "patch"]
GeneratorInput = Literal["warp_mask", "warp"]
Checkpointing = Literal["auto", "none", "iterations", "full"]
MotionGrad = Literal["last", "all"]
MemoryFormat = Literal["auto", "contiguous", "channels_last"]
# `auto` checkpoints in training from this image side up: below it the activations are small and
# recomputing them would only cost time.
AUTO_CHECKPOINT_MIN_SIDE = 256


POSITIVE_FIELDS = ("nef", "ngf", "ndf", "spade_hidden", "num_d", "n_layers_d", "search_window", "search_dilation",
                   "adaptor_kernel", "match_channels")


def check_image_size(size: tuple[int, int]) -> tuple[int, int]:
    """(H, W) the model takes, else ValueError: both multiples of 32 and at least 64."""
    h, w = size
    if h % 32 or w % 32 or h < 64 or w < 64:
        # The generator starts at H/32, where SPADE's reflection padding needs at least 2 pixels.
        raise ValueError(f"image_size must be multiples of 32 and at least 64, got {tuple(size)}")
    return h, w


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the correspondence network, the generator and the discriminator.

    Defaults are the official CoCosNet-v2 DeepFashionHD configuration, except the image size.
    ``version=1`` builds CoCosNet v1 (model/v1/); its own fields (at the end) default to the official
    ADE20k command, and ``ngf`` sets every width of it, as in the official code.
    """

    image_size: tuple[int, int] = (256, 256)  # (H, W), each a multiple of 32
    label_nc: int = 20  # channels of the input-domain map x_A (one-hot classes, edges, pose)
    nef: int = 32  # width of the domain adaptors (feature pyramid); v2 only
    ngf: int = 64  # width of the generator
    ndf: int = 64  # width of the discriminator
    version: int = 2  # 2: CoCosNet v2 (CVPR 2021, PatchMatch); 1: CoCosNet (CVPR 2020, full attention at H/4)
    patchmatch_iters: int = 5
    # Not official (the official GRU gets no gradient at all): through how many of its last PatchMatch
    # iterations the GRU is trained. None = all: backpropagation through every iteration's hidden state, which
    # also trains the GRU's initial layer. n = the last n, the earlier iterations run without a graph (1: the
    # last update, the only one the final candidates depend on differentiably); 0 = none. At 512 px, 1 cost
    # 0.80x the correspondence's training time of full backpropagation and 0.66 GiB less, but learned worse warps
    # in short runs (benchmarks/README.md, "Side by side with the official code"). v2 only.
    gru_grad_iters: int | None = None
    # Not official: which of those iterations train the GRU's motion encoder. "last": the last update only; the
    # earlier ones train its recurrence alone, their motion features entering it as constants (at 512 px 0.87x the
    # correspondence's training time with "all", and no worse warps in two seeds: benchmarks/README.md). "all":
    # every one, full backpropagation through time. v2 only.
    gru_motion_grad: MotionGrad = "last"
    search_window: int = 4  # per side; candidates = search_window ** 2
    search_dilation: int = 2
    temperature: float = 0.01
    pono: bool = True  # positional normalisation in every SPADE block
    pono_c: bool = True  # channel-wise centring of the matching features
    adaptor_kernel: int = 3  # kernel of the adaptors' strided convolutions (official featEnc_kernel)
    spade_hidden: int = 128
    num_d: int = 2  # discriminators in the multiscale PatchGAN
    n_layers_d: int = 4
    official_compat: bool = False  # reproduce the official forward exactly (integer PatchMatch); v2 only
    # Not official: the generator corrects its finest warp, tanh(atanh(warp) + G), instead of drawing the image
    # from its SPADE features alone; the warp's detail then reaches the output without being learned. v2 only.
    warp_residual: bool = False
    # Activation checkpointing in training (recompute in the backward pass instead of storing):
    # "iterations" = each PatchMatch iteration's GRU update, its initial layer and the final continuous
    # read; "full" = those plus the domain adaptors' layers and the generator's SPADE branches;
    # "auto" = "full" in training at >= 256 px (shorter image side), else "none". Losses and gradients
    # are the same either way (bit for bit on CPU); memory and time are not.
    checkpointing: Checkpointing = "auto"
    # Layout of the activations: the model lays its inputs out so, and every convolution keeps it. On the CPU,
    # oneDNN's convolutions ran 1.3-2x faster (forward + backward) in "channels_last" on an AVX-512 Xeon, but the
    # weight gradient ~4.5x slower on an earlier VM's CPU; "auto" = "channels_last" on CPUs with AVX-512, else
    # "contiguous" (NCHW). Results are the same up to float rounding.
    memory_format: MemoryFormat = "auto"
    # --- CoCosNet v1 only (the official option in brackets)
    match_kernel: int = 3  # [--match_kernel] side of the feature patches the correlation compares
    match_channels: int = 256  # width of the theta/phi matching features (official inter_channels)
    maskmix: bool = True  # [--maskmix] the maps join the adaptor features in the correspondence trunk
    warp_upsample: WarpUpsample = "nearest"  # H/4 warp -> H: nearest, bilinear [--warp_bilinear], patch [--warp_patch]
    warp_mask: bool = True  # [--warp_mask_losstype direct] also warp the exemplar map (warp-mask loss)
    adaptor_nonlocal: bool = False  # [--adaptor_nonlocal] self-attention in the domain adaptors
    attention: bool = True  # [--use_attention] self-attention in the generator and the discriminator
    generator_input: GeneratorInput = "warp_mask"  # [--CBN_intype] SPADE condition: warp + input map, or the warp

    def __post_init__(self) -> None:
        h, w = check_image_size(self.image_size)
        for name in POSITIVE_FIELDS:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.version not in (1, 2):
            raise ValueError(f"version must be 1 (CoCosNet) or 2 (CoCosNet v2), got {self.version!r}")
        if self.label_nc < 1:
            raise ValueError(f"label_nc must be >= 1, got {self.label_nc}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.checkpointing not in get_args(Checkpointing):
            raise ValueError(f"checkpointing must be one of {get_args(Checkpointing)}, got {self.checkpointing!r}")
        if self.memory_format not in get_args(MemoryFormat):
            raise ValueError(f"memory_format must be one of {get_args(MemoryFormat)}, got {self.memory_format!r}")
        if self.patchmatch_iters < 1:
            raise ValueError(f"patchmatch_iters must be >= 1, got {self.patchmatch_iters}")
        if self.gru_grad_iters is not None and self.gru_grad_iters < 0:
            raise ValueError(f"gru_grad_iters must be None (all iterations) or >= 0, got {self.gru_grad_iters}")
        if self.gru_motion_grad not in get_args(MotionGrad):
            raise ValueError(f"gru_motion_grad must be one of {get_args(MotionGrad)}, got {self.gru_motion_grad!r}")
        if self.match_kernel < 1 or self.match_kernel % 2 == 0:
            raise ValueError(f"match_kernel must be odd and >= 1, got {self.match_kernel}")
        if self.warp_upsample not in ("nearest", "bilinear", "patch"):
            raise ValueError(f"warp_upsample must be 'nearest', 'bilinear' or 'patch', got {self.warp_upsample!r}")
        if self.generator_input not in ("warp_mask", "warp"):
            raise ValueError(f"generator_input must be 'warp_mask' or 'warp', got {self.generator_input!r}")
        if self.warp_residual and self.version != 2:
            raise ValueError("warp_residual is a v2 option (the v1 generator draws the image)")
        object.__setattr__(self, "image_size", (int(h), int(w)))

    @property
    def num_candidates(self) -> int:
        return self.search_window**2

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
        known = {f.name for f in dataclasses.fields(cls)} | {"correspondence"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        d = dict(d)
        legacy = d.pop("correspondence", "patchmatch")  # model_config.json written before `version` existed
        if legacy != "patchmatch":
            raise ValueError(f"correspondence {legacy!r} was removed (it was a v2 ablation, not v1); "
                             "CoCosNet v1 is version: 1")
        if "image_size" in d:
            d["image_size"] = tuple(d["image_size"])
        return cls(**d)
