"""Import official CoCosNet-v2 checkpoints (netCorr + netG) into this project's model.

The module layout of ``CoCosNet`` mirrors the official one, so conversion is a key prefix
(``corr.`` / ``generator.``) plus a configuration derived from the official options.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from .cocosnet import CoCosNet
from .config import ModelConfig


def config_from_official(opt: Mapping[str, Any], image_size: tuple[int, int] | None = None) -> ModelConfig:
    """Translate the official option dict (``opt.txt``/``opt.pkl`` values) into a ModelConfig."""
    def need(key):
        if key not in opt:
            raise ValueError(f"official options lack {key!r}")
        return opt[key]

    if need("netCorr") != "NoVGGHPM":
        raise ValueError(f"only netCorr 'NoVGGHPM' (CoCosNet v2) is supported, got {opt['netCorr']!r}")
    if int(opt.get("match_kernel", 1)) != 1:
        raise ValueError(f"only match_kernel 1 is supported, got {opt['match_kernel']}")
    if not opt.get("PONO", False):
        raise ValueError("only PONO checkpoints are supported (every released CoCosNet-v2 model uses --PONO)")
    if "spectral" not in opt.get("norm_G", "spectral") or "spectral" not in opt.get("norm_E", "spectral"):
        raise ValueError("only spectral-normalised generators/adaptors are supported (norm_G/norm_E 'spectral...')")
    label_nc = opt.get("semantic_nc") or int(need("label_nc")) + int(bool(opt.get("contain_dontcare_label")))
    if image_size is None:
        crop = int(need("crop_size"))
        image_size = (int(round(crop / float(opt.get("aspect_ratio", 1.0)))), crop)
    return ModelConfig(
        image_size=image_size,
        label_nc=int(label_nc),
        nef=int(need("nef")),
        ngf=int(need("ngf")),
        ndf=int(opt.get("ndf", 64)),
        correspondence="patchmatch",
        patchmatch_iters=int(need("iteration_count")),
        temperature=float(need("temperature")),
        pono=True,
        pono_c=bool(opt.get("PONO_C", False)),
        adaptor_kernel=int(opt.get("featEnc_kernel", 3)),
        num_d=int(opt.get("num_D", 2)),
        n_layers_d=int(opt.get("n_layers_D", 4)),
        official_compat=True,
    )


def _clean(state: Mapping[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{what}: entry {key!r} is a {type(value).__name__}, not a tensor")
        key = key[len("module."):] if key.startswith("module.") else key  # DataParallel checkpoints
        out[key] = value.float() if value.is_floating_point() else value
    return out


def from_official(corr_state: Mapping[str, torch.Tensor], g_state: Mapping[str, torch.Tensor],
                  opt: Mapping[str, Any], image_size: tuple[int, int] | None = None) -> CoCosNet:
    """Build a CoCosNet (``official_compat=True``, eval mode) from official netCorr/netG state dicts.

    ``image_size`` defaults to the options' crop size (512x512 for the released models); any
    multiple of 32 works because every layer is convolutional.
    """
    net = CoCosNet(config_from_official(opt, image_size))
    state = {f"corr.{k}": v for k, v in _clean(corr_state, "netCorr").items()}
    state.update({f"generator.{k}": v for k, v in _clean(g_state, "netG").items()})
    result = net.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            "official checkpoint does not match the CoCosNet-v2 architecture of its options: "
            f"missing {result.missing_keys[:8]}{'...' if len(result.missing_keys) > 8 else ''}, "
            f"unexpected {result.unexpected_keys[:8]}{'...' if len(result.unexpected_keys) > 8 else ''}"
        )
    return net.eval()
