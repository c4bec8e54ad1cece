"""CoCosNet v2 and v1 training losses: VGG feature matching, perceptual, contextual, hinge GAN with
discriminator feature matching, domain alignment, cycle warping, warp-to-target and (v1) the warp mask.

The formulas and their normalisations follow the official ``pix2pix_model.compute_generator_loss``
(of both versions, which agree on the shared terms) so that the official loss weights (:class:`LossWeights`
defaults: the v2 DeepFashionHD command) keep their meaning.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Iterator, Literal, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.discriminator import MultiscaleDiscriminator
from model.layers import maybe_checkpoint
from model.vgg import VGG19

Center = Literal["channel", "spatial"]

VGG_LAYERS: tuple[str, ...] = ("r12", "r22", "r32", "r42", "r52")
# Deeper layers weigh more in feature matching: they carry semantics, shallow ones texture.
VGG_LAYER_WEIGHTS: tuple[float, ...] = (1.0 / 32, 1.0 / 16, 1.0 / 8, 1.0 / 4, 1.0)
PERCEPTUAL_LAYER = "r42"  # official --which_perceptual 4_2
PERCEPTUAL_LAYER_R52 = "r52"  # official --which_perceptual 5_2 (the v1 default, used for ADE20k)


# ----------------------------------------------------------------------------- contextual loss


def _unit_channels(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Unit L2 norm over channels at every position. (B, C, ...) -> (B, C, ...)."""
    return x / (torch.linalg.vector_norm(x, dim=1, keepdim=True) + eps)


CONTEXTUAL_CHUNK_ELEMENTS = 2**25  # a (rows x M) float32 matrix of 128 MiB per chunk


def _best_affinity(x: torch.Tensor, y: torch.Tensor, h: float) -> torch.Tensor:
    """x (B, C, n), y (B, C, M) unit features -> (B, n): each x position's largest normalised affinity."""
    distance = 1 - x.transpose(1, 2) @ y  # (B, n, M) cosine distance
    relative = distance / (distance.min(dim=-1, keepdim=True).values + 1e-3)
    # softmax == exp((1 - d) / h) normalised over each row, without overflow/underflow risk.
    return torch.softmax((1 - relative) / h, dim=-1).max(dim=-1).values


