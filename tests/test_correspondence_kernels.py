"""The memory- and time-saving paths of the correspondence compute what the plain formulas compute:
chunked candidate gathers, split-weight ConvGRU, flash-attention level 0, activation checkpointing,
float32 scores under bf16 autocast."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import model.gather as gather
import model.patchmatch as patchmatch
from model import CoCosNet, ModelConfig
from model.correspondence import global_attention, matching_features
from model.patchmatch import candidate_index, offsets_to_positions, positions_to_index, propagate
from model.update import SepConvGRU

from .test_model import inputs, tiny_config, warp_loss


def _table_case(rows=37, table_rows=29, k=5, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    left = torch.randn(rows, c, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(rows, k, generator=g, dtype=torch.float64, requires_grad=True)
    table = torch.randn(table_rows, c, generator=g, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, table_rows, (rows, k), generator=g)  # with repeats: index_add must accumulate
    return left, weight, table, index


@pytest.mark.parametrize("chunk_elements", [1, 7, 1 << 19])
def test_gathers_equal_the_plain_formulas_in_any_chunking(monkeypatch, chunk_elements):
    monkeypatch.setattr(gather, "CHUNK_ELEMENTS", chunk_elements)
    left, weight, table, index = _table_case()
    torch.testing.assert_close(gather.gather_dot(left, table, index), (table[index] * left[:, None]).sum(-1))
    torch.testing.assert_close(gather.gather_mix(weight, table, index), (table[index] * weight[..., None]).sum(1))


def test_gather_gradients_are_exact():
    left, weight, table, index = _table_case(rows=11, table_rows=7, k=4, c=3)
    assert torch.autograd.gradcheck(lambda a, t: gather.gather_dot(a, t, index), (left, table))
    assert torch.autograd.gradcheck(lambda w, t: gather.gather_mix(w, t, index), (weight, table))


@pytest.mark.parametrize("horizontal", [True, False])
def test_propagation_gives_each_pixel_its_neighbours_candidates(horizontal):
    offsets = torch.randn(2, 2, 3, 5, 7)
    dim = -1 if horizontal else -2
    zeros = torch.zeros_like(offsets.narrow(dim, 0, 1))
    prev = torch.cat([zeros, offsets.narrow(dim, 0, offsets.shape[dim] - 1)], dim)  # the left / upper neighbour's
    nxt = torch.cat([offsets.narrow(dim, 1, offsets.shape[dim] - 1), zeros], dim)
    assert torch.equal(propagate(offsets, horizontal), torch.cat([prev, offsets, nxt], dim=2))


@pytest.mark.parametrize("truncate", [True, False])
@pytest.mark.parametrize("shape", [(2, 48, 64, 64), (1, 16, 96, 128), (1, 1, 4096, 4096)])  # the last: h*w = 2**24
def test_in_place_candidate_index_equals_the_reference(shape, truncate):
    b, m, h, w = shape
    offsets = torch.randn(b, 2, m, h, w, generator=torch.Generator().manual_seed(0)) * 40
    offsets[:, :, : m // 2] = offsets[:, :, : m // 2].round()  # integer candidates, as the search holds, and others
    expected = positions_to_index(offsets_to_positions(offsets), truncate).flatten(2).transpose(1, 2)
    index = candidate_index(offsets.clone(), truncate)
    assert index.is_contiguous() and torch.equal(index, expected)


def test_split_weight_gru_equals_the_official_concatenating_gru():
    torch.manual_seed(0)
    gru = SepConvGRU(hidden_dim=4, input_dim=6).double()
    h, x = torch.randn(2, 4, 7, 9, dtype=torch.float64), torch.randn(2, 6, 7, 9, dtype=torch.float64)

    def official(h, x):  # the official SepConvGRU: one convolution per gate over cat([h, x])
        for convz, convr, convq in ((gru.convz1, gru.convr1, gru.convq1), (gru.convz2, gru.convr2, gru.convq2)):
            hx = torch.cat([h, x], dim=1)
            z, r = torch.sigmoid(convz(hx)), torch.sigmoid(convr(hx))
            q = torch.tanh(convq(torch.cat([r * h, x], dim=1)))
            h = (1 - z) * h + z * q
        return h

    torch.testing.assert_close(gru(h, x), official(h, x), rtol=1e-12, atol=1e-12)
    assert sorted(gru.state_dict()) == sorted(f"conv{g}{i}.{p}" for g in "zrq" for i in "12" for p in ("weight", "bias"))


@pytest.mark.parametrize("c", [2, 8])  # narrower than the 3 colour channels too (the flash kernel pads)
def test_level0_attention_equals_the_dense_softmax(c):
    g = torch.Generator().manual_seed(1)
    query = matching_features(torch.randn(2, c, 6, 5, generator=g), center=False).requires_grad_()
    key = matching_features(torch.randn(2, c, 6, 5, generator=g), center=False).requires_grad_()
    image = torch.rand(2, 3, 6, 5, generator=g)
    res = global_attention(query, key, image, temperature=0.05, with_cycle=True)
    (res.warp.square().sum() + res.cycle.sum()).backward()

    q64, k64 = query.detach().double().requires_grad_(), key.detach().double().requires_grad_()
    logits = q64.flatten(2).transpose(1, 2) @ k64.flatten(2) / 0.05  # (B, hw, hw)
    warp = torch.softmax(logits, -1) @ image.double().flatten(2).transpose(1, 2)
    cycle = torch.softmax(logits.transpose(1, 2), -1) @ warp
    (warp.square().sum() + cycle.sum()).backward()
    to_map = lambda t: t.transpose(1, 2).reshape(2, 3, 6, 5).float()  # noqa: E731
    torch.testing.assert_close(res.warp, to_map(warp), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res.cycle, to_map(cycle), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(query.grad, q64.grad.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(key.grad, k64.grad.float(), rtol=1e-4, atol=1e-4)
    index = logits.argmax(-1)
    assert torch.equal(res.best.flatten(2).long(), torch.stack([index // 5, index % 5], dim=1))


def _loss_and_grads(cfg: ModelConfig, setup=lambda net: None):
    torch.manual_seed(0)
    net = CoCosNet(cfg).train()
    setup(net)
    x_a, y_b, y_a, x_b = inputs(cfg.image_size, b=2)
    out = net(x_a, y_b, y_a, target=x_b)
    domain = sum(F.l1_loss(a, b) for a, b in out.domain_features)
    loss = F.l1_loss(out.image, x_b) + warp_loss(out, x_b) + out.cycle.mean() + domain
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in net.named_parameters()}


def _same_grads(a: dict, b: dict) -> list[str]:
    """Names whose gradients differ (bit for bit; None only matches None)."""
    assert a.keys() == b.keys()
    return [n for n in a if (a[n] is None) != (b[n] is None) or (a[n] is not None and not torch.equal(a[n], b[n]))]


@pytest.mark.parametrize("gru_grad_iters,gru_motion_grad", [(None, "last"), (None, "all"), (1, "last")])
def test_checkpointed_training_gives_the_same_loss_and_gradients(gru_grad_iters, gru_motion_grad):
    """Tolerance: bit-identical. The recomputation repeats the same float32 operations on the same
    inputs (the search, the only part with discrete choices, is never recomputed)."""
    config = lambda mode: tiny_config((64, 64), checkpointing=mode, gru_grad_iters=gru_grad_iters,  # noqa: E731
                                      gru_motion_grad=gru_motion_grad)
    loss_plain, grads_plain = _loss_and_grads(config("none"))
    loss_ckpt, grads_ckpt = _loss_and_grads(config("full"))
    assert torch.equal(loss_plain, loss_ckpt)
    assert _same_grads(grads_plain, grads_ckpt) == []


def test_truncated_gru_gradient_is_the_last_iteration_with_its_hidden_state_detached():
    """gru_grad_iters=1 gives what full backpropagation gives when the hidden state entering
    each level's last update is cut from its past: the same loss, the update block trained through the last iteration
    only, the initial hidden layer not at all. Tolerance: bit-identical (the same operations run; the
    earlier iterations only skip recording a graph that would receive no gradient)."""
    iters = tiny_config((64, 64)).patchmatch_iters

    def detach_before_last_update(net):
        calls = []

        def hook(module, args):
            calls.append(None)
            if len(calls) % iters == 0:  # the last of a level's updates
                hidden, motion = args
                return hidden.detach(), motion

        net.corr.patch_match.refine_net.gru.register_forward_pre_hook(hook)

    full = tiny_config((64, 64), checkpointing="none", gru_grad_iters=None)
    loss_cut, grads_cut = _loss_and_grads(full, detach_before_last_update)
    loss_full, grads_full = _loss_and_grads(full)
    loss_last, grads_last = _loss_and_grads(tiny_config((64, 64), checkpointing="none", gru_grad_iters=1))
    assert torch.equal(loss_last, loss_full)
    assert _same_grads(grads_last, grads_cut) == []
    refine = [n for n in grads_last if ".refine_net." in n]
    assert refine and all(grads_last[n] is not None and grads_last[n].abs().sum() > 0 for n in refine)
    assert any(not torch.equal(grads_last[n], grads_full[n]) for n in refine)  # truncation changes them
    assert all(grads_last[n] is None for n in grads_last if ".initial_layer." in n)
    net = CoCosNet(tiny_config((64, 64), gru_grad_iters=1))
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    assert frozen == {n for n in grads_last if ".initial_layer." in n}  # so DDP does not wait for them
    _, grads_none = _loss_and_grads(tiny_config((64, 64), checkpointing="none", gru_grad_iters=0))
    assert all(grads_none[n] is None for n in refine)
    assert _same_grads(_loss_and_grads(tiny_config((64, 64), checkpointing="none", gru_grad_iters=iters))[1],
                       grads_full) == []
    with pytest.raises(ValueError, match="gru_grad_iters"):
        tiny_config((64, 64), gru_grad_iters=-1)


def test_motion_encoder_trained_at_the_last_update_is_full_backprop_with_earlier_motion_detached():
    """gru_motion_grad="last" gives what full backpropagation through time ("all") gives when the motion
    features of each level's earlier updates are cut from the encoder: the same loss, the same gradients
    for everything (the GRU's recurrence still through every iteration). Tolerance: bit-identical (the
    same operations run; the encoder's earlier calls only skip recording a graph)."""
    iters = tiny_config((64, 64)).patchmatch_iters

    def detach_earlier_motion(net):
        calls = []

        def hook(module, args, motion):
            calls.append(None)
            return motion if len(calls) % iters == 0 else motion.detach()

        net.corr.patch_match.refine_net.encoder.register_forward_hook(hook)

    config = lambda motion_grad: tiny_config((64, 64), checkpointing="none", gru_motion_grad=motion_grad)  # noqa: E731
    loss_all, grads_all = _loss_and_grads(config("all"))
    loss_cut, grads_cut = _loss_and_grads(config("all"), detach_earlier_motion)
    loss_last, grads_last = _loss_and_grads(config("last"))
    assert torch.equal(loss_last, loss_all) and torch.equal(loss_cut, loss_all)
    assert _same_grads(grads_last, grads_cut) == []
    encoder = [n for n in grads_last if ".refine_net.encoder." in n]
    recurrence = [n for n in grads_last if ".refine_net.gru." in n or ".initial_layer." in n]
    assert all(grads_last[n].abs().sum() > 0 for n in encoder + recurrence)
    assert all(not torch.equal(grads_last[n], grads_all[n]) for n in encoder)  # the encoder's earlier calls are cut
    with pytest.raises(ValueError, match="gru_motion_grad"):
        tiny_config((64, 64), gru_motion_grad="first")


def test_final_read_in_pixel_chunks_gives_the_same_loss_and_gradients(monkeypatch):
    """The continuous read in uneven pixel chunks (5 at the 64x64 level, 2 at 32x32), checkpointed or not.
    Tolerance: the loss bit-identical (every pixel's read is the same float32 computation); gradients
    to float32 rounding against one chunk (the tables' gradients are summed chunk by chunk: relative L2
    errors of ~1e-6 seen, 1e-4 allowed, plus 1e-5 absolute for the biases ahead of an instance norm,
    whose exact gradient is 0 and computed one is rounding noise of ~1e-6), and bit-identical between
    checkpointed and not (the same chunks either way)."""
    loss_one, grads_one = _loss_and_grads(tiny_config((64, 64), checkpointing="none"))
    monkeypatch.setattr(patchmatch, "READ_CHUNK_PIXELS", 1000)
    loss_plain, grads_plain = _loss_and_grads(tiny_config((64, 64), checkpointing="none"))
    loss_ckpt, grads_ckpt = _loss_and_grads(tiny_config((64, 64), checkpointing="full"))
    assert torch.equal(loss_one, loss_plain) and torch.equal(loss_plain, loss_ckpt)
    for name, grad in grads_one.items():
        error = torch.linalg.vector_norm(grads_plain[name] - grad)
        assert error <= 1e-4 * torch.linalg.vector_norm(grad) + 1e-5, name
        assert torch.equal(grads_ckpt[name], grads_plain[name]), name


def test_auto_checkpointing_engages_in_training_from_256(monkeypatch):
    assert ModelConfig(image_size=(256, 256)).checkpoint_levels(training=True) == (True, True)
    assert ModelConfig(image_size=(256, 224)).checkpoint_levels(training=True) == (False, False)
    assert ModelConfig(image_size=(512, 512)).checkpoint_levels(training=False) == (False, False)
    assert ModelConfig(checkpointing="iterations").checkpoint_levels(training=False) == (True, False)
    assert ModelConfig(image_size=(512, 512), checkpointing="none").checkpoint_levels(training=True) == (False, False)
    with pytest.raises(ValueError, match="checkpointing"):
        ModelConfig(checkpointing="always")

    # The reviewers' usage: a train-mode model, autograd on, correspondence only.
    calls = []
    real = patchmatch.maybe_checkpoint
    monkeypatch.setattr(patchmatch, "maybe_checkpoint", lambda on, fn, *a: calls.append(on) or real(on, fn, *a))
    net = CoCosNet(ModelConfig(image_size=(256, 256), label_nc=3, nef=4, ngf=4, spade_hidden=4,
                               patchmatch_iters=1)).train()
    x_a, y_b, y_a, _ = inputs((256, 256))
    x_a = x_a[:, :3]
    sum(w.mean() for w in net.correspondence(x_a, y_b, x_a).warped).backward()
    assert calls and all(calls)
    calls.clear()
    with torch.no_grad():
        net.correspondence(x_a, y_b, x_a)
    assert calls and not any(calls)


@pytest.mark.slow  # CPU bf16 kernels: ~50 s on 2 idle cores
def test_scores_stay_float32_under_bf16_autocast():
    """CPU bf16 autocast stands in for CUDA's: convolutions run in bf16, the PatchMatch and level-0
    scores and softmax in float32, so the candidate probabilities are proper distributions."""
    cfg = tiny_config((64, 64))
    torch.manual_seed(0)
    net = CoCosNet(cfg).train()
    x_a, y_b, y_a, x_b = inputs(cfg.image_size)
    with torch.no_grad():
        full = net.correspondence(x_a, y_b, y_a)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        seen = {}
        real = patchmatch.candidate_dots
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(patchmatch, "candidate_dots", lambda *a: seen.setdefault("dtype", real(*a).dtype) and real(*a))
            out = net.correspondence(x_a, y_b, y_a)
        warp_loss(out, x_b).backward()
    assert seen["dtype"] == torch.float32
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in out.warped)
    assert (out.warped[0] - full.warped[0]).abs().mean() < 0.05  # same attention, bf16 features
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_the_benchmark_baseline_still_matches_ours():
    # benchmarks/correspondence.py's official-style baseline subclasses PatchMatchGRU: a change of the model's
    # private search API must not break the benchmark unnoticed (its check runs before any timing).
    from benchmarks.correspondence import check_equivalence

    result = check_equivalence(size=64, nef=8)
    assert result["size"] == 64 and not result["gru_grad"]
