"""Parity with the official CoCosNet (v1) code through model.official.from_official_v1.

Case A (the ADE20k command) is ../shared/fixtures/official_v1 (its README says how it was made); run_case checks
any other case made the same way.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from model import CoCosNet, ModelConfig
from model.official import config_from_official_v1, from_official_v1

pytestmark = pytest.mark.parity

REL_TOL = 1e-4  # the official code's own spread is ~1e-6 absolute (fixture README)
ONE_HOT_FREE_MODES = ("celebahqedge", "deepfashion")  # their preprocess_input passes the maps through


def official_inputs(case: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_semantics, ref image, ref_semantics) as the official preprocess_input builds them."""
    u8 = case["inputs"]["uint8"]
    for name, t in u8.items():
        assert hashlib.sha256(t.numpy().tobytes()).hexdigest() == case["inputs"]["sha256_uint8"][name], name
    opt = case["opt"]
    if opt["dataset_mode"] in ONE_HOT_FREE_MODES:
        maps = [u8[k].float().div(255) for k in ("label", "label_ref")]
    else:  # the official scatter_ of the class ids into semantic_nc channels
        maps = [torch.zeros(t.shape[0], opt["semantic_nc"], *t.shape[2:]).scatter_(1, t.long(), 1.0)
                for t in (u8["label"], u8["label_ref"])]
    return maps[0], u8["ref"].float().div(255).sub(0.5).div(0.5), maps[1]


def run_case(folder: Path, name: str) -> tuple[dict, object]:
    case = torch.load(folder / f"case_{name}.pt", weights_only=False)  # holds the option dict next to tensors
    weights = torch.load(folder / f"weights_{name}.pt", weights_only=False)
    net = from_official_v1(weights["netCorr"], weights["netG"], case["opt"])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the thread count the official outputs were recorded with
    try:
        with torch.no_grad():
            out = net(*official_inputs(case))
    finally:
        torch.set_num_threads(threads)
    return case, out


def relative_error(ours: torch.Tensor, official: torch.Tensor) -> float:
    assert ours.shape == official.shape
    return ((ours - official).abs().max() / official.abs().max()).item()


def assert_outputs_match(case: dict, out) -> None:
    official = case["outputs"]
    pairs = {"warp_out_lowres": out.warped[0], "warp_out": out.warped[-1], "fake_image": out.image}
    if "warp_mask" in official:
        pairs["warp_mask"] = out.warp_mask
    else:
        assert out.warp_mask is None
    errors = {name: relative_error(ours, official[name]) for name, ours in pairs.items()}
    assert max(errors.values()) <= REL_TOL, errors


@pytest.fixture(scope="module")
def case_a(official_v1_dir):
    return run_case(official_v1_dir, "a")


def test_case_a_matches_official(case_a):
    assert_outputs_match(*case_a)


def test_case_a_best_matches_are_the_official_top1(case_a):
    case, out = case_a
    m = out.matches[0]
    index = (m[:, 0] * m.shape[-1] + m[:, 1]).long().flatten(1)
    top1 = case["intermediates"]["corr"]["top1_index"].long()
    assert index.eq(top1).float().mean().item() >= 0.999


def test_case_a_converted_config(case_a):
    case, out = case_a
    cfg = config_from_official_v1(case["opt"])
    assert cfg == ModelConfig(version=1, image_size=(256, 256), label_nc=151, ngf=case["opt"]["ngf"],
                              warp_upsample="nearest", warp_mask=True, maskmix=True, attention=True)


COMMANDS = {  # the typed equivalents of the official README test commands (ngf 64)
    "ade20k": ModelConfig(version=1, label_nc=151),
    "celebahqedge": ModelConfig(version=1, label_nc=15, adaptor_kernel=4, warp_upsample="bilinear", warp_mask=False),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_parameter_counts_equal_official_full_widths(official_v1_dir, command):
    anchors = json.loads((official_v1_dir / "anchors.json").read_text())["full_width_param_counts"][command]
    with torch.device("meta"):  # counts only: no memory, no init time
        net = CoCosNet(COMMANDS[command])
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    for ours, name in ((net.corr, "netCorr"), (net.generator, "netG")):
        assert count(ours) == anchors[name]["total"], name
        for module, n in anchors[name]["by_top_level"].items():
            assert count(getattr(ours, module)) == n, f"{name}.{module}"
    expected = {"ade20k": (59_315_716, 96_664_260), "celebahqedge": (53_380_676, 92_590_788)}[command]
    assert (count(net.corr), count(net.generator)) == expected


def test_conversion_rejects_what_it_cannot_reproduce(official_v1_dir):
    case = torch.load(official_v1_dir / "case_a.pt", weights_only=False)
    weights = torch.load(official_v1_dir / "weights_a.pt", weights_only=False)
    opt = case["opt"]
    broken = {k: v for k, v in weights["netCorr"].items() if k != "layer.2.prelu.weight"}
    with pytest.raises(ValueError, match=r"missing .*corr\.layer\.2\.relu\.weight"):
        from_official_v1(broken, weights["netG"], opt)
    with pytest.raises(ValueError, match="noise_for_mask=True is not supported"):
        config_from_official_v1({**opt, "noise_for_mask": True})
    with pytest.raises(ValueError, match="CBN_intype 'mask'"):
        config_from_official_v1({**opt, "CBN_intype": "mask"})
    with pytest.raises(ValueError, match="CoCosNet-v2 options"):
        config_from_official_v1({**opt, "netCorr": "NoVGGHPM"})
    with pytest.raises(ValueError, match="only PONO"):
        config_from_official_v1({**opt, "PONO": False})
