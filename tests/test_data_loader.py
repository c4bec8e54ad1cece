"""Loader: batch contract, exactly-once epochs across ranks x workers, DDP-equal infinite epochs, no pickle."""
from __future__ import annotations

import io
import json
import multiprocessing
import shutil
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.data.errors import DataError
from pipeline.data.imageio import decode_jpeg
from pipeline.data.loader import SLOTS, BufferPool, expand_on_cpu, expand_with_torch, make_loader
from tests.test_data_helpers import build_shards, tiny_shard_config


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return build_shards(tmp_path_factory.mktemp("loader"))


def all_keys(shard_dir, manifest, split):
    keys = []
    for info in manifest["splits"][split]["shards"]:
        with tarfile.open(shard_dir / info["name"]) as tar:
            keys += sorted({m.name.split(".", 1)[0] for m in tar.getmembers()})
    return keys


def loader(shard_dir, **kw):
    args = dict(batch_size=4, image_size=32, label_nc=12, num_workers=0)
    args.update(kw)
    return make_loader(shard_dir, **args)


def test_batches_have_the_contracted_keys_shapes_and_ranges(shards):
    shard_dir, _ = shards
    batch = next(iter(loader(shard_dir, real_exemplar_prob=0.5)))
    assert batch["input_map"].shape == (4, 12, 32, 32) and batch["input_map"].dtype == torch.float32
    assert batch["exemplar_map"].shape == (4, 12, 32, 32)
    assert torch.equal(batch["input_map"].sum(1), torch.ones(4, 32, 32))  # one-hot
    for name in ("image", "exemplar"):
        assert batch[name].shape == (4, 3, 32, 32) and batch[name].dtype == torch.float32
        assert -1.0 <= batch[name].min() and batch[name].max() <= 1.0
    assert batch["is_pseudo"].shape == (4,) and batch["is_pseudo"].dtype == torch.bool
    assert batch["flow"].shape == (4, 2, 32, 32) and batch["flow"].dtype == torch.float32
    assert batch["flow_valid"].shape == (4, 1, 32, 32) and batch["flow_valid"].dtype == torch.bool
    assert not batch["flow_valid"][~batch["is_pseudo"]].any()
    assert len(batch["key"]) == 4 and len(batch["meta"]) == 4 and "palette" in batch["meta"][0]
    assert torch.isfinite(batch["flow"]).all()


@pytest.mark.parametrize("split", ["train", "val"])
def test_finite_epoch_over_2_ranks_x_2_workers_reads_every_sample_once(shards, split, monkeypatch):
    shard_dir, manifest = shards
    seen = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))  # as Ray Train sets them
        monkeypatch.setenv("WORLD_SIZE", "2")
        rank_loader = make_loader(shard_dir, batch_size=3, split=split, image_size=32, label_nc=12, num_workers=2)
        batches = list(rank_loader)
        assert len(batches) == len(rank_loader)
        seen += [key for batch in batches for key in batch["key"]]
    expected = all_keys(shard_dir, manifest, split)
    assert len(seen) == len(expected) == manifest["splits"][split]["samples"]
    assert sorted(seen) == sorted(expected)  # the union is every key, and no duplicates


def test_epochs_reshuffle_but_each_is_complete(shards):
    shard_dir, manifest = shards
    train = loader(shard_dir, shuffle_buffer=8)
    first = [k for b in train for k in b["key"]]
    second = [k for b in train for k in b["key"]]  # iter() again: the next epoch
    assert sorted(first) == sorted(second) and first != second
    train.set_epoch(0)
    assert [k for b in train for k in b["key"]] == first  # deterministic given seed and epoch


def test_infinite_mode_gives_every_rank_the_same_number_of_full_batches(shards):
    shard_dir, manifest = shards
    counts = []
    for rank in (0, 1):
        inf = loader(shard_dir, infinite=True, epoch_samples=50, num_workers=2, rank=rank, world_size=2)
        batches = list(inf)
        counts.append(len(batches))
        assert len(batches) == len(inf) == 14  # ceil(ceil(50 / 4) / 2) * 2
        assert all(len(b["key"]) == 4 for b in batches)
        assert len({k for b in batches for k in b["key"]}) > manifest["splits"]["train"]["samples"] // 2
    assert counts[0] == counts[1]


