"""Losses: contextual, hinge GAN, feature matching, weights, and the full CoCosNetLoss."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from model.config import ModelConfig
from model.discriminator import MultiscaleDiscriminator
from model.losses import (
    CoCosNetLoss,
    LossWeights,
    class_ids,
    class_nce,
    contextual_loss,
    flow_nce,
    gan_feature_matching,
    hinge_d_loss,
    hinge_g_loss,
    warp_mask_loss,
)
from model.vgg import load_vgg19

# ----------------------------------------------------------------------------- contextual


def _naive_contextual(x: torch.Tensor, y: torch.Tensor, h: float) -> float:
    """Loop version of the official formula (PONO centring) for one sample (C, H, W)."""
    mean = y.mean(dim=0)
    xs = [(x[:, i, j] - mean[i, j]) for i in range(x.shape[1]) for j in range(x.shape[2])]
    ys = [(y[:, i, j] - mean[i, j]) for i in range(y.shape[1]) for j in range(y.shape[2])]
    total = 0.0
    for a in xs:
        d = [1 - float(a @ b) / (float(a.norm()) * float(b.norm())) for b in ys]
        d_min = min(d)
        w = [math.exp((1 - di / (d_min + 1e-3)) / h) for di in d]
        total += max(w) / sum(w)
    return -math.log(total / len(xs))


def test_contextual_matches_a_naive_implementation():
    x, y = torch.rand(2, 5, 3, 3, dtype=torch.float64), torch.rand(2, 5, 3, 3, dtype=torch.float64)
    got = contextual_loss(x, y, h=0.5)
    assert got.shape == (2,)
    for b in range(2):
        assert got[b].item() == pytest.approx(_naive_contextual(x[b], y[b], 0.5), rel=1e-4)


def test_contextual_identical_much_lower_than_unrelated():
    y = torch.randn(3, 64, 8, 8).relu()
    same = contextual_loss(y.clone(), y)
    other = contextual_loss(torch.randn(3, 64, 8, 8).relu(), y)
    assert same.shape == other.shape == (3,)
    assert (same < 0.05).all() and (other > 0.5).all()


def test_contextual_spatial_centring_ignores_where_features_are():
    y = torch.randn(2, 16, 6, 6)
    shuffled = y.flatten(2)[:, :, torch.randperm(36)].view(2, 16, 6, 6)
    torch.testing.assert_close(contextual_loss(shuffled, y, center="spatial"), contextual_loss(y, y, center="spatial"))


def test_contextual_gradients_are_finite_even_for_zero_features():
    x = torch.randn(2, 8, 4, 4).relu()
    x[:, :, 0, 0] = 0  # a dead position: zero norm
    x.requires_grad_(True)
    contextual_loss(x, torch.randn(2, 8, 4, 4).relu()).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_contextual_in_row_chunks_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    x0, y0 = torch.randn(2, 8, 5, 7), torch.randn(2, 8, 5, 7)  # the loss computes in float32
    results = []
    for chunk_elements in (10**9, 2 * 35 * 4):  # one chunk; rows of 4 (35 positions: the last chunk is short)
        x, y = x0.clone().requires_grad_(True), y0.clone().requires_grad_(True)
        loss = contextual_loss(x, y, chunk_elements=chunk_elements)
        loss.sum().backward()
        results.append((loss.detach(), x.grad, y.grad))
    for whole, chunked in zip(*results):  # a chunk's matmul may sum in another order: float32 rounding only
        torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(contextual_loss(x0, y0, chunk_elements=70), results[0][0], rtol=1e-5, atol=1e-6)


def test_contextual_channel_centring_needs_equal_sizes():
    with pytest.raises(ValueError, match="spatial"):
        contextual_loss(torch.rand(1, 4, 4, 4), torch.rand(1, 4, 2, 2))
    assert contextual_loss(torch.rand(1, 4, 4, 4), torch.rand(1, 4, 2, 2), center="spatial").shape == (1,)


# ----------------------------------------------------------------------------- GAN


def _const(value: float, shape=(2, 1, 3, 3)) -> torch.Tensor:
    return torch.full(shape, value)


def test_hinge_known_values_averaged_over_discriminators():
    preds = [_const(0.5), _const(2.0, (2, 1, 2, 2))]
    assert hinge_d_loss(preds, real=True).item() == pytest.approx((0.5 + 0.0) / 2)
    assert hinge_d_loss(preds, real=False).item() == pytest.approx((1.5 + 3.0) / 2)
    assert hinge_g_loss(preds).item() == pytest.approx((-0.5 - 2.0) / 2)


def test_hinge_takes_the_last_feature_of_each_discriminator():
    feats = [[_const(100.0), _const(-0.5)], [_const(100.0), _const(-3.0)]]
    assert hinge_d_loss(feats, real=True).item() == pytest.approx((1.5 + 4.0) / 2)
    assert hinge_d_loss(feats, real=False).item() == pytest.approx((0.5 + 0.0) / 2)


def test_gan_feature_matching_excludes_predictions_and_divides_by_num_d():
    fake = [[_const(1.0), _const(2.0), _const(50.0)], [_const(0.0), _const(0.0)]]
    real = [[_const(0.0), _const(0.0), _const(-50.0)], [_const(3.0), _const(0.0)]]
    real = [[t.requires_grad_(True) for t in d] for d in real]
    loss = gan_feature_matching(fake, real)
    assert loss.item() == pytest.approx((1.0 + 2.0 + 3.0) / 2)
    assert not loss.requires_grad  # the real features are a fixed target


# ----------------------------------------------------------------------------- weights


def test_loss_weight_defaults_are_the_official_deepfashionhd_values():
    assert LossWeights().to_dict() == {
        "gan": 10.0, "gan_feat": 10.0, "vgg": 10.0, "fm_ratio": 1.0, "perceptual": 0.001,
        "contextual": 1.0, "warp_self": 500.0, "warp_cycle": 1.0, "domain": 10.0,
        "pixel": 0.0,  # not an official term: off unless asked for
        "perceptual_r52": 0.0, "mask": 0.0,  # v1 terms, off in the v2 command
        "flow": 0.0, "warp_fidelity": 0.0, "class_nce": 0.0,  # not official
    }


def test_loss_weights_from_dict():
    assert LossWeights.from_dict({"gan": 1}).gan == 1.0
    with pytest.raises(ValueError, match="warp_slef"):
        LossWeights.from_dict({"warp_slef": 1.0})
    with pytest.raises(ValueError, match="perceptual"):
        LossWeights(perceptual=-1.0)


# ----------------------------------------------------------------------------- CoCosNetLoss

B, H, W, LABEL_NC = 2, 32, 32, 3


@pytest.fixture(scope="module")
def vgg():
    with pytest.warns(UserWarning, match="RANDOM"):
        return load_vgg19("random", seed=0)


def _criterion(vgg_net, finest_warp_only=False, class_channels=None, **weights) -> CoCosNetLoss:
    torch.manual_seed(0)
    # The discriminator runs at any size; the config only has to be a valid model size.
    cfg = ModelConfig(image_size=(64, 64), label_nc=LABEL_NC, ndf=8, num_d=2, n_layers_d=3)
    return CoCosNetLoss(LossWeights(**weights), vgg_net, MultiscaleDiscriminator(cfg), finest_warp_only,
                        class_channels=class_channels)


def _batch(is_pseudo=(1.0, 1.0)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "input_map": torch.rand(B, LABEL_NC, H, W, generator=g),
        "image": torch.rand(B, 3, H, W, generator=g) * 2 - 1,
        "exemplar": torch.rand(B, 3, H, W, generator=g) * 2 - 1,
        "exemplar_map": torch.rand(B, LABEL_NC, H, W, generator=g),
        "is_pseudo": torch.tensor(is_pseudo),
    }


def _out(levels=(8, 4, 2, 1), cycle=True, domain=True) -> SimpleNamespace:
    g = torch.Generator().manual_seed(2)

    def leaf(*shape):
        return (torch.rand(*shape, generator=g) * 2 - 1).requires_grad_(True)

    return SimpleNamespace(
        image=leaf(B, 3, H, W),
        warped=[leaf(B, 3, H // f, W // f) for f in levels],
        cycle=leaf(B, 3, H // 8, W // 8) if cycle else None,
        domain_features=[(leaf(B, 4, H // f, W // f), leaf(B, 4, H // f, W // f)) for f in (8, 4)] if domain else None,
    )


ALL_G_TERMS = {"feat", "perc", "context", "gan", "gan_feat", "domain", "reg", "warp"}


def test_generator_terms_present_finite_and_summed(vgg):
    total, terms = _criterion(vgg).generator_loss(_batch(), _out())
    assert set(terms) == ALL_G_TERMS
    for name, value in terms.items():
        assert value.dim() == 0 and torch.isfinite(value), name
    torch.testing.assert_close(total, sum(terms.values()))
    assert terms["warp"] > 0 and terms["feat"] > 0 and terms["context"] > 0


def test_zero_weight_drops_the_term(vgg):
    _, terms = _criterion(vgg, perceptual=0.0, domain=0.0, gan=0.0, warp_cycle=0.0).generator_loss(_batch(), _out())
    assert set(terms) == ALL_G_TERMS - {"perc", "domain", "gan", "reg"}


def test_outputs_without_cycle_or_domain(vgg):
    criterion = _criterion(vgg, vgg=0.0, perceptual=0.0)  # VGG terms are covered elsewhere
    _, terms = criterion.generator_loss(_batch(), _out(levels=(4,), cycle=False, domain=False))
    assert set(terms) == {"gan", "gan_feat", "warp"}


def test_warp_fidelity_pulls_real_exemplar_outputs_to_their_warp_only(vgg):
    criterion = _criterion(vgg, vgg=0.0, perceptual=0.0, gan=0.0, gan_feat=0.0, domain=0.0, warp_cycle=0.0,
                           warp_self=0.0, warp_fidelity=3.0)
    out = _out(levels=(2, 1))
    _, terms = criterion.generator_loss(_batch(is_pseudo=(1.0, 0.0)), out)
    assert set(terms) == {"fidelity"}
    expected = 3.0 * (out.image[1] - out.warped[-1][1]).abs().mean()  # the real-exemplar sample alone
    torch.testing.assert_close(terms["fidelity"], expected)
    terms["fidelity"].backward()
    assert out.warped[-1].grad is None  # the warp is the generator's target, not pulled towards the output
    assert out.image.grad[0].abs().sum() == 0 and out.image.grad[1].abs().sum() > 0
    _, none_real = criterion.generator_loss(_batch(is_pseudo=(1.0, 1.0)), _out(levels=(2, 1)))
    assert none_real["fidelity"].item() == 0.0
    coarse = _out(levels=(2,))  # a warp coarser than the output is upsampled to it
    assert torch.isfinite(criterion.generator_loss(_batch(is_pseudo=(0.0, 0.0)), coarse)[1]["fidelity"])


def test_class_nce_puts_each_pixel_on_the_exemplar_pixels_of_its_class():
    torch.manual_seed(0)
    classes_a, classes_b = torch.randint(0, 3, (2, 6, 6)), torch.randint(0, 3, (2, 6, 6))
    classes_a[0, 0] = -1  # pixels of no class: left out
    classes_a[1, 0] = 5  # a class the exemplar lacks: left out
    query = F.normalize(torch.randn(2, 4, 6, 6, dtype=torch.float64), dim=1).requires_grad_(True)
    key = F.normalize(torch.randn(2, 4, 6, 6, dtype=torch.float64), dim=1)
    got = class_nce(query, key, classes_a, classes_b, temperature=0.5, samples=1000)
    expected = []
    for i in range(2):
        q, k = query[i].flatten(1).t(), key[i].flatten(1).t()
        la, lb = classes_a[i].flatten(), classes_b[i].flatten()
        terms = [-torch.log(torch.softmax(q[p] @ k.t() / 0.5, 0)[lb == la[p]].sum())
                 for p in range(36) if la[p] in lb.tolist()]
        assert len(terms) == 30
        expected.append(torch.stack(terms).mean())
    torch.testing.assert_close(got, torch.stack(expected).mean().float(), rtol=1e-5, atol=1e-6)
    got.backward()
    assert query.grad.abs().sum() > 0 and query.grad[0, :, 0].abs().sum() == 0  # no gradient where left out
    # Features that are the class itself score (nearly) zero
    as_features = lambda c: F.one_hot(c.clamp(min=0), 6).permute(0, 3, 1, 2).float()  # noqa: E731
    assert class_nce(as_features(classes_a), as_features(classes_b), classes_a, classes_b, 0.05) < 1e-6
    # The class term reads the classes from the maps' mask channels and is refused without them
    maps = torch.zeros(1, 5, 2, 2)
    maps[0, 2, 0] = 1.0  # channel 2 = class 0 of the masks in [2, 5)
    maps[0, 4, 1, 0] = 1.0
    assert class_ids(maps, (2, 5)).tolist() == [[[0, 0], [2, -1]]]


def test_class_nce_draws_every_class_equally_often():
    """A one-pixel class among 35 background pixels is drawn nearly always in 8 draws (uniform draws: 22%)."""
    classes = torch.zeros(1, 6, 6, dtype=torch.long)
    classes[0, 2, 3] = 1
    query = F.one_hot(classes, 3).permute(0, 3, 1, 2).float()  # the background matches perfectly ...
    key = query.clone()
    key[0, :, 2, 3] = torch.tensor([0.0, 0.0, 1.0])  # ... the small class's exemplar pixel does not
    drawn = 0
    for seed in range(20):
        torch.manual_seed(seed)
        drawn += int(class_nce(query, key, classes, classes, temperature=0.1, samples=8) > 1e-3)
    assert drawn >= 18


def test_class_term_needs_the_maps_class_channels(vgg):
    with pytest.raises(ValueError, match="class_channels"):
        _criterion(vgg, class_nce=1.0)
    criterion = _criterion(vgg, class_channels=(0, LABEL_NC), vgg=0.0, gan=0.0, gan_feat=0.0, domain=0.0,
                           warp_cycle=0.0, warp_self=0.0, class_nce=3.0)
    batch, out = _batch(is_pseudo=(1.0, 0.0)), _out(levels=(4, 1))
    g = torch.Generator().manual_seed(5)
    out.matching = [tuple(F.normalize(torch.randn(B, 4, H // 4, W // 4, generator=g), dim=1) for _ in range(2))]
    terms = criterion.generator_loss(batch, out)[1]
    classes = [class_ids(batch[name], (0, LABEL_NC)) for name in ("input_map", "exemplar_map")]
    torch.testing.assert_close(terms["class"], 3.0 * class_nce(*out.matching[0], *classes, criterion.temperature))


def _official_warp_mask_loss(warp_mask, input_label, ref_label):
    """The official v1 formula with its per-sample loops, on class ids (B, 1, H, W)."""
    gt = F.interpolate(input_label.float(), scale_factor=0.25, mode="nearest").long().squeeze(1)
    ref = F.interpolate(ref_label.float(), scale_factor=0.25, mode="nearest").long().squeeze(1)
    weights = torch.ones_like(gt, dtype=torch.float32)
    for i in range(gt.shape[0]):
        for cls in torch.unique(gt[i]):
            if cls not in torch.unique(ref[i]) or cls == 0:
                weights[i][gt[i] == cls] = 0
    nll = F.nll_loss(torch.log(warp_mask + 1e-10), gt, reduction="none")
    return (nll * weights).sum() / (weights.sum() + 1e-5)


def test_warp_mask_loss_matches_the_official_formula():
    g = torch.Generator().manual_seed(3)
    def blocks(classes):  # (B, 1, 32, 32) class ids in 4x4 blocks
        return torch.randint(0, classes, (B, 1, 8, 8), generator=g).repeat_interleave(4, 2).repeat_interleave(4, 3)

    input_label, ref_label = blocks(5), blocks(3)  # classes 3 and 4 are missing from the exemplar
    one_hot = lambda t: F.one_hot(t[:, 0], 5).permute(0, 3, 1, 2).float()  # noqa: E731
    warp_mask = torch.softmax(torch.randn(B, 5, 8, 8, generator=g), dim=1).requires_grad_(True)
    loss = warp_mask_loss(warp_mask, one_hot(input_label), one_hot(ref_label))
    torch.testing.assert_close(loss, _official_warp_mask_loss(warp_mask, input_label, ref_label))
    loss.backward()
    excluded = (input_label[:, 0, ::4, ::4] == 0) | (input_label[:, 0, ::4, ::4] >= 3)
    assert 0 < excluded.float().mean() < 1
    assert warp_mask.grad.abs().sum(1)[excluded].max() == 0 and warp_mask.grad.abs().sum(1)[~excluded].min() > 0


def test_v1_terms(vgg):
    """v1 supervises only the full-resolution warp, adds the warp-mask loss and may take relu5_2."""
    batch = _batch(is_pseudo=(True, False))
    batch["input_map"] = F.one_hot(batch["input_map"].argmax(1), LABEL_NC).permute(0, 3, 1, 2).float()
    batch["exemplar_map"] = F.one_hot(batch["exemplar_map"].argmax(1), LABEL_NC).permute(0, 3, 1, 2).float()
    out = _out(levels=(4, 1), cycle=False, domain=False)
    out.warp_mask = torch.softmax(torch.randn(B, LABEL_NC, H // 4, W // 4), dim=1)
    criterion = _criterion(vgg, finest_warp_only=True, vgg=0.0, perceptual=0.0, perceptual_r52=0.01, gan=0.0,
                           gan_feat=0.0, warp_self=100.0, mask=100.0)
    _, terms = criterion.generator_loss(batch, out)
    assert set(terms) == {"perc", "warp", "mask"}
    weights = torch.tensor([1.0, 0.0]).view(-1, 1, 1, 1) / (1.0 + 1e-5)
    torch.testing.assert_close(terms["warp"], 100.0 * torch.mean((out.warped[-1] - batch["image"]).abs() * weights))
    torch.testing.assert_close(terms["mask"], 100.0 * warp_mask_loss(out.warp_mask, batch["input_map"],
                                                                       batch["exemplar_map"]))
    fake, target = criterion.vgg(out.image, ["r52"])[0], criterion.vgg(batch["image"], ["r52"])[0]
    torch.testing.assert_close(terms["perc"], 0.01 * F.mse_loss(fake, target))


def test_no_pseudo_pairs_zero_pixel_supervision(vgg):
    criterion, out = _criterion(vgg, gan=0.0, gan_feat=0.0), _out()
    _, terms = criterion.generator_loss(_batch(is_pseudo=(0.0, 0.0)), out)
    assert terms["feat"].item() == 0.0 and terms["warp"].item() == 0.0
    assert terms["context"] > 0 and terms["perc"] > 0  # those do not need a pixel-aligned pair


def test_warp_loss_matches_the_official_formula(vgg):
    batch, out = _batch(is_pseudo=(True, False)), _out()
    pixel_only = dict(vgg=0.0, perceptual=0.0, gan=0.0, gan_feat=0.0)  # skip the expensive terms
    _, terms = _criterion(vgg, **pixel_only).generator_loss(batch, out)
    assert set(terms) == {"warp", "reg", "domain"}
    weights = torch.tensor([1.0, 0.0]).view(-1, 1, 1, 1) / (1.0 + 1e-5)
    expected = 0.0
    for warped in out.warped:
        factor = H // warped.shape[-1]
        target = F.avg_pool2d(batch["image"], factor, stride=factor) if factor > 1 else batch["image"]
        expected += torch.mean(F.l1_loss(warped, target, reduction="none") * weights) * 500.0
    torch.testing.assert_close(terms["warp"], expected)
    reg = F.l1_loss(out.cycle, F.avg_pool2d(batch["exemplar"], 8, stride=8))
    torch.testing.assert_close(terms["reg"], reg)


def test_pixel_loss_is_the_mean_l1_over_pseudo_samples_only(vgg):
    batch, out = _batch(is_pseudo=(True, False)), _out()
    off = dict(vgg=0.0, perceptual=0.0, gan=0.0, gan_feat=0.0, warp_self=0.0, warp_cycle=0.0, domain=0.0)
    _, terms = _criterion(vgg, pixel=20.0, **off).generator_loss(batch, out)
    assert set(terms) == {"pixel"}
    torch.testing.assert_close(terms["pixel"], 20.0 * F.l1_loss(out.image[0], batch["image"][0]))
    _, none = _criterion(vgg, pixel=20.0, **off).generator_loss(_batch(is_pseudo=(0.0, 0.0)), out)
    assert none["pixel"].item() == 0.0


def test_generator_backward_reaches_outputs_not_discriminator_or_vgg(vgg):
    criterion, out = _criterion(vgg), _out()
    total, _ = criterion.generator_loss(_batch(), out)
    total.backward()
    leaves = [out.image, out.cycle, *out.warped, *[t for pair in out.domain_features for t in pair]]
    for t in leaves:
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
    assert all(p.grad is None for p in criterion.discriminator.parameters())
    assert all(p.grad is None for p in criterion.vgg.parameters())
    # The discriminator stays trainable afterwards.
    assert all(p.requires_grad for p in criterion.discriminator.parameters())


def test_discriminator_loss_trains_only_the_discriminator(vgg):
    criterion, out = _criterion(vgg), _out()
    total, terms = criterion.discriminator_loss(_batch(), out.image)
    assert set(terms) == {"d_fake", "d_real"}
    torch.testing.assert_close(total, terms["d_fake"] + terms["d_real"])
    total.backward()
    assert out.image.grad is None
    for name, p in criterion.discriminator.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        # The prediction bias may get exactly zero: fake and real hinge slopes cancel inside the margin.
        if not name.endswith("bias"):
            assert p.grad.abs().sum() > 0, name


def test_discriminator_terms_are_weighted_hinge(vgg):
    criterion = _criterion(vgg, gan=2.0)
    batch, fake = _batch(), _out().image
    _, terms = criterion.discriminator_loss(batch, fake)
    criterion.discriminator.eval()  # freeze the power iteration to recompute the same forward
    _, terms_eval = criterion.discriminator_loss(batch, fake)
    d = criterion.discriminator
    expected_fake = 2.0 * hinge_d_loss(d(batch["input_map"], fake), real=False)
    expected_real = 2.0 * hinge_d_loss(d(batch["input_map"], batch["image"]), real=True)
    torch.testing.assert_close(terms_eval["d_fake"], expected_fake)
    torch.testing.assert_close(terms_eval["d_real"], expected_real)
    assert torch.isfinite(terms["d_fake"]) and torch.isfinite(terms["d_real"])


# ----------------------------------------------------------------------------- flow InfoNCE


def _flow_pair(h: int, w: int, size: int, seed: int = 0):
    """Unit features where the key at p + (1, 2) equals the query at p (a shift, as flow (B, 2, size, size) in
    full-resolution pixels), random elsewhere; the valid mask excludes pixels whose match leaves the frame."""
    g = torch.Generator().manual_seed(seed)
    query = F.normalize(torch.randn(1, 16, h, w, generator=g), dim=1)
    key = F.normalize(torch.randn(1, 16, h, w, generator=g), dim=1)
    key[:, :, 1:, 2:] = query[:, :, :-1, :-2]
    s = size // h
    rows, cols = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    flow = torch.stack([rows + s, cols + 2 * s])[None]
    valid = ((flow[:, :1] < size) & (flow[:, 1:] < size))
    return query, key, flow, valid


@pytest.mark.parametrize("h, max_keys", [(8, 4096), (16, 40)])  # all keys; a random subset of them
def test_flow_nce_is_low_for_features_that_match_and_high_for_random_ones(h, max_keys):
    query, key, flow, valid = _flow_pair(h, h, 32)
    matched = flow_nce(query, key, flow, valid, temperature=0.05, max_keys=max_keys)
    shuffled = flow_nce(query, key[:, :, torch.randperm(h), :], flow, valid, temperature=0.05, max_keys=max_keys)
    assert matched < 0.05 and shuffled > 2.0, (matched, shuffled)


def test_flow_nce_reaches_both_features_and_skips_samples_without_valid_pixels():
    query, key, flow, valid = _flow_pair(8, 8, 32)
    query, key = (torch.cat([t, t]).requires_grad_(True) for t in (query, key))
    flow, valid = torch.cat([flow, flow]), torch.cat([valid, torch.zeros_like(valid)])
    loss = flow_nce(query * 2, key * 2, flow, valid, temperature=0.5)  # not unit: a gradient to follow
    loss.backward()
    assert query.grad[0].abs().sum() > 0 and key.grad[0].abs().sum() > 0
    assert query.grad[1].abs().sum() == 0  # the second sample has no valid pixel
    none = flow_nce(query, key, flow, torch.zeros_like(valid), temperature=0.5)
    assert none == 0 and none.requires_grad


def test_flow_term_is_the_nce_of_the_matching_features(vgg):
    query, key, flow, valid = _flow_pair(8, 8, H)
    batch = {**_batch(), "flow": flow.expand(B, -1, -1, -1), "flow_valid": valid.expand(B, -1, -1, -1)}
    out = _out()
    out.matching = [(query.expand(B, -1, -1, -1), key[:, :, torch.randperm(8), :].expand(B, -1, -1, -1))]
    torch.manual_seed(0)
    _, terms = _criterion(vgg, vgg=0.0, perceptual=0.0, flow=2.0).generator_loss(batch, out)
    torch.manual_seed(0)
    expected = flow_nce(*out.matching[0], batch["flow"], batch["flow_valid"], 0.01)
    torch.testing.assert_close(terms["flow"], 2.0 * expected)
    assert "flow" not in _criterion(vgg, vgg=0.0, perceptual=0.0).generator_loss(batch, out)[1]
