"""Multiscale PatchGAN discriminator: structure, parameter count, gradients."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from model.config import ModelConfig
from model.discriminator import MultiscaleDiscriminator


def _small() -> tuple[MultiscaleDiscriminator, torch.Tensor, torch.Tensor]:
    d = MultiscaleDiscriminator(ModelConfig(image_size=(64, 64), label_nc=3, ndf=8, num_d=2, n_layers_d=4))
    return d, torch.randn(2, 3, 64, 64), torch.rand(2, 3, 64, 64) * 2 - 1


def test_output_structure():
    d, input_map, image = _small()
    out = d(input_map, image)
    assert len(out) == 2
    # kw 4, padding 1: stride 2 halves, stride 1 shrinks by one pixel.
    assert [tuple(f.shape) for f in out[0]] == [
        (2, 8, 32, 32), (2, 16, 16, 16), (2, 32, 8, 8), (2, 64, 7, 7), (2, 1, 6, 6)
    ]
    assert [tuple(f.shape) for f in out[1]] == [
        (2, 8, 16, 16), (2, 16, 8, 8), (2, 32, 4, 4), (2, 64, 3, 3), (2, 1, 2, 2)
    ]


def test_channels_are_capped_at_512():
    d = MultiscaleDiscriminator(ModelConfig(label_nc=1, ndf=256, num_d=1, n_layers_d=3))
    out = d(torch.zeros(1, 1, 64, 64), torch.zeros(1, 3, 64, 64))
    assert [f.shape[1] for f in out[0]] == [256, 512, 512, 1]


def test_parameter_count_is_official_minus_unused_decoder():
    d = MultiscaleDiscriminator(ModelConfig(label_nc=20, ndf=64, num_d=2, n_layers_d=4))
    per_d = [sum(p.numel() for p in getattr(d, f"discriminator_{i}").parameters()) for i in range(2)]
    assert per_d == [3_177_173 - 392_852] * 2


def test_official_checkpoint_layout():
    d, _, _ = _small()
    keys = set(d.state_dict())
    assert {"discriminator_0.model0.0.weight", "discriminator_0.model0.0.bias"} <= keys
    assert {"discriminator_1.model2.0.0.weight_orig", "discriminator_1.model2.0.0.weight_u",
            "discriminator_1.model2.0.0.weight_v"} <= keys
    assert "discriminator_0.model1.0.0.bias" not in keys  # cancelled by the instance norm
    assert {"discriminator_0.model4.0.weight", "discriminator_0.model4.0.bias"} <= keys
    assert not any("dec" in k for k in keys)


def official_downsample_nullspace(size: int, generator: torch.Generator) -> torch.Tensor:
    """A (size, size) pattern that the official multiscale downsampling (3x3 average, stride 2, padding not counted)
    maps to zero: a random image minus its projection onto the row space of that linear map."""
    basis = torch.eye(size * size).view(-1, 1, size, size)
    operator = F.avg_pool2d(basis, 3, stride=2, padding=1, count_include_pad=False).flatten(1).T  # (out, in)
    pattern = torch.randn(size * size, generator=generator, dtype=torch.float64)
    operator = operator.double()
    pattern -= operator.T @ torch.linalg.solve(operator @ operator.T, operator @ pattern)
    return pattern.float().view(size, size)


def test_the_coarse_discriminator_judges_only_the_half_resolution_image():
    """Any change that the half-resolution view does not show leaves the coarse verdict as it was; the fine
    discriminator sees it."""
    d, input_map, image = _small()
    d.eval()  # no power iteration: repeated forwards are identical
    invisible = official_downsample_nullspace(64, torch.Generator().manual_seed(0))
    assert invisible.std() > 0.5  # a strong change at full resolution
    changed = image + invisible
    before, after = d(input_map, image), d(input_map, changed)
    for a, b in zip(before[1], after[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    assert (before[0][-1] - after[0][-1]).abs().max() > 1e-2


def test_downsample_excludes_padding():
    x = torch.full((1, 2, 9, 9), 3.0)
    y = MultiscaleDiscriminator.downsample(x)
    assert y.shape == (1, 2, 5, 5)
    torch.testing.assert_close(y, torch.full_like(y, 3.0))  # with padding counted, borders would be < 3


def test_gradient_reaches_every_parameter_and_the_image():
    d, input_map, image = _small()
    image.requires_grad_(True)
    out = d(input_map, image)
    sum(f[-1].mean() for f in out).backward()
    for name, p in d.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert image.grad is not None and image.grad.abs().sum() > 0


def test_v1_attention_sits_before_the_last_intermediate_stage():
    cfg = ModelConfig(version=1, image_size=(64, 64), label_nc=3, ndf=8, num_d=2, n_layers_d=4)
    d = MultiscaleDiscriminator(cfg)
    plain = MultiscaleDiscriminator(dataclasses.replace(cfg, attention=False))
    assert not hasattr(plain.discriminator_0, "attn") and d.discriminator_0.attn.theta.in_channels == 32
    plain.load_state_dict(d.state_dict(), strict=False)  # same weights apart from the attention
    input_map, image = torch.randn(2, 3, 64, 64), torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert all(torch.equal(a, b) for da, db in zip(d(input_map, image), plain(input_map, image))
                   for a, b in zip(da, db))  # gamma starts at 0
        d.discriminator_0.attn.gamma.fill_(1.0)
        out, ref = d(input_map, image)[0], plain(input_map, image)[0]
    assert [f.shape for f in out] == [f.shape for f in ref]
    assert torch.equal(out[2], ref[2]) and not torch.equal(out[3], ref[3])