def test_pseudo_or_real_pair_is_chosen_per_sample_deterministically(shards):
    shard_dir, _ = shards

    def choices(**kw):
        return {k: bool(p) for b in loader(shard_dir, mode="both", **kw) for k, p in zip(b["key"], b["is_pseudo"])}

    half = choices(real_exemplar_prob=0.5, seed=3)
    assert 0 < sum(half.values()) < len(half)
    assert choices(real_exemplar_prob=0.5, seed=3, num_workers=2) == half  # not a function of the worker split
    assert all(choices(real_exemplar_prob=0.0).values())
    assert not any(choices(real_exemplar_prob=1.0).values())


def test_mode_both_returns_both_pairs(shards):
    shard_dir, _ = shards
    batch = next(iter(loader(shard_dir, mode="both", real_exemplar_prob=0.5, seed=1)))
    for name in ("pseudo", "pseudo_map", "real_exemplar", "real_exemplar_map"):
        assert batch[name].shape[0] == 4
    for i, pseudo in enumerate(batch["is_pseudo"]):
        chosen = batch["pseudo"][i] if pseudo else batch["real_exemplar"][i]
        assert torch.equal(batch["exemplar"][i], chosen)
    assert not torch.equal(batch["pseudo"], batch["real_exemplar"])


def test_flow_from_the_loader_maps_x_b_into_the_pseudo_exemplar(shards):
    """Sampling the pseudo exemplar's map at the flow gives x_B's map back (photometric jitter cannot blur this)."""
    shard_dir, _ = shards
    batch = next(iter(loader(shard_dir, batch_size=8, mode="both")))
    flow, valid = batch["flow"], batch["flow_valid"][:, 0]
    grid = torch.stack([flow[:, 1] / 31 * 2 - 1, flow[:, 0] / 31 * 2 - 1], dim=-1)
    warped_map = F.grid_sample(batch["pseudo_map"], grid, mode="nearest", align_corners=True).argmax(1)
    target = batch["input_map"].argmax(1)
    unwarped = batch["pseudo_map"].argmax(1)
    agree = (warped_map == target)[valid].float().mean()
    agree_without_flow = (unwarped == target)[valid].float().mean()
    assert agree > 0.9 and agree > agree_without_flow + 0.05
    warped = F.grid_sample(batch["pseudo"], grid, align_corners=True)
    error = (warped - batch["image"]).abs().mean(1)[valid].mean()
    assert error < 0.75 * (batch["pseudo"] - batch["image"]).abs().mean(1)[valid].mean()


def test_other_image_size_is_resized(shards):
    shard_dir, _ = shards
    batch = next(iter(loader(shard_dir, image_size=64)))
    assert batch["image"].shape == (4, 3, 64, 64) and batch["input_map"].shape == (4, 12, 64, 64)
    valid_flow = batch["flow"].permute(1, 0, 2, 3)[:, batch["flow_valid"][:, 0]]
    assert valid_flow.max() <= 63.5 and valid_flow.max() > 40


def test_edge_maps_arrive_as_their_channels(tmp_path):
    shard_dir, _ = build_shards(tmp_path, task="edge", label_nc=1,
                                shard_cfg=tiny_shard_config(pseudo_per_image=1, min_shards_per_split=1))
    batch = next(iter(make_loader(shard_dir, batch_size=2, image_size=32, label_nc=1, num_workers=0)))
    assert batch["input_map"].shape == (2, 1, 32, 32)
    assert set(batch["input_map"].unique().tolist()) == {0.0, 1.0}


def test_wrong_label_nc_and_missing_split_are_clear_errors(shards, tmp_path):
    shard_dir, _ = shards
    with pytest.raises(DataError, match="label_nc 20 does not match the shards' 12"):
        loader(shard_dir, label_nc=20)
    with pytest.raises(DataError, match="no 'test' shards"):
        loader(shard_dir, split="test")
    with pytest.raises(DataError, match="manifest.json: file not found"):
        loader(tmp_path)


