"""Shapes, gradients and behaviour of CoCosNet v1 (model/v1, CPU, small widths)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model import CoCosNet, ModelConfig
from model.attention import SelfAttention
from model.v1.correspondence import attend, best_match, patch_features, warp_patches
from tests.test_model import LABEL_NC, inputs


def v1_config(size, **kw) -> ModelConfig:
    return ModelConfig(version=1, image_size=size, label_nc=LABEL_NC, ngf=8, spade_hidden=16, match_channels=32, **kw)


@pytest.mark.parametrize("size, upsample", [((64, 64), "nearest"), ((128, 96), "bilinear"), ((64, 96), "patch")])
def test_forward_backward_shapes(size, upsample):
    net = CoCosNet(v1_config(size, warp_upsample=upsample)).train()
    x_a, y_b, y_a, x_b = inputs(size, b=2)
    out = net(x_a, y_b, y_a, target=x_b)
    (h, w), quarter = size, (2, 3, size[0] // 4, size[1] // 4)
    assert out.image.shape == (2, 3, h, w) and out.image.abs().max() <= 1
    assert [tuple(t.shape) for t in out.warped] == [quarter, (2, 3, h, w)]
    assert [tuple(m.shape) for m in out.matches] == [(2, 2, h // 4, w // 4)]
    assert out.warp_mask.shape == (2, LABEL_NC, h // 4, w // 4)
    assert out.cycle.shape == (out.warped[-1] if upsample == "patch" else out.warped[0]).shape
    assert [tuple(f.shape) for f in out.domain_features[0]] == [(2, 32, h // 4, w // 4)] * 2
    assert out.candidates == []
    m = out.matches[0]
    assert m.min() >= 0 and m[:, 0].max() < h // 4 and m[:, 1].max() < w // 4
    (out.image.mean() + sum(t.abs().mean() for t in out.warped) + out.cycle.mean() + out.warp_mask.mean()).backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_every_parameter_learns():
    net = CoCosNet(v1_config((64, 64))).train()
    with torch.no_grad():  # gamma starts at 0, which leaves the attention convolutions without gradient
        net.generator.attn.gamma.fill_(0.5)
    x_a, y_b, y_a, x_b = inputs((64, 64), b=2)
    out = net(x_a, y_b, y_a, target=x_b)
    domain = sum(F.l1_loss(a, b) for a, b in out.domain_features)
    loss = F.l1_loss(out.image, x_b) + F.l1_loss(out.warped[-1], x_b) + out.cycle.mean() + domain
    (loss + F.nll_loss(torch.log(out.warp_mask + 1e-10), y_a.argmax(1)[:, ::4, ::4])).backward()
    dead = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert dead == []


def test_warps_agree_across_upsampling_modes():
    """The H/4 warp is the same whatever the upsampling; the patch warp averages back to it."""
    x_a, y_b, y_a, _ = inputs((64, 64))
    outs = {}
    for mode in ("nearest", "bilinear", "patch"):
        torch.manual_seed(0)
        with torch.no_grad():
            outs[mode] = CoCosNet(v1_config((64, 64), warp_upsample=mode)).eval()(x_a, y_b, y_a)
    assert torch.equal(outs["nearest"].warped[0], outs["bilinear"].warped[0])
    assert torch.equal(outs["nearest"].warped[0], outs["patch"].warped[0])
    assert torch.equal(outs["nearest"].warped[-1], F.interpolate(outs["nearest"].warped[0], scale_factor=4.0))
    assert not torch.equal(outs["nearest"].warped[-1], outs["bilinear"].warped[-1])
    torch.testing.assert_close(F.avg_pool2d(outs["patch"].warped[-1], 4), outs["patch"].warped[0])


def test_warp_mask_is_a_distribution_over_exemplar_classes():
    net = CoCosNet(v1_config((64, 64))).eval()
    x_a, y_b, y_a, _ = inputs((64, 64))
    y_a[:, 0] += y_a[:, LABEL_NC - 1]  # the exemplar lacks the last class
    y_a[:, LABEL_NC - 1] = 0
    with torch.no_grad():
        mask = net(x_a, y_b, y_a).warp_mask
    torch.testing.assert_close(mask.sum(1), torch.ones(1, 16, 16))
    assert x_a[:, LABEL_NC - 1].sum() > 0 and mask[:, LABEL_NC - 1].abs().max() == 0


def test_dense_attention_recovers_identity():
    feats = patch_features(torch.randn(1, 16, 8, 8), kernel=3, center_channels=True)
    attention = F.softmax(feats.transpose(1, 2) @ feats / 0.01, dim=-1)
    assert best_match(attention, (8, 8)).eq(torch.stack(torch.meshgrid(torch.arange(8.0), torch.arange(8.0),
                                                                       indexing="ij"))).all()
    image = torch.rand(1, 3, 32, 32)
    identity = torch.eye(64).unsqueeze(0)
    assert torch.equal(warp_patches(identity, image, 4), image)
    assert torch.equal(attend(identity, image.flatten(2)[..., :64]), image.flatten(2)[..., :64])


def test_patch_features_are_centred_unit_vectors():
    x = torch.randn(2, 4, 6, 6)
    f = patch_features(x, 3, center_channels=True)
    assert f.shape == (2, 36, 36)
    torch.testing.assert_close(f.norm(dim=1), torch.ones(2, 36))
    torch.testing.assert_close(f.mean(dim=1), torch.zeros(2, 36), atol=1e-6, rtol=0)
    g = patch_features(x, 1, center_channels=False)
    centred = x.flatten(2) - x.flatten(2).mean(-1, keepdim=True)  # centred over positions
    torch.testing.assert_close(g, centred / centred.norm(dim=1, keepdim=True))


def test_options_change_the_architecture():
    plain = CoCosNet(v1_config((64, 64), maskmix=False, warp_mask=False, attention=False, generator_input="warp"))
    assert plain.generator.attn is None and plain.generator.fc.in_channels == 3
    assert plain.corr.layer[0].model[1].in_channels == 4 * 8
    full = CoCosNet(v1_config((64, 64), adaptor_nonlocal=True))
    assert full.generator.fc.in_channels == 3 + LABEL_NC and full.corr.layer[0].model[1].in_channels == 32 + LABEL_NC
    assert isinstance(full.corr.adaptive_model_seg.attn, SelfAttention)
    x_a, y_b, y_a, _ = inputs((64, 64))
    with torch.no_grad():
        out = plain.eval()(x_a, y_b, y_a)
    assert out.warp_mask is None and out.cycle is None and out.domain_features is None
    assert torch.equal(plain.generate(x_a, out.warped), out.image)


def test_self_attention_starts_as_identity_and_mixes_positions():
    attn = SelfAttention(16)
    x = torch.randn(2, 16, 8, 6)
    assert torch.equal(attn(x), x)
    with torch.no_grad():
        attn.gamma.fill_(1.0)
    y = attn(x)
    x2 = x.clone()
    x2[..., 0, 0] += 1  # one position changes every output position
    assert (attn(x2) - y).abs().amax(1)[..., 1:, 1:].gt(0).all()
    with pytest.raises(ValueError, match="divisible by 8"):
        SelfAttention(12)


def test_v1_config_validation():
    with pytest.raises(ValueError, match="match_kernel must be odd"):
        ModelConfig(version=1, match_kernel=2)
    with pytest.raises(ValueError, match="warp_upsample"):
        ModelConfig(version=1, warp_upsample="bicubic")
    with pytest.raises(ValueError, match="generator_input"):
        ModelConfig(version=1, generator_input="mask")
    cfg = v1_config((64, 96), warp_upsample="patch")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
