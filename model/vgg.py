"""Frozen VGG19 feature extractor for the perceptual, feature-matching and contextual losses.

Two weight conventions exist and they expect different inputs:

* ``"caffe"``: the official CoCosNet ``vgg19_conv.pth`` (Gatys' port of the Caffe VGG19, keys
  ``conv1_1.weight`` ...). Input is BGR in [0, 255] minus the Caffe channel means, no std
  division (the official ``vgg_preprocess`` with ``vgg_normal_correct=True``).
* ``"torchvision"``: torchvision's ImageNet VGG19 (keys ``features.0.weight`` ...). Input is RGB
  in [0, 1], normalised by the ImageNet mean and std.

Both take images in [-1, 1]; :func:`load_vgg19` picks the convention that matches the weights.
"""
from __future__ import annotations

import os
import re
import warnings
from typing import Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

Preprocess = Literal["caffe", "torchvision"]

IMAGENET_URL = "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"

# Convolutions per block and their widths (VGG19 configuration "E").
_BLOCKS: tuple[tuple[int, int], ...] = ((2, 64), (2, 128), (4, 256), (4, 512), (4, 512))
CONV_NAMES: tuple[str, ...] = tuple(
    f"conv{b}_{i}" for b, (n, _) in enumerate(_BLOCKS, start=1) for i in range(1, n + 1)
)
RELU_NAMES: tuple[str, ...] = tuple(name.replace("conv", "r").replace("_", "") for name in CONV_NAMES)
# Index of each convolution inside torchvision's ``features`` Sequential (ReLUs and pools between).
TORCHVISION_INDICES: tuple[int, ...] = (0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34)

# Caffe means in BGR order, as fractions of 255 (103.939, 116.779, 123.68).
_CAFFE_MEAN_BGR = (0.40760392, 0.45795686, 0.48501961)
_IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
_IMAGENET_STD_RGB = (0.229, 0.224, 0.225)


