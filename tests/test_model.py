"""Shapes, gradients and behaviour of the CoCosNet model (CPU, small widths)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model import CoCosNet, ModelConfig
from model.correspondence import global_attention, matching_features
from model.layers import positional_norm
from model.patchmatch import PatchMatchGRU, pixel_grid, seed_from_coarse

LABEL_NC = 6


def tiny_config(size, **kw) -> ModelConfig:
    return ModelConfig(image_size=size, label_nc=LABEL_NC, nef=8, ngf=8, **kw)


def inputs(size, b=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, LABEL_NC, (b, size[0] // 8, size[1] // 8), generator=g)
    labels = labels.repeat_interleave(8, 1).repeat_interleave(8, 2)
    input_map = F.one_hot(labels, LABEL_NC).permute(0, 3, 1, 2).float()
    exemplar = torch.rand(b, 3, *size, generator=g) * 2 - 1
    exemplar_map = input_map.flip(-1)
    target = torch.rand(b, 3, *size, generator=g) * 2 - 1
    return input_map, exemplar, exemplar_map, target


def warp_loss(out, target):
    return sum(F.l1_loss(w, F.adaptive_avg_pool2d(target, w.shape[-2:])) for w in out.warped)


@pytest.mark.parametrize("size", [(64, 64), pytest.param((128, 96), marks=pytest.mark.slow),
                                  pytest.param((256, 256), marks=pytest.mark.slow)])
def test_forward_backward_shapes(size):
    cfg = tiny_config(size)
    net = CoCosNet(cfg).train()
    x_a, y_b, y_a, x_b = inputs(size, b=2 if size[0] < 256 else 1)
    out = net(x_a, y_b, y_a, target=x_b)
    b, (h, w) = x_a.shape[0], size
    assert out.image.shape == (b, 3, h, w)
    assert out.image.abs().max() <= 1
    scales = [8, 4, 2, 1]
    assert [tuple(t.shape) for t in out.warped] == [(b, 3, h // s, w // s) for s in scales]
    assert [tuple(t.shape) for t in out.matches] == [(b, 2, h // s, w // s) for s in scales]
    assert out.cycle.shape == out.warped[0].shape
    assert len(out.domain_features) == 4 and out.warp_mask is None
    for m in out.matches:  # matches are positions inside the exemplar at that level
        assert m.min() >= 0 and (m[:, 0].max() < m.shape[-2]) and (m[:, 1].max() < m.shape[-1])
    loss = out.image.mean() + warp_loss(out, x_b) + out.cycle.mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


@pytest.mark.parametrize("gru_grad_iters", [None, 1])
def test_every_parameter_learns_in_default_mode(gru_grad_iters):
    """Unlike the official code (GRU and initial layer get no gradient), every parameter learns; with
    gru_grad_iters=1 all but the GRU's initial hidden layer (its output reaches the loss only through every
    iteration's hidden state)."""
    size = (64, 64)
    net = CoCosNet(tiny_config(size, gru_grad_iters=gru_grad_iters)).train()
    x_a, y_b, y_a, x_b = inputs(size, b=2)
    out = net(x_a, y_b, y_a, target=x_b)
    domain = sum(F.l1_loss(a, b) for a, b in out.domain_features)
    (F.l1_loss(out.image, x_b) + warp_loss(out, x_b) + F.l1_loss(out.cycle, out.warped[0]) + domain).backward()
    dead = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    initial = [n for n, _ in net.named_parameters() if n.startswith("corr.patch_match.initial_layer.")]
    assert initial and dead == (initial if gru_grad_iters == 1 else [])


@pytest.mark.parametrize("gru_grad_iters", [None, 1])
def test_warp_loss_alone_reaches_the_gru(gru_grad_iters):
    size = (64, 64)
    net = CoCosNet(tiny_config(size, gru_grad_iters=gru_grad_iters)).train()
    x_a, y_b, y_a, x_b = inputs(size)
    warp_loss(net(x_a, y_b, y_a), x_b).backward()
    gru = net.corr.patch_match.refine_net if gru_grad_iters == 1 else net.corr.patch_match
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gru.parameters())


def test_official_compat_blocks_gru_gradient_like_the_official_code():
    size = (64, 64)
    net = CoCosNet(tiny_config(size, official_compat=True)).train()
    x_a, y_b, y_a, x_b = inputs(size)
    warp_loss(net(x_a, y_b, y_a), x_b).backward()
    assert all(p.grad is None for p in net.corr.patch_match.parameters())
    assert net.corr.theta_3.weight.grad.abs().sum() > 0


