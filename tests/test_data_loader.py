"""Loader: the compact batch contract and its expansion, exactly-once epochs across ranks x workers, per-epoch
pairs and pseudo exemplars from (seed, epoch, key), clear errors, no pickle."""
from __future__ import annotations

import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.data.errors import DataError
from pipeline.data.imageio import decode_jpeg
from pipeline.data.loader import make_loader, pseudo_variant, to_model
from tests.test_data_helpers import build_shards, tiny_shard_config

VARIANTS = 2  # tiny_shard_config: pseudo exemplars per image


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return build_shards(tmp_path_factory.mktemp("loader"))


def shard_members(shard_dir, manifest, split):
    """{key: {member: bytes}} of every sample of a split, read with tarfile."""
    samples = {}
    for info in manifest["splits"][split]["shards"]:
        with tarfile.open(shard_dir / info["name"]) as tar:
            for member in tar.getmembers():
                key, suffix = member.name.split(".", 1)
                samples.setdefault(key, {})[suffix] = tar.extractfile(member).read()
    return samples


def loader(shard_dir, **kw):
    return make_loader(shard_dir, **{"batch_size": 4, "num_workers": 0, **kw})


def keys_of(batches):
    return [key for batch in batches for key in batch["key"]]


def test_a_batch_is_compact_and_to_model_expands_it(shards):
    shard_dir, _ = shards
    batch = next(iter(loader(shard_dir, real_exemplar_prob=0.5)))
    assert set(batch) == {"image", "exemplar", "input_map", "exemplar_map", "is_pseudo", "pair", "key"}  # no flow
    assert [p != "real" for p in batch["pair"]] == batch["is_pseudo"].tolist() and "self" not in batch["pair"]
    for name in ("image", "exemplar"):
        assert batch[name].shape == (4, 3, 32, 32) and batch[name].dtype == torch.uint8
    for name in ("input_map", "exemplar_map"):
        assert batch[name].shape == (4, 32, 32) and batch[name].dtype == torch.uint8 and batch[name].max() < 12
    assert batch["is_pseudo"].dtype == torch.bool and len(batch["key"]) == 4

    model = to_model(batch, label_nc=12)
    assert model["input_map"].shape == (4, 12, 32, 32) and model["input_map"].dtype == torch.float32
    assert torch.equal(model["input_map"].argmax(1), batch["input_map"].long())
    assert torch.equal(model["input_map"].sum(1), torch.ones(4, 32, 32))  # one-hot
    torch.testing.assert_close(model["image"], batch["image"].float() / 127.5 - 1, rtol=0, atol=1e-6)  # [-1, 1]
    assert model["key"] == batch["key"] and torch.equal(model["is_pseudo"], batch["is_pseudo"])


def test_with_flow_adds_the_pseudo_pair_its_flow_and_meta(shards):
    shard_dir, _ = shards
    batch = next(iter(loader(shard_dir, real_exemplar_prob=1.0, with_flow=True)))
    assert not batch["is_pseudo"].any()  # exemplar: the real one; pseudo beside it
    assert batch["pseudo"].shape == (4, 3, 32, 32) and batch["pseudo_map"].shape == (4, 32, 32)
    assert batch["flow"].shape == (4, 2, 32, 32) and batch["flow"].dtype == torch.float16
    assert [m["key"] for m in batch["meta"]] == batch["key"] and "palette" in batch["meta"][0]
    model = to_model(batch, label_nc=12)
    assert model["flow"].dtype == torch.float32 and torch.isfinite(model["flow"]).all()
    assert torch.equal(model["flow_valid"], ~batch["flow"][:, :1].isnan()) and model["flow_valid"].float().mean() > 0.5
    assert model["pseudo_map"].shape == (4, 12, 32, 32)


@pytest.mark.parametrize("split", ["train", "val"])
def test_one_epoch_over_2_ranks_x_2_workers_reads_every_sample_once(shards, split, monkeypatch):
    shard_dir, manifest = shards
    seen = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))  # as Ray Train sets them
        monkeypatch.setenv("WORLD_SIZE", "2")
        rank_loader = make_loader(shard_dir, batch_size=3, split=split, num_workers=2)
        batches = list(rank_loader)
        assert len(batches) == len(rank_loader)
        seen += keys_of(batches)
    expected = list(shard_members(shard_dir, manifest, split))
    assert len(seen) == len(expected) == manifest["splits"][split]["samples"]
    assert sorted(seen) == sorted(expected)  # the union is every key, and no duplicates