class VGG19(nn.Module):
    """The 16 convolutions of VGG19 with max pooling; returns ReLU activations by name.

    Layer names: ``r{block}{index}`` is the ReLU after ``conv{block}_{index}``, e.g. ``r42``.
    Parameter names are exactly the official ``vgg19_conv.pth`` keys.
    """

    def __init__(self, preprocess: Preprocess = "caffe"):
        super().__init__()
        if preprocess not in ("caffe", "torchvision"):
            raise ValueError(f"preprocess must be 'caffe' or 'torchvision', got {preprocess!r}")
        self.preprocess = preprocess
        in_ch = 3
        for b, (n, width) in enumerate(_BLOCKS, start=1):
            for i in range(1, n + 1):
                self.add_module(f"conv{b}_{i}", nn.Conv2d(in_ch, width, kernel_size=3, padding=1))
                in_ch = width

        # Preprocessing as (x01[channel_order] - mean) * scale; non-persistent so that the
        # state dict holds exactly the convolution weights.
        if preprocess == "caffe":
            order, mean, scale = (2, 1, 0), _CAFFE_MEAN_BGR, (255.0,) * 3
        else:
            order, mean, scale = (0, 1, 2), _IMAGENET_MEAN_RGB, tuple(1.0 / s for s in _IMAGENET_STD_RGB)
        self._channel_order = order
        self.register_buffer("input_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_scale", torch.tensor(scale).view(1, 3, 1, 1), persistent=False)

    def normalize_input(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [-1, 1] -> (B, 3, H, W) in the convention of the weights."""
        x01 = (image + 1) / 2
        x01 = x01[:, list(self._channel_order)]
        return (x01 - self.input_mean.to(x01.dtype)) * self.input_scale.to(x01.dtype)

    def forward(
        self, image: torch.Tensor, layers: Sequence[str] = ("r12", "r22", "r32", "r42", "r52")
    ) -> list[torch.Tensor]:
        """(B, 3, H, W) RGB in [-1, 1] -> ReLU outputs in the order of ``layers``.

        ``r{b}{i}`` has shape (B, C_b, H / 2**(b-1), W / 2**(b-1)). Only the layers up to the
        deepest requested one are computed.
        """
        unknown = [name for name in layers if name not in RELU_NAMES]
        if unknown:
            raise ValueError(f"unknown VGG19 layers {unknown}; choose from {list(RELU_NAMES)}")
        wanted = set(layers)
        found: dict[str, torch.Tensor] = {}
        x = self.normalize_input(image)
        for b, (n, _) in enumerate(_BLOCKS, start=1):
            if b > 1:
                x = F.max_pool2d(x, kernel_size=2, stride=2)
            for i in range(1, n + 1):
                x = F.relu(getattr(self, f"conv{b}_{i}")(x))
                name = f"r{b}{i}"
                if name in wanted:
                    found[name] = x
                    if len(found) == len(wanted):
                        return [found[name] for name in layers]
        return [found[name] for name in layers]


def _torchvision_to_official(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    index_to_name = dict(zip(TORCHVISION_INDICES, CONV_NAMES))
    converted: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in state.items():
        if key.startswith("classifier."):
            continue  # the fully connected head is not used for features
        match = re.fullmatch(r"features\.(\d+)\.(weight|bias)", key)
        if match is None or int(match.group(1)) not in index_to_name:
            unexpected.append(key)
            continue
        converted[f"{index_to_name[int(match.group(1))]}.{match.group(2)}"] = value
    if unexpected:
        raise ValueError(
            f"VGG19 weights {source}: unexpected keys for a torchvision VGG19 (batch-norm variant?): "
            f"{sorted(unexpected)[:8]}"
        )
    return converted


def _check_state(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], source: str) -> None:
    missing = [k for k in reference if k not in state]
    unexpected = [k for k in state if k not in reference]
    if missing or unexpected:
        raise ValueError(f"VGG19 weights {source}: missing keys {missing}, unexpected keys {unexpected}")
    wrong = [
        f"{k}: expected {tuple(reference[k].shape)}, got {tuple(state[k].shape)}"
        for k in reference
        if not isinstance(state[k], torch.Tensor) or state[k].shape != reference[k].shape
    ]
    if wrong:
        raise ValueError(f"VGG19 weights {source}: wrong shapes: {'; '.join(wrong)}")


def _detect_format(state: dict, source: str) -> Preprocess:
    keys = [k for k in state if isinstance(k, str)]
    if any(k.startswith("features.") for k in keys):
        return "torchvision"
    if any(re.fullmatch(r"conv\d_\d\.(weight|bias)", k) for k in keys):
        return "caffe"
    raise ValueError(
        f"VGG19 weights {source}: neither torchvision keys (features.N.weight) nor official "
        f"vgg19_conv.pth keys (conv1_1.weight); found {keys[:8]}"
    )


def vgg19_from_state_dict(
    state: dict[str, torch.Tensor], source: str = "<state dict>", preprocess: Preprocess | None = None
) -> VGG19:
    """Build a frozen VGG19 from a torchvision- or official-format state dict.

    ``preprocess=None`` uses the convention the weights were trained with ("torchvision" for
    torchvision keys, "caffe" for official keys).
    """
    if not isinstance(state, dict):
        raise ValueError(f"VGG19 weights {source}: expected a state dict, got {type(state).__name__}")
    detected = _detect_format(state, source)
    if detected == "torchvision":
        state = _torchvision_to_official(state, source)
    vgg = VGG19(preprocess=preprocess or detected)
    _check_state(state, vgg.state_dict(), source)
    vgg.load_state_dict(state)
    return _freeze(vgg)


def load_vgg19(weights: str, seed: int = 0, preprocess: Preprocess | None = None) -> VGG19:
    """A frozen (eval, no grad) VGG19 from ``weights``.

    ``weights``: a path to a torchvision-format or official ``vgg19_conv.pth`` file,
    ``"imagenet"`` (torchvision's weights through the torch.hub cache), or ``"random"``
    (seeded initialisation; the losses built on it do not measure image quality).
    ``preprocess`` overrides the input convention chosen from the weights.
    """
    if weights == "random":
        warnings.warn(
            "VGG19 has RANDOM weights: perceptual, feature-matching and contextual losses are "
            "meaningless for image quality. Pass a vgg19_conv.pth / torchvision file or 'imagenet'.",
            UserWarning,
            stacklevel=2,
        )
        return _freeze(_random_vgg19(seed, preprocess or "caffe"))
    if weights == "imagenet":
        state = torch.hub.load_state_dict_from_url(
            IMAGENET_URL, map_location="cpu", check_hash=True, weights_only=True
        )
        return vgg19_from_state_dict(state, IMAGENET_URL, preprocess)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"VGG19 weights file not found: {weights}")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors have many types; all mean "not a weights file"
        raise ValueError(f"VGG19 weights {weights}: cannot be read as a torch state dict ({err})") from err
    return vgg19_from_state_dict(state, weights, preprocess)


def _random_vgg19(seed: int, preprocess: Preprocess) -> VGG19:
    # A local generator keeps the global RNG untouched and makes the weights a function of seed.
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the default init inside VGG19() draws from it
        vgg = VGG19(preprocess=preprocess)
    with torch.no_grad():
        for name in CONV_NAMES:
            conv = getattr(vgg, name)
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu", generator=generator)
            conv.bias.zero_()
    return vgg


def _freeze(vgg: VGG19) -> VGG19:
    vgg.eval()
    vgg.requires_grad_(False)
    return vgg