def test_eval_mode_has_no_cycle_and_is_deterministic():
    size = (64, 64)
    net = CoCosNet(tiny_config(size)).eval()
    x_a, y_b, y_a, _ = inputs(size)
    with torch.no_grad():
        a, b = net(x_a, y_b, y_a), net(x_a, y_b, y_a)
    assert a.cycle is None and a.domain_features is None
    assert torch.equal(a.image, b.image)


def test_warp_residual_generator_starts_from_its_finest_warp():
    size = (64, 64)
    torch.manual_seed(0)
    net = CoCosNet(tiny_config(size, warp_residual=True)).train()
    x_a, y_b, y_a, x_b = inputs(size)
    with torch.no_grad():
        net.generator.conv_img.weight.zero_()
        net.generator.conv_img.bias.zero_()
    out = net(x_a, y_b, y_a)
    torch.testing.assert_close(out.image, out.warped[-1].clamp(-0.99, 0.99), rtol=1e-5, atol=1e-5)
    F.l1_loss(out.image, x_b).backward()  # the correction learns, and the output's loss reaches the matching
    assert net.generator.conv_img.weight.grad.abs().sum() > 0
    assert net.corr.theta_3.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="v2 option"):
        tiny_config(size, version=1, warp_residual=True)


def test_generate_runs_the_generator_on_given_warps():
    size = (64, 64)
    net = CoCosNet(tiny_config(size)).eval()
    x_a, y_b, y_a, _ = inputs(size)
    with torch.no_grad():
        out = net(x_a, y_b, y_a)
        assert torch.equal(net.generate(x_a, out.warped), out.image)
        corr = net.correspondence(x_a, y_b, y_a)
        assert all(torch.equal(p, q) for p, q in zip(corr.warped, out.warped))


@pytest.mark.parametrize("version", [2, 1])
@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
def test_every_convolution_runs_in_the_configured_layout(version, memory_format):
    # Convolutions keep their input's layout, and oneDNN's speed depends on it (channels-last: 1.3-2x faster on an
    # AVX-512 CPU, weight gradients ~4.5x slower on an earlier VM's), so the model lays out its inputs as configured.
    # inputs() builds its maps as F.one_hot(...).permute(0, 3, 1, 2): channels-last, the exemplar NCHW.
    size = (64, 64)
    torch.manual_seed(0)
    net = CoCosNet(tiny_config(size, version=version, match_channels=8, memory_format=memory_format)).train()
    x_a, y_b, y_a, x_b = inputs(size)
    assert x_a.is_contiguous(memory_format=torch.channels_last) and not x_a.is_contiguous()
    layout = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    layouts = []
    conv2d = F.conv2d

    def recording_conv2d(x, *args, **kwargs):
        layouts.append(x.is_contiguous(memory_format=layout) or x.shape[-2:].numel() == 1)
        return conv2d(x, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(F, "conv2d", recording_conv2d)  # torch.nn.Conv2d calls it through this same module
        out = net(x_a, y_b, y_a, target=x_b)
    assert len(layouts) > 20, layouts
    assert all(layouts), f"{layouts.count(False)} of {len(layouts)} convolutions ran in another layout"
    assert out.image.is_contiguous(memory_format=layout)

    # the other layout computes the same function and gradients, up to float rounding (compared as whole vectors:
    # the biases of convolutions that feed an instance norm get gradients of pure rounding noise, ~1e-7)
    other = CoCosNet(tiny_config(size, version=version, match_channels=8,
                                 memory_format="contiguous" if memory_format == "channels_last" else "channels_last"))
    other.load_state_dict(net.state_dict())
    losses, grads = [], []
    for model in (net, other):
        model.zero_grad()
        result = model(x_a, y_b, y_a)
        loss = (result.image * weights(result.image, 1)).mean() + sum((w * weights(w, 2)).mean() for w in result.warped)
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-6)  # terms of ~1e-2 cancel to ~5e-4
    assert (grads[0] - grads[1]).norm() < 1e-3 * grads[0].norm()


def weights(like: torch.Tensor, seed: int) -> torch.Tensor:
    return torch.randn(like.shape, generator=torch.Generator().manual_seed(seed))