def test_epochs_reshuffle_each_complete_and_replayable(shards):
    shard_dir, _ = shards
    train = loader(shard_dir, shuffle_buffer=8, num_workers=2)
    first, second = keys_of(train), keys_of(train)  # iterating again: the next epoch
    assert sorted(first) == sorted(second) and first != second
    train.set_epoch(0)
    assert keys_of(train) == first
    assert keys_of(loader(shard_dir, shuffle_buffer=8, num_workers=2)) == first  # a new loader: the same epoch 0


def test_pairs_are_chosen_per_sample_from_seed_epoch_and_key(shards):
    shard_dir, _ = shards

    def choices(epoch=0, **kw):
        train = loader(shard_dir, **kw)
        train.set_epoch(epoch)
        return {k: bool(p) for b in train for k, p in zip(b["key"], b["is_pseudo"])}

    half = choices(real_exemplar_prob=0.5, seed=3)
    assert 0 < sum(half.values()) < len(half)
    assert choices(real_exemplar_prob=0.5, seed=3, num_workers=2, batch_size=3) == half  # not the worker split
    assert choices(1, real_exemplar_prob=0.5, seed=3) != half  # another epoch, other pairs
    assert all(choices(real_exemplar_prob=0.0).values()) and not any(choices(real_exemplar_prob=1.0).values())


def test_every_epoch_shows_a_new_stored_pseudo_exemplar_until_all_were_used(shards):
    """The pseudo exemplar of a sample is stored variant pseudo_variant(key, K, seed, epoch): a permutation of
    the K stored ones per K epochs (then another), the same on every worker."""
    shard_dir, manifest = shards
    stored = shard_members(shard_dir, manifest, "train")
    shown = {}
    for epoch in range(2 * VARIANTS):
        train = loader(shard_dir, num_workers=2)
        train.set_epoch(epoch)
        for batch in train:
            for key, image in zip(batch["key"], batch["exemplar"]):
                k = pseudo_variant(key, VARIANTS, 0, epoch)
                expected = decode_jpeg(stored[key][f"pseudo.{k}.jpg"])
                assert np.array_equal(image.permute(1, 2, 0).numpy(), expected), (key, epoch)
                shown.setdefault(key, []).append(k)
    for key, variants in shown.items():
        assert sorted(variants[:VARIANTS]) == sorted(variants[VARIANTS:]) == list(range(VARIANTS)), key


def test_flow_maps_x_b_into_the_pseudo_exemplar(shards):
    """Sampling the pseudo exemplar's map at the flow gives x_B's map back (photometric jitter cannot blur this)."""
    shard_dir, _ = shards
    batch = to_model(next(iter(loader(shard_dir, batch_size=8, with_flow=True, real_exemplar_prob=1.0))), 12)
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


def test_edge_maps_arrive_as_their_channels(tmp_path):
    shard_dir, _ = build_shards(tmp_path, task="edge", label_nc=1,
                                shard_cfg=tiny_shard_config(pseudo_per_image=1, min_shards_per_split=1))
    batch = next(iter(make_loader(shard_dir, batch_size=2, num_workers=0)))
    assert batch["input_map"].shape == (2, 1, 32, 32) and batch["input_map"].dtype == torch.uint8
    assert set(to_model(batch, 1)["input_map"].unique().tolist()) == {0.0, 1.0}


def test_planar_images_are_the_decoded_jpeg(shards):
    shard_dir, manifest = shards
    batch = next(iter(loader(shard_dir, shuffle=False)))
    stored = shard_members(shard_dir, manifest, "train")[batch["key"][0]]
    assert torch.equal(batch["image"][0].permute(1, 2, 0), torch.from_numpy(decode_jpeg(stored["image.jpg"])))


def test_missing_split_and_manifest_are_clear_errors(shards, tmp_path):
    shard_dir, _ = shards
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
            if ".pseudo_flow." in member.name:
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
    with pytest.raises(DataError, match="the shard is truncated or was replaced"):  # the manifest's size
        list(loader(evil_dir, with_flow=True))
    with pytest.raises(DataError, match="refusing NPY"):  # and past the manifest check, the decoder
        list(loader(evil_dir, with_flow=True, verify="none"))
    assert not marker.exists()


