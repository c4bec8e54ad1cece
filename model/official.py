"""Import official CoCosNet-v2 and CoCosNet (v1) checkpoints (netCorr + netG) into this project's model.

The module layout of ``CoCosNet`` mirrors the official ones, so conversion is a key prefix
(``corr.`` / ``generator.``; v1's correspondence trunk also renames its residual blocks) plus a
configuration derived from the official options.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from .cocosnet import CoCosNet
from .config import ModelConfig


def _need(opt: Mapping[str, Any], key: str) -> Any:
    if key not in opt:
        raise ValueError(f"official options lack {key!r}")
    return opt[key]


def _sizes(opt: Mapping[str, Any], image_size: tuple[int, int] | None) -> tuple[tuple[int, int], int]:
    """(image size: the given one, else the options' crop size and aspect ratio; input-map channels)."""
    label_nc = opt.get("semantic_nc") or int(_need(opt, "label_nc")) + int(bool(opt.get("contain_dontcare_label")))
    if image_size is None:
        crop = int(_need(opt, "crop_size"))
        image_size = (int(round(crop / float(opt.get("aspect_ratio", 1.0)))), crop)
    return image_size, int(label_nc)


def config_from_official(opt: Mapping[str, Any], image_size: tuple[int, int] | None = None) -> ModelConfig:
    """Translate the official option dict (``opt.txt``/``opt.pkl`` values) into a ModelConfig."""
    if _need(opt, "netCorr") != "NoVGGHPM":
        raise ValueError(f"only netCorr 'NoVGGHPM' (CoCosNet v2) is supported, got {opt['netCorr']!r}")
    if int(opt.get("match_kernel", 1)) != 1:
        raise ValueError(f"only match_kernel 1 is supported, got {opt['match_kernel']}")
    if not opt.get("PONO", False):
        raise ValueError("only PONO checkpoints are supported (every released CoCosNet-v2 model uses --PONO)")
    if "spectral" not in opt.get("norm_G", "spectral") or "spectral" not in opt.get("norm_E", "spectral"):
        raise ValueError("only spectral-normalised generators/adaptors are supported (norm_G/norm_E 'spectral...')")
    image_size, label_nc = _sizes(opt, image_size)
    return ModelConfig(
        image_size=image_size,
        label_nc=label_nc,
        nef=int(_need(opt, "nef")),
        ngf=int(_need(opt, "ngf")),
        ndf=int(opt.get("ndf", 64)),
        patchmatch_iters=int(_need(opt, "iteration_count")),
        temperature=float(_need(opt, "temperature")),
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
    return _load(net, state, "CoCosNet-v2")


def _load(net: CoCosNet, state: Mapping[str, torch.Tensor], what: str) -> CoCosNet:
    result = net.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"official checkpoint does not match the {what} architecture of its options: "
            f"missing {result.missing_keys[:8]}{'...' if len(result.missing_keys) > 8 else ''}, "
            f"unexpected {result.unexpected_keys[:8]}{'...' if len(result.unexpected_keys) > 8 else ''}"
        )
    return net.eval()


# ----------------------------------------------------------------------------- CoCosNet v1 (CVPR 2020)

# Options of the official v1 code that change the architecture or the inference forward in ways this port
# does not implement, with the value every released model uses.
_V1_FIXED = {"warp_stride": 4, "use_coordconv": False, "adaptor_res_deeper": False, "adaptor_se": False,
             "eqlr_sn": False, "mask_noise": False, "noise_for_mask": False}
# The official trunk's residual blocks name their layers; ours (shared with v2) index a Sequential, whose
# PReLU is also registered as `relu` (one parameter under two keys).
_V1_TRUNK_KEYS = {"conv1": ("model.1",), "conv2": ("model.5",), "prelu": ("relu", "model.3")}


def config_from_official_v1(opt: Mapping[str, Any], image_size: tuple[int, int] | None = None) -> ModelConfig:
    """Translate the official CoCosNet (v1) option dict (opt.txt/opt.pkl values) into a ModelConfig."""
    if "netCorr" in opt or "iteration_count" in opt:
        raise ValueError("these are CoCosNet-v2 options (netCorr/iteration_count); use from_official")
    for key, value in _V1_FIXED.items():
        if key in opt and opt[key] != value:
            raise ValueError(f"official option {key}={opt[key]!r} is not supported (the released models use {value!r})")
    if not opt.get("PONO", False):
        raise ValueError("only PONO checkpoints are supported (every released CoCosNet model uses --PONO)")
    if "spectral" not in opt.get("norm_G", "spectral") or opt.get("norm_E", "spectralinstance") != "spectralinstance":
        raise ValueError("only the released normalisations are supported (norm_G 'spectral...', norm_E "
                         "'spectralinstance')")
    if float(opt.get("weight_domainC", 0.0)) > 0 and not opt.get("domain_rela", False):
        raise ValueError("checkpoints with a domain classifier in netCorr (weight_domainC > 0) are not supported")
    generator_input = opt.get("CBN_intype", "warp_mask")
    if generator_input not in ("warp_mask", "warp"):
        raise ValueError(f"CBN_intype {generator_input!r} is not supported (warp_mask or warp)")
    image_size, label_nc = _sizes(opt, image_size)
    warp_upsample = "patch" if opt.get("warp_patch") else "bilinear" if opt.get("warp_bilinear") else "nearest"
    return ModelConfig(
        version=1,
        image_size=image_size,
        label_nc=label_nc,
        ngf=int(_need(opt, "ngf")),
        ndf=int(opt.get("ndf", 64)),
        temperature=0.01,  # the forward's default; no option sets it
        pono=True,
        pono_c=bool(opt.get("PONO_C", False)),
        adaptor_kernel=int(opt.get("adaptor_kernel", 3)),
        num_d=int(opt.get("num_D", 2)),
        n_layers_d=int(opt.get("n_layers_D", 4)),
        match_kernel=int(opt.get("match_kernel", 3)),
        maskmix=bool(opt.get("maskmix", False)),
        warp_upsample=warp_upsample,
        warp_mask=opt.get("warp_mask_losstype", "none") == "direct",
        adaptor_nonlocal=bool(opt.get("adaptor_nonlocal", False)),
        attention=bool(opt.get("use_attention", False)),
        generator_input=generator_input,
    )


def _v1_corr_key(key: str) -> list[str]:
    """Official v1 netCorr key -> this model's key(s) under ``corr.``."""
    parts = key.split(".")
    if parts[0] == "layer" and len(parts) == 4 and parts[2] in _V1_TRUNK_KEYS:
        return [f"corr.layer.{parts[1]}.{name}.{parts[3]}" for name in _V1_TRUNK_KEYS[parts[2]]]
    return [f"corr.{key}"]


def from_official_v1(corr_state: Mapping[str, torch.Tensor], g_state: Mapping[str, torch.Tensor],
                     opt: Mapping[str, Any], image_size: tuple[int, int] | None = None) -> CoCosNet:
    """Build a CoCosNet v1 (eval mode) from official CoCosNet netCorr/netG state dicts and their options.

    ``net(input_semantics, exemplar, exemplar_semantics)`` then takes the inputs the official
    ``preprocess_input`` builds (one-hot maps for ADE20k, the 15-channel maps / 255 for CelebA-HQ edge) and
    returns ``.image`` (the official ``fake_image``) and ``.warped`` ([0] the H/4 warp, [-1] ``warp_out``).
    ``image_size`` defaults to the options' crop size (256x256 for the released models).
    """
    net = CoCosNet(config_from_official_v1(opt, image_size))
    state = {new: v for k, v in _clean(corr_state, "netCorr").items() for new in _v1_corr_key(k)}
    state.update({f"generator.{k}": v for k, v in _clean(g_state, "netG").items()})
    return _load(net, state, "CoCosNet (v1)")