def test_auto_memory_format_is_channels_last_on_avx512_cpus_only(monkeypatch):
    from model.cocosnet import activation_layout

    cpu = torch.device("cpu")
    for capability, expected in (("AVX512", torch.channels_last), ("AVX2", torch.contiguous_format),
                                 ("DEFAULT", torch.contiguous_format)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert activation_layout("auto", cpu) == expected
        assert activation_layout("contiguous", cpu) == torch.contiguous_format
        assert activation_layout("channels_last", cpu) == torch.channels_last
    assert activation_layout("auto", torch.device("cuda")) == torch.contiguous_format
    with pytest.raises(ValueError, match="memory_format must be one of"):
        ModelConfig(memory_format="nhwc")


def test_bad_shapes_and_configs_are_rejected():
    with pytest.raises(ValueError, match="multiples of 32"):
        ModelConfig(image_size=(100, 64))
    with pytest.raises(ValueError, match="at least 64"):
        ModelConfig(image_size=(32, 64))
    with pytest.raises(ValueError, match="version must be 1"):
        ModelConfig(version=3)
    with pytest.raises(ValueError, match="'global' was removed.*version: 1"):
        ModelConfig.from_dict({"correspondence": "global"})
    assert ModelConfig.from_dict({"correspondence": "patchmatch"}) == ModelConfig()  # folders from before `version`
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({"nef": 8, "bogus": 1})
    net = CoCosNet(tiny_config((64, 64)))
    x_a, y_b, y_a, _ = inputs((64, 64))
    with pytest.raises(ValueError, match=r"exemplar must be \(B, 3, 64, 64\)"):
        net(x_a, y_b[:, :2], y_a)
    cfg = tiny_config((64, 96))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def _identity_search(official_compat: bool) -> float:
    torch.manual_seed(3)
    b, c, h, w = 2, 16, 32, 32
    feats = matching_features(torch.randn(b, c, h, w), center=True)
    pm = PatchMatchGRU(c, official_compat=official_compat).eval()
    if official_compat:
        # Official indices truncate row*w+col as a whole, so any negative GRU delta of an untrained
        # net moves a match one pixel left; silence the GRU to test the search alone.
        torch.nn.init.zeros_(pm.refine_net.flow_head.conv2.weight)
        torch.nn.init.zeros_(pm.refine_net.flow_head.conv2.bias)
    coarse = pixel_grid(h // 2, w // 2).expand(b, -1, -1, -1).clone()
    wrong = torch.rand(b, h // 2, w // 2) < 0.3  # 30% of the seeds point somewhere else entirely
    coarse[:, 0][wrong] = torch.randint(0, h // 2, (int(wrong.sum()),)).float()
    coarse[:, 1][wrong] = torch.randint(0, w // 2, (int(wrong.sum()),)).float()
    seed = seed_from_coarse(coarse, (h, w), 4, 2)
    with torch.no_grad():
        res = pm(feats, feats, torch.rand(b, 3, h, w), seed)
    return res.best.round().eq(pixel_grid(h, w)).all(1).float().mean().item()


def test_positional_norm_gradient_is_exact():
    """The closed-form backward against finite differences (float64), and the forward against the
    official elementwise form (unbiased variance)."""
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64) * 3 + 1
    mean, var = x.mean(1, keepdim=True), x.var(1, keepdim=True)
    assert torch.allclose(positional_norm(x, 1e-8), (x - mean) / (var + 1e-8).sqrt())
    assert torch.autograd.gradcheck(lambda t: positional_norm(t, 1e-5), (x.requires_grad_(),))


@pytest.mark.parametrize("official_compat", [False, True])
def test_patchmatch_recovers_identity_on_identical_features(official_compat):
    assert _identity_search(official_compat) >= 0.99


def test_global_attention_recovers_identity():
    feats = matching_features(torch.randn(1, 16, 8, 8), center=True)
    image = torch.rand(1, 3, 8, 8)
    res = global_attention(feats, feats, image, temperature=0.01, with_cycle=True)
    assert res.best.eq(pixel_grid(8, 8)).all()
    assert torch.allclose(res.warp, image, atol=1e-3)
    assert torch.allclose(res.cycle, image, atol=1e-3)


@pytest.mark.slow
def test_overfit_one_pseudo_pair():
    """Warp-to-target L1 on one fixed pseudo pair (exemplar = shifted target) halves in 30 steps.

    The target is the input map painted with one colour per class, so a class-consistent warp is
    exact. A softer temperature than the official 0.01 keeps the attention trainable from scratch.
    """
    torch.manual_seed(0)
    size = (64, 64)
    net = CoCosNet(tiny_config(size, temperature=0.05)).train()
    x_a, _, _, _ = inputs(size, seed=1)
    palette = torch.rand(LABEL_NC, 3, generator=torch.Generator().manual_seed(5)) * 2 - 1
    x_b = torch.einsum("bkhw,kc->bchw", x_a, palette)
    y_b, y_a = x_b.roll(8, dims=-1), x_a.roll(8, dims=-1)
    opt = torch.optim.Adam(net.corr.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = warp_loss(net(x_a, y_b, y_a), x_b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert min(losses[-5:]) <= 0.5 * losses[0], losses