def test_fewer_shards_than_workers_or_ranks_still_reads_everything_once(shards, tmp_path, monkeypatch):
    shard_dir, manifest = shards
    small = tmp_path / "small"
    small.mkdir()
    info = manifest["splits"]["val"]["shards"][0]
    shutil.copy(shard_dir / info["name"], small / info["name"])
    small_manifest = dict(manifest, splits={"train": {"samples": 0, "shards": []},
                                            "val": {"samples": info["samples"], "shards": [info]}})
    (small / "manifest.json").write_text(json.dumps(small_manifest))
    keys = keys_of(loader(small, split="val", num_workers=2))
    assert len(keys) == info["samples"] == len(set(keys))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    rank_1 = loader(small, split="val", num_workers=2)
    assert len(rank_1) == 0 and list(rank_1) == []  # no shard for rank 1


def one_shard_copy(shards, folder, data_of=lambda data, other: data):
    """folder/ with the first train shard, its bytes changed by data_of(bytes, the second shard's bytes), and a
    manifest listing it as the original."""
    shard_dir, manifest = shards
    info, other = manifest["splits"]["train"]["shards"][:2]
    data = data_of((shard_dir / info["name"]).read_bytes(), (shard_dir / other["name"]).read_bytes())
    (folder / info["name"]).write_bytes(data)
    one = dict(manifest, splits={"train": {"samples": info["samples"], "shards": [info]}})
    (folder / "manifest.json").write_text(json.dumps(one))
    return folder / info["name"]


def test_a_truncated_shard_is_named_before_it_is_read(shards, tmp_path):
    path = one_shard_copy(shards, tmp_path, lambda data, _: data[: len(data) // 2])
    with pytest.raises(DataError, match=f"{path}: .* bytes, the manifest says .*truncated"):
        list(loader(tmp_path, verify="size"))
    with pytest.raises(DataError, match=f"{path}: unreadable tar"):  # unverified, the tar reader still notices
        list(loader(tmp_path, verify="none"))


def cut_at_a_header(data: bytes, _) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
    return data[: members[len(members) // 2].offset]


def test_a_shard_cut_at_a_header_is_not_taken_for_a_shorter_one(shards, tmp_path):
    """tarfile reads a tar cut between members as a complete shorter archive; its missing end blocks give it away."""
    path = one_shard_copy(shards, tmp_path, cut_at_a_header)
    with pytest.raises(DataError, match=rf"{path}: unreadable tar \(truncated: no end-of-archive blocks"):
        list(loader(tmp_path, verify="none"))


def flip_a_jpeg_byte(data: bytes, _) -> bytes:
    at = data.index(b"\xff\xd8\xff") + 600  # inside the first JPEG's entropy-coded data
    return data[:at] + bytes([data[at] ^ 0x55]) + data[at + 1:]


def test_a_flipped_byte_or_a_swapped_shard_fails_the_sha256(shards, tmp_path):
    path = one_shard_copy(shards, tmp_path, flip_a_jpeg_byte)
    with pytest.raises(DataError, match=f"{path}: sha256 .* differs from the manifest's .*corrupt"):
        list(loader(tmp_path))
    assert len(keys_of(loader(tmp_path, verify="size"))) > 0  # same size: only the hash sees it (and JPEG does not)
    (tmp_path / "swapped").mkdir()
    swapped = one_shard_copy(shards, tmp_path / "swapped", lambda _, other: other)  # same sample count here
    with pytest.raises(DataError, match=f"{swapped}: (sha256|.* bytes, the manifest says)"):
        list(loader(tmp_path / "swapped"))


def test_each_shard_is_hashed_once_per_process(shards, monkeypatch):
    import pipeline.data.schema as schema

    schema.verify_shard.cache_clear()
    calls = []
    real = schema.hashlib.sha256
    monkeypatch.setattr(schema.hashlib, "sha256", lambda *a: calls.append(1) or real(*a))
    epochs = loader(shards[0])
    for _ in range(3):
        list(epochs)
    list(loader(shards[0]))  # another loader in the same process
    assert len(calls) == len(shards[1]["splits"]["train"]["shards"])