def contextual_loss(
    x: torch.Tensor, y: torch.Tensor, h: float = 0.1, center: Center | None = "channel",
    chunk_elements: int = CONTEXTUAL_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Contextual loss (Mechrez et al. 2018) of features x against y, per sample.

    x: (B, C, H, W), y: (B, C, H', W') -> (B,). Each position of x is matched to its most
    similar position of y, irrespective of where it is, so x may be a spatially rearranged y.

    ``center``: what to subtract from both x and y before the cosine similarity (always y's
    statistics, so that the two live in the same frame):
    ``"channel"``: y's mean over channels at each position (official with ``--PONO``; needs
    H, W == H', W'); ``"spatial"``: y's per-channel mean over positions; ``None``: nothing.

    Every row of the (N x M) affinity is normalised on its own, so the rows are computed in chunks of at most
    ``chunk_elements`` (B x rows x M) entries, each recomputed in the backward pass: the same values, with
    memory linear rather than quadratic in the positions (a 1024 image's r42 has N = M = 16384: 1 GiB a matrix).
    """
    if x.shape[:2] != y.shape[:2]:
        raise ValueError(f"x and y need the same batch and channels, got {tuple(x.shape)}, {tuple(y.shape)}")
    # The relative normalisation divides by (min distance + 1e-3): half precision is not enough.
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, y = x.float(), y.float()
        if center == "channel":
            if x.shape[2:] != y.shape[2:]:
                raise ValueError(f"center='channel' needs equal spatial sizes, got {tuple(x.shape)}, {tuple(y.shape)}")
            mean = y.mean(dim=1, keepdim=True)
        elif center == "spatial":
            mean = y.mean(dim=(2, 3), keepdim=True)
        elif center is None:
            mean = torch.zeros((), dtype=y.dtype, device=y.device)
        else:
            raise ValueError(f"center must be 'channel', 'spatial' or None, got {center!r}")
        x = _unit_channels(x - mean).flatten(2)  # (B, C, N)
        y = _unit_channels(y - mean).flatten(2)  # (B, C, M)
        rows = max(1, chunk_elements // (y.shape[0] * y.shape[2]))
        if x.shape[2] <= rows:
            best = _best_affinity(x, y, h)
        else:
            recompute = torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)
            best = torch.cat([maybe_checkpoint(recompute, _best_affinity, x[..., i:i + rows], y, h)
                              for i in range(0, x.shape[2], rows)], dim=1)
        return -torch.log(best.mean(dim=1))


def vgg_contextual_loss(
    fake: Mapping[str, torch.Tensor], exemplar: Mapping[str, torch.Tensor], center: Center | None = "channel",
    chunk_elements: int = CONTEXTUAL_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """The official ``get_ctx_loss``: 8 CX(r52) + 4 CX(r42) + 2 CX(avgpool2(r32)), batch mean.

    fake, exemplar: VGG features by layer name, each (B, C, h, w). -> scalar.
    """
    def cx(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return contextual_loss(x, y.detach(), center=center, chunk_elements=chunk_elements).mean()

    # r32 is pooled to keep the (hw x hw) affinity matrix affordable.
    return (8 * cx(fake["r52"], exemplar["r52"]) + 4 * cx(fake["r42"], exemplar["r42"])
            + 2 * cx(F.avg_pool2d(fake["r32"], 2), F.avg_pool2d(exemplar["r32"], 2)))


# ----------------------------------------------------------------------------- GAN losses

DiscriminatorOutput = Sequence[torch.Tensor | Sequence[torch.Tensor]]


def _predictions(pred_list: DiscriminatorOutput) -> list[torch.Tensor]:
    """Per discriminator, its prediction map: the last feature when given all of them."""
    return [p[-1] if isinstance(p, (list, tuple)) else p for p in pred_list]


def hinge_d_loss(pred_list: DiscriminatorOutput, real: bool) -> torch.Tensor:
    """Discriminator hinge loss, mean over positions, averaged over discriminators. -> scalar.

    pred_list: per discriminator a (B, 1, h, w) map, or its list of features ending with it.
    """
    preds = _predictions(pred_list)
    sign = -1.0 if real else 1.0  # real: relu(1 - D), fake: relu(1 + D)
    return sum(F.relu(1 + sign * p).mean() for p in preds) / len(preds)


def hinge_g_loss(pred_list: DiscriminatorOutput) -> torch.Tensor:
    """Generator hinge loss -D(fake), mean over positions, averaged over discriminators. -> scalar."""
    preds = _predictions(pred_list)
    return sum(-p.mean() for p in preds) / len(preds)


def gan_feature_matching(
    fake_feats: Sequence[Sequence[torch.Tensor]], real_feats: Sequence[Sequence[torch.Tensor]]
) -> torch.Tensor:
    """L1 between the discriminators' intermediate features of fake and real, / num_D. -> scalar.

    The last feature of each discriminator (its prediction) is excluded; real is a fixed target.
    """
    num_d = len(fake_feats)
    total = 0.0
    for fake_d, real_d in zip(fake_feats, real_feats, strict=True):
        for fake_f, real_f in zip(fake_d[:-1], real_d[:-1], strict=True):
            total = total + F.l1_loss(fake_f, real_f.detach())
    return total / num_d


# ----------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class LossWeights:
    """Loss weights; defaults are the official DeepFashionHD training command line."""

    gan: float = 10.0  # hinge GAN (generator and discriminator)
    gan_feat: float = 10.0  # discriminator feature matching
    vgg: float = 10.0  # scales both VGG feature matching and the contextual loss
    fm_ratio: float = 1.0  # VGG feature matching, relative to vgg
    perceptual: float = 0.001  # MSE at relu4_2
    perceptual_r52: float = 0.0  # MSE at relu5_2 (v1's --which_perceptual 5_2, e.g. ADE20k with 0.01)
    contextual: float = 1.0  # contextual loss, relative to vgg
    warp_self: float = 500.0  # warped exemplar vs target on pseudo pairs, every level (v1: its full-resolution warp)
    warp_cycle: float = 1.0  # exemplar -> input -> exemplar warp vs exemplar
    domain: float = 10.0  # L1 between the two domain adaptors' features (official weight_novgg_featpair)
    pixel: float = 0.0  # L1 between output and target on pseudo pairs (not in the official code: 0 there)
    mask: float = 0.0  # v1: NLL of the warped exemplar map vs the input's classes (official --weight_mask)
    flow: float = 0.0  # v2: InfoNCE of the matching features at the pseudo pairs' true matches (not official: 0)
    warp_fidelity: float = 0.0  # L1 between output and finest warp on real-exemplar pairs (not official: 0)
    class_nce: float = 0.0  # v2: InfoNCE of the matching features toward the exemplar's pixels of each input
    # pixel's class, every level, every pair (not official: 0); needs inputs that say a pixel's class

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = float(getattr(self, f.name))
            if not value >= 0:  # also rejects NaN
                raise ValueError(f"loss weight {f.name} must be >= 0, got {value}")
            object.__setattr__(self, f.name, value)

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, float]) -> "LossWeights":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown loss weights {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


# ----------------------------------------------------------------------------- helpers


def pseudo_sample_weights(is_pseudo: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) pseudo-pair flags -> (B, 1, 1, 1) weights p / (sum(p) + 1e-5), as official."""
    p = is_pseudo.reshape(-1).to(device=like.device, dtype=like.dtype)
    return (p / (p.sum() + 1e-5)).view(-1, 1, 1, 1)


def weighted_l1(x: torch.Tensor, y: torch.Tensor, sample_weights: torch.Tensor) -> torch.Tensor:
    """mean(|x - y| * w) over all elements, batch included (official ``weighted_l1_loss``).

    With w = p / sum(p) the batch is averaged twice, so the value scales as 1 / batch size.
    """
    return (torch.abs(x - y) * sample_weights).mean()


def selected_mean_l1(x: torch.Tensor, y: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Mean |x - y| over the selected samples of the batch ((B,) 0/1 flags; 0 when none is selected)."""
    p = selected.reshape(-1).to(device=x.device, dtype=x.dtype)
    per_sample = torch.abs(x - y).flatten(1).mean(1)
    return (per_sample * p).sum() / p.sum().clamp_min(1.0)


def warp_mask_loss(warp_mask: torch.Tensor, input_map: torch.Tensor, exemplar_map: torch.Tensor) -> torch.Tensor:
    """CoCosNet v1's warp-mask loss: the exemplar's one-hot map warped onto the input should give the
    input's class at every position. -> scalar.

    warp_mask (B, C, h, w), each position a distribution over classes; input_map, exemplar_map (B, C, H, W)
    one-hot, nearest-downsampled to (h, w). Positions of class 0 (unknown) and of classes the exemplar lacks
    are left out; the NLL is averaged over the rest (official ``--warp_mask_losstype direct``).
    """
    size = warp_mask.shape[-2:]
    target = F.interpolate(input_map, size=size, mode="nearest").argmax(1)  # (B, h, w)
    exemplar = F.interpolate(exemplar_map, size=size, mode="nearest").argmax(1)
    present = F.one_hot(exemplar.flatten(1), warp_mask.shape[1]).amax(1).bool()  # (B, C) classes in the exemplar
    weights = (torch.gather(present, 1, target.flatten(1)).view_as(target) & (target != 0)).float()
    with torch.autocast(device_type=warp_mask.device.type, enabled=False):
        nll = F.nll_loss(torch.log(warp_mask.float() + 1e-10), target, reduction="none")
        return (nll * weights).sum() / (weights.sum() + 1e-5)


def flow_nce(query: torch.Tensor, key: torch.Tensor, flow: torch.Tensor, valid: torch.Tensor, temperature: float,
             samples: int = 256, max_keys: int = 4096) -> torch.Tensor:
    """InfoNCE of one level's matching features against the ground-truth correspondence. -> scalar.

    query, key (B, C, h, w) unit features of the input and the exemplar; flow (B, 2, H, W) each input pixel's
    (row, col) in the exemplar at full resolution, valid (B, 1, H, W) bool (pixels with a known match). Up to
    `samples` valid level pixels per image are drawn; each must score its true match (the level pixel nearest to
    it) above every other key, with the attention's own scale 1 / temperature. Levels of more than `max_keys`
    pixels compare against a random `max_keys` of them (the true match always included), so the cost does not
    grow with the resolution. Pseudo pairs carry exact flow, so this trains the features the warps are read
    through directly, where the warp losses reach them only through what the softmax happened to pick.
    """
    b, c, h, w = query.shape
    scale = torch.tensor([h / flow.shape[-2], w / flow.shape[-1]], device=flow.device).view(1, 2, 1, 1)
    level_flow = F.interpolate(flow.float(), size=(h, w), mode="nearest")
    level_valid = F.interpolate(valid.float(), size=(h, w), mode="nearest").bool().flatten(1)  # (B, hw)
    target = ((level_flow + 0.5) * scale - 0.5).round().long()
    target = (target[:, 0].clamp(0, h - 1) * w + target[:, 1].clamp(0, w - 1)).flatten(1)  # (B, hw)
    q_rows, k_rows = query.flatten(2).transpose(1, 2), key.flatten(2).transpose(1, 2)  # (B, hw, C)
    losses = []
    for i in range(b):
        picked = level_valid[i].nonzero().squeeze(1)
        if picked.numel() == 0:
            continue
        picked = picked[torch.randperm(picked.numel(), device=picked.device)[:samples]]
        truth = target[i, picked]  # (P,)
        keys = k_rows[i]
        if h * w > max_keys:  # negatives: a random subset, with the true matches in front
            others = torch.randperm(h * w, device=keys.device)[:max_keys]
            pool = torch.cat([truth, others])
            keys, truth = keys[pool], torch.arange(truth.numel(), device=keys.device)
        logits = q_rows[i, picked].float() @ keys.float().t() / temperature  # (P, keys)
        if h * w > max_keys:  # a true match drawn again among the negatives is no negative
            logits[:, truth.numel():].masked_fill_(others[None, :] == pool[:truth.numel(), None], float("-inf"))
        losses.append(F.cross_entropy(logits, truth))
    return torch.stack(losses).mean() if losses else query.sum() * 0.0


def class_ids(maps: torch.Tensor, channels: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) maps whose channels [start, stop) hold one mask per class -> (B, H, W) long class ids, -1 where
    no mask is set."""
    value, index = maps[:, channels[0]:channels[1]].max(dim=1)
    return torch.where(value > 0.5, index, torch.full_like(index, -1))


def class_nce(query: torch.Tensor, key: torch.Tensor, input_classes: torch.Tensor, exemplar_classes: torch.Tensor,
              temperature: float, samples: int = 256, max_keys: int = 4096) -> torch.Tensor:
    """Multi-positive InfoNCE of one level's matching features against the two images' classes. -> scalar.

    query, key (B, C, h, w) unit features of the input and the exemplar; input_classes, exemplar_classes
    (B, H, W) long class ids, -1 where a pixel has none (nearest-downsampled to (h, w)). Up to `samples` input
    pixels per image whose class the exemplar has are drawn, each class equally likely (a background would
    otherwise take most draws, and small regions are where the warps read the wrong class); each must put its
    attention (scale 1 / temperature) on the exemplar's pixels of its class: -log of the softmax mass there.
    Any two images that share classes train the features this way, where the flow loss needs a pseudo pair's
    exact flow; at the first level this is CoCosNet v1's warp-mask NLL through the full attention. Levels of
    more than `max_keys` pixels compare against a random `max_keys` of them; a drawn pixel with no key of its
    class among them is left out.
    """
    b, _, h, w = query.shape
    size = (h, w)
    labels_a = F.interpolate(input_classes[:, None].float(), size=size, mode="nearest").long().flatten(1)
    labels_b = F.interpolate(exemplar_classes[:, None].float(), size=size, mode="nearest").long().flatten(1)
    q_rows, k_rows = query.flatten(2).transpose(1, 2), key.flatten(2).transpose(1, 2)  # (B, hw, C)
    losses = []
    for i in range(b):
        keys, key_labels = k_rows[i], labels_b[i]
        if h * w > max_keys:
            pool = torch.randperm(h * w, device=keys.device)[:max_keys]
            keys, key_labels = keys[pool], key_labels[pool]
        # present[c]: the keys hold class c; the last entry stays False and is what class -1 (none) looks up
        present = torch.zeros(int(max(labels_a[i].max(), key_labels.max())) + 2, dtype=torch.bool,
                              device=keys.device)
        present[key_labels[key_labels >= 0]] = True
        picked = present[labels_a[i]].nonzero().squeeze(1)
        if picked.numel() == 0:
            continue
        if picked.numel() > samples:
            share = 1.0 / torch.bincount(labels_a[i, picked])[labels_a[i, picked]].float()
            picked = picked[torch.multinomial(share, samples)]
        logits = q_rows[i, picked].float() @ keys.float().t() / temperature  # (P, keys)
        positive = key_labels[None, :] == labels_a[i, picked, None]
        losses.append((logits.logsumexp(1) - logits.masked_fill(~positive, float("-inf")).logsumexp(1)).mean())
    return torch.stack(losses).mean() if losses else query.sum() * 0.0


def _resize_to(image: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Average-pool (B, C, H, W) to like's (h, w); equals avg_pool2d(k=s=H/h) when it divides."""
    return F.adaptive_avg_pool2d(image, like.shape[-2:])


@contextlib.contextmanager
def _without_param_grads(module: nn.Module) -> Iterator[None]:
    """Forward through module without recording gradients for its parameters."""
    saved = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


# ----------------------------------------------------------------------------- the full loss


class CoCosNetLoss(nn.Module):
    """Generator and discriminator objectives of CoCosNet-v2.

    Holds the frozen VGG19 and the discriminator (trained elsewhere). ``batch`` keys:
    ``input_map`` x_A (B, label_nc, H, W), ``image`` x_B (B, 3, H, W) in [-1, 1], ``exemplar``
    y_B (B, 3, H, W), ``exemplar_map`` y_A, ``is_pseudo`` (B,) bool/float (1: the exemplar is a
    distorted x_B, so pixel-level supervision applies).

    ``out`` attributes: ``image`` (B, 3, H, W); ``warped`` coarse -> fine list of (B, 3, h, w);
    ``cycle`` (B, 3, h0, w0) or None; ``domain_features`` list of (from input map, from target
    photo) pairs, already normalised, or None; ``warp_mask`` (v1) or None.

    ``finest_warp_only``: the warp-to-target term supervises only the last (full-resolution) warp, as
    CoCosNet v1 does; v2 supervises every level. ``temperature``: the model's, the scale of the flow term's
    InfoNCE (``batch`` then also holds ``flow`` and ``flow_valid``, valid only where the exemplar is the pseudo
    exemplar the flow belongs to). ``class_channels``: the [start, stop) channels of the maps that hold one mask
    per class (the class term reads each pixel's class there). Every returned term is already weighted; a term
    whose weight is 0 is absent.
    """

    def __init__(self, weights: LossWeights, vgg: VGG19, discriminator: MultiscaleDiscriminator,
                 finest_warp_only: bool = False, temperature: float = 0.01,
                 class_channels: tuple[int, int] | None = None):
        super().__init__()
        if weights.class_nce and class_channels is None:
            raise ValueError("loss.class_nce needs inputs that say each pixel's class: the shards' manifest has no "
                             "class_channels (class-id maps, or the synthetic edge task with edges: classes)")
        self.weights = weights
        self.finest_warp_only, self.temperature = finest_warp_only, temperature
        self.class_channels = class_channels
        self.vgg = vgg.eval().requires_grad_(False)
        self.discriminator = discriminator

    def train(self, mode: bool = True) -> "CoCosNetLoss":
        super().train(mode)
        self.vgg.eval()  # frozen: always the inference behaviour
        return self

    def _vgg_features(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(VGG_LAYERS, self.vgg(image, VGG_LAYERS)))

    def _discriminate(
        self, input_map: torch.Tensor, fake: torch.Tensor, real: torch.Tensor
    ) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
        """Features of D on fake and real, from one pass (one spectral-norm power iteration)."""
        both = self.discriminator(torch.cat([input_map, input_map]), torch.cat([fake, real]))
        b = fake.shape[0]
        return [[f[:b] for f in d] for d in both], [[f[b:] for f in d] for d in both]

    def generator_loss(self, batch: Mapping[str, torch.Tensor], out) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """-> (total, terms) with terms among feat, perc, context, gan, gan_feat, domain, reg, warp, pixel, flow,
        fidelity, class, mask.

        Gradients reach ``out``'s tensors, never the VGG or the discriminator.
        """
        w = self.weights
        fake, target, exemplar = out.image, batch["image"], batch["exemplar"]
        sample_weights = pseudo_sample_weights(batch["is_pseudo"], fake)
        terms: dict[str, torch.Tensor] = {}

        feat_weight, context_weight = w.vgg * w.fm_ratio, w.vgg * w.contextual
        if feat_weight or w.perceptual or w.perceptual_r52 or context_weight:
            with torch.no_grad():
                fixed = self._vgg_features(torch.cat([target, exemplar]))
            b = target.shape[0]
            target_f = {k: v[:b] for k, v in fixed.items()}
            exemplar_f = {k: v[b:] for k, v in fixed.items()}
            fake_f = self._vgg_features(fake)
            if feat_weight:
                terms["feat"] = feat_weight * sum(
                    lw * weighted_l1(fake_f[k], target_f[k], sample_weights)
                    for k, lw in zip(VGG_LAYERS, VGG_LAYER_WEIGHTS)
                )
            if w.perceptual or w.perceptual_r52:
                terms["perc"] = sum(weight * F.mse_loss(fake_f[layer], target_f[layer]) for weight, layer in
                                    ((w.perceptual, PERCEPTUAL_LAYER), (w.perceptual_r52, PERCEPTUAL_LAYER_R52))
                                    if weight)
            if context_weight:
                terms["context"] = context_weight * vgg_contextual_loss(fake_f, exemplar_f)

        if w.gan or w.gan_feat:
            with _without_param_grads(self.discriminator):
                pred_fake, pred_real = self._discriminate(batch["input_map"], fake, target)
            if w.gan:
                terms["gan"] = w.gan * hinge_g_loss(pred_fake)
            if w.gan_feat:
                terms["gan_feat"] = w.gan_feat * gan_feature_matching(pred_fake, pred_real)

        if w.pixel:
            terms["pixel"] = w.pixel * selected_mean_l1(fake, target, batch["is_pseudo"])

        domain_features = getattr(out, "domain_features", None)
        if w.domain and domain_features is not None:
            terms["domain"] = w.domain * sum(F.l1_loss(a, b) for a, b in domain_features)

        cycle = getattr(out, "cycle", None)
        if w.warp_cycle and cycle is not None:
            terms["reg"] = w.warp_cycle * F.l1_loss(cycle, _resize_to(exemplar, cycle))

        warped = getattr(out, "warped", None)
        if w.warp_self and warped:
            supervised = warped[-1:] if self.finest_warp_only else warped
            terms["warp"] = w.warp_self * sum(
                weighted_l1(level, _resize_to(target, level), sample_weights) for level in supervised
            )

        if w.warp_fidelity and warped:
            finest = warped[-1].detach()  # a target for the generator only: the warp learns from its own terms
            if finest.shape[-2:] != fake.shape[-2:]:
                finest = F.interpolate(finest, size=fake.shape[-2:], mode="bilinear", align_corners=False)
            real = 1 - batch["is_pseudo"].reshape(-1).float()
            terms["fidelity"] = w.warp_fidelity * selected_mean_l1(fake, finest, real)

        matching = getattr(out, "matching", None)
        if w.flow and matching:
            terms["flow"] = w.flow * sum(flow_nce(q, k, batch["flow"], batch["flow_valid"], self.temperature)
                                         for q, k in matching) / len(matching)
        if w.class_nce and matching:
            input_classes, exemplar_classes = (class_ids(batch[name], self.class_channels)
                                               for name in ("input_map", "exemplar_map"))
            terms["class"] = w.class_nce * sum(class_nce(q, k, input_classes, exemplar_classes, self.temperature)
                                               for q, k in matching) / len(matching)

        warp_mask = getattr(out, "warp_mask", None)
        if w.mask and warp_mask is not None:
            terms["mask"] = w.mask * warp_mask_loss(warp_mask, batch["input_map"], batch["exemplar_map"])

        return _total(terms, fake), terms

    def discriminator_loss(
        self, batch: Mapping[str, torch.Tensor], fake_image: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """-> (total, {"d_fake", "d_real"}); fake_image is detached (no gradient to the generator)."""
        terms: dict[str, torch.Tensor] = {}
        if self.weights.gan:
            pred_fake, pred_real = self._discriminate(batch["input_map"], fake_image.detach(), batch["image"])
            terms["d_fake"] = self.weights.gan * hinge_d_loss(pred_fake, real=False)
            terms["d_real"] = self.weights.gan * hinge_d_loss(pred_real, real=True)
        return _total(terms, fake_image), terms


def _total(terms: Mapping[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    total = like.new_zeros((), dtype=torch.float32)
    for value in terms.values():
        total = total + value
    return total