class Payload:
    """Unpickling this creates the marker file: proof that something was unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_loader_never_unpickles_shard_content(shards, tmp_path):
    shard_dir, manifest = shards
    marker = tmp_path / "unpickled"
    evil_dir = tmp_path / "evil"
    evil_dir.mkdir()
    info = manifest["splits"]["train"]["shards"][0]
    with tarfile.open(shard_dir / info["name"]) as source, tarfile.open(evil_dir / info["name"], "w") as target:
        for member in source.getmembers():
            data = source.extractfile(member).read()
            if member.name.endswith("pseudo_flow.npy"):
                buffer = io.BytesIO()
                np.save(buffer, np.array([Payload(str(marker))], dtype=object), allow_pickle=True)
                data = buffer.getvalue()
            member.size = len(data)
            target.addfile(member, io.BytesIO(data))
            if member.name.endswith("meta.json"):  # an extra pickle member must be ignored, not decoded
                extra = tarfile.TarInfo(member.name.replace("meta.json", "extra.pyd"))
                payload = __import__("pickle").dumps(Payload(str(marker)))
                extra.size = len(payload)
                target.addfile(extra, io.BytesIO(payload))
    evil_manifest = json.loads((shard_dir / "manifest.json").read_text())
    evil_manifest["splits"]["train"]["shards"] = [info]
    (evil_dir / "manifest.json").write_text(json.dumps(evil_manifest))
    with pytest.raises(DataError, match="refusing NPY"):
        list(loader(evil_dir))
    assert not marker.exists()


def test_fewer_shards_than_workers_still_reads_everything(shards, tmp_path):
    shard_dir, manifest = shards
    small = tmp_path / "small"
    small.mkdir()
    info = manifest["splits"]["val"]["shards"][0]
    shutil.copy(shard_dir / info["name"], small / info["name"])
    small_manifest = dict(manifest, splits={"train": {"samples": 0, "shards": []},
                                            "val": {"samples": info["samples"], "shards": [info]}})
    (small / "manifest.json").write_text(json.dumps(small_manifest))
    keys = [k for b in loader(small, split="val", num_workers=2) for k in b["key"]]
    assert len(keys) == info["samples"] == len(set(keys))
    assert list(loader(small, split="val", num_workers=2, rank=1, world_size=2)) == []  # no shard for rank 1


def test_compact_batches_are_what_the_workers_send(shards):
    shard_dir, _ = shards
    compact = next(loader(shard_dir, mode="both", real_exemplar_prob=0.5, seed=1).compact_batches())
    assert compact["image"].shape == (4, 3, 32, 32) and compact["image"].dtype == torch.uint8  # planar RGB
    assert compact["input_map"].shape == (4, 32, 32) and compact["input_map"].dtype == torch.uint8
    assert compact["flow"].shape == (4, 2, 32, 32) and compact["flow"].dtype == torch.float32
    assert compact["flow_valid"].shape == (4, 1, 32, 32) and compact["flow_valid"].dtype == torch.bool
    expanded = next(iter(loader(shard_dir, mode="both", real_exemplar_prob=0.5, seed=1, device="cpu")))
    torch.testing.assert_close(expanded["image"], compact["image"].float() / 127.5 - 1)
    assert torch.equal(expanded["input_map"].argmax(1), compact["input_map"].long())
    assert torch.equal(expanded["flow_valid"], compact["flow_valid"])
    assert not compact["flow_valid"][~compact["is_pseudo"]].any()


def test_planar_images_match_the_decoded_jpeg(shards):
    shard_dir, manifest = shards
    compact = next(loader(shard_dir, shuffle=False).compact_batches())
    info = manifest["splits"]["train"]["shards"][0]
    with tarfile.open(shard_dir / info["name"]) as tar:
        data = tar.extractfile(f"{compact['key'][0]}.image.jpg").read()
    assert torch.equal(compact["image"][0].permute(1, 2, 0), torch.from_numpy(decode_jpeg(data)))


def test_the_device_path_expands_like_the_cpu_path(shards):
    """expand_with_torch is what runs on an accelerator (device="cuda"); here it runs on CPU tensors."""
    shard_dir, _ = shards
    for mode in ("train", "both"):
        raw = next(loader(shard_dir, mode=mode, real_exemplar_prob=0.5, seed=2).compact_batches())
        on_cpu, with_torch = expand_on_cpu(raw, "ids", 12), expand_with_torch(raw, "ids", 12)
        assert on_cpu.keys() == with_torch.keys()
        for name, tensor in on_cpu.items():
            assert tensor.dtype == with_torch[name].dtype and tensor.shape == with_torch[name].shape, name
            torch.testing.assert_close(tensor, with_torch[name], rtol=0, atol=1e-6)


def snapshot(batch):
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


FIELDS = ("image", "exemplar", "input_map", "exemplar_map", "flow", "flow_valid", "is_pseudo")


@pytest.mark.parametrize("workers", [0, 2])
def test_held_batches_are_never_overwritten(shards, workers):
    """Slots and buffers are reused, but only once no tensor (or view) made from them is left."""
    shard_dir, _ = shards
    train = loader(shard_dir, num_workers=workers, batch_size=2, real_exemplar_prob=0.5)

    def epoch(batches):  # epoch 5 every time: every pass yields the same batches
        train.set_epoch(5)
        return batches()

    expected = [snapshot(b) for b in epoch(train.__iter__)]  # copied at once: what each batch held when yielded
    assert len(expected) > SLOTS * max(workers, 1) + 2  # more batches than slots and buffers to reuse
    held = list(epoch(train.__iter__))
    compact = list(epoch(train.compact_batches))
    map_views = [b["input_map"][:, 3] for b in epoch(train.__iter__)]  # a view keeps its buffer too
    image_views = [b["exemplar"][:1] for b in epoch(train.compact_batches)]
    for i, want in enumerate(expected):
        assert held[i]["key"] == compact[i]["key"] == want["key"]
        for name in FIELDS:
            assert torch.equal(held[i][name], want[name]), name
        torch.testing.assert_close(compact[i]["image"].float() / 127.5 - 1, want["image"], rtol=0, atol=1e-6)
        assert torch.equal(compact[i]["flow"], want["flow"]) and torch.equal(compact[i]["is_pseudo"], want["is_pseudo"])
        assert torch.equal(map_views[i], want["input_map"][:, 3])
        assert torch.equal(image_views[i], compact[i]["exemplar"][:1])


def test_slots_and_buffers_are_reused_and_all_released(shards, monkeypatch):
    shard_dir, _ = shards
    new_buffers = []
    make = BufferPool.new_buffer
    monkeypatch.setattr(BufferPool, "new_buffer", staticmethod(lambda nbytes: new_buffers.append(nbytes) or make(nbytes)))
    train = loader(shard_dir, num_workers=2, batch_size=2)
    next(iter(train))  # an epoch dropped after one batch: the DataLoader discards the prefetched ones
    for epoch in range(3):
        before = len(new_buffers)
        for batch in train:
            pass
        del batch
        assert not train.slots.state.any()  # every slot was given back, the dropped epoch's too
        if epoch:
            assert len(new_buffers) == before  # model-ready buffers are reused, never allocated again
    images = []
    for batch in train:  # keeping only the images (as an evaluation does) keeps only their buffers
        images.append(batch["image"])
    del batch
    assert len(images) > 4 and not train.slots.state.any()
    held = new_buffers[before:]  # new buffers only for the held images: the maps' and exemplars' were reused
    assert len(images) - 4 <= len(held) <= len(images) and set(held) == {images[0].nbytes}


def test_truncated_shard_is_a_clear_error(shards, tmp_path):
    shard_dir, manifest = shards
    info = manifest["splits"]["train"]["shards"][0]
    data = (shard_dir / info["name"]).read_bytes()
    (tmp_path / info["name"]).write_bytes(data[: len(data) // 2])
    short = dict(manifest, splits={"train": {"samples": info["samples"], "shards": [info]}})
    (tmp_path / "manifest.json").write_text(json.dumps(short))
    with pytest.raises(DataError, match=f"{info['name']}: unreadable tar"):
        list(loader(tmp_path))


def _sum_in_child(tensors, queue):
    # numpy, not torch: a torch op in a child forked after the parent used OpenMP threads can hang (GNU OpenMP)
    queue.put([float(t.numpy().sum(dtype=np.float64)) for t in tensors])


def test_held_batches_are_readable_in_forked_children(shards):
    """Free model-ready buffers are kept out of forked children (no copy-on-write), held ones are not."""
    shard_dir, _ = shards
    context = multiprocessing.get_context("fork")
    train = loader(shard_dir, num_workers=2)
    for _ in range(2):  # the second batch reuses the first one's buffer, which was free during a fork
        batch = next(iter(train))
        tensors = [batch[name] for name in ("image", "input_map", "flow")]
        queue = context.Queue()
        child = context.Process(target=_sum_in_child, args=(tensors, queue))
        child.start()
        child.join(timeout=60)
        assert child.exitcode == 0
        assert queue.get(timeout=10) == [float(t.numpy().sum(dtype=np.float64)) for t in tensors]
        del batch, tensors
        idle = context.Process(target=int)  # a fork while the buffer is free
        idle.start()
        idle.join(timeout=60)
