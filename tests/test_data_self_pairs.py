"""Self pairs, the official --video_like: DeepFashion's deepfashion_self_pair.txt (the same person in another pose)
-> prepare -> shard members -> the loader's supervised pairs under train.video_like."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from pipeline.data.errors import DataError
from pipeline.data.imageio import decode_jpeg, decode_map, decode_npy
from pipeline.data.loader import make_loader, pseudo_variant
from pipeline.data.prepare import prepare_dataset
from pipeline.data.sources import get_source
from pipeline.params import load_params, section
from pipeline.train.config import TrainConfig
from tests.conftest import REPO_ROOT
from tests.test_data_helpers import build_shards, make_deepfashion, make_folder
from tests.test_data_loader import shard_members

SOURCE = dict(source="deepfashion", task="pose", image_size=32, label_nc=20)
PERSON = "img/MEN/Denim/id_{:08d}/0{}_1_front"  # make_deepfashion: person i // 2, pose i % 2
SELF_PAIRS = "\n".join([  # the official spellings: backslashes, with and without "img/"
    r"img\MEN\Denim\id_00000000\00_1_front.jpg,img\MEN\Denim\id_00000000\01_1_front.jpg",
    "img/MEN/Denim/id_00000000/01_1_front.jpg,img/MEN/Denim/id_00000000/00_1_front.jpg",
    # the first listed is no image (counted unmatched), the next one is used
    "MEN/Denim/id_00000001/00_1_front.jpg,img/MEN/Denim/id_00000009/00_1_front.jpg,"
    "MEN/Denim/id_00000001/01_1_front.jpg",
    "img/MEN/Denim/id_00000002/00_1_front.jpg,img/MEN/Denim/id_00000002/00_1_front.jpg",  # only itself: no pair
    "img/WOMEN/Dresses/id_00000005/02_1_front.jpg,img/MEN/Denim/id_00000002/01_1_front.jpg",  # not in the dataset
]) + "\n"
WITH_PAIR = {PERSON.format(0, 0): PERSON.format(0, 1), PERSON.format(0, 1): PERSON.format(0, 0),
             PERSON.format(1, 0): PERSON.format(1, 1)}


def key(name):
    return f"deepfashion/{name}"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """8 images (4 people x 2 poses), persons 0-2 train, person 3 val; 3 train samples have a self pair."""
    work = tmp_path_factory.mktemp("self_pairs")
    root = make_deepfashion(work / "deepfashionHD", n=8)
    names = [PERSON.format(i // 2, i % 2) + ".jpg" for i in range(8)]
    (root / "train.txt").write_text("\n".join(names[:6]) + "\n")
    (root / "val.txt").write_text("\n".join(names[6:]) + "\n")
    (root / "deepfashion_self_pair.txt").write_text(SELF_PAIRS)
    shard_dir, manifest = build_shards(work, root=str(root), **SOURCE)
    return shard_dir, manifest, shard_members(shard_dir, manifest, "train")


def chw(jpeg: bytes) -> torch.Tensor:
    return torch.from_numpy(decode_jpeg(jpeg)).permute(2, 0, 1)


def loader(shard_dir, **kw):
    return make_loader(shard_dir, **{"batch_size": 3, "num_workers": 0, "real_exemplar_prob": 0.0, **kw})


def test_the_self_pair_list_resolves_the_official_spellings_and_counts_what_matches_nothing(shards):
    shard_dir, _, _ = shards
    index = json.loads((shard_dir.parent / "prepared" / "index.json").read_text())
    assert index["self_pairs"] == {k: [v] for k, v in WITH_PAIR.items()}  # an image is not its own pair
    assert index["self_unmatched"] == 2  # id_00000009 and the WOMEN image
    report = json.loads((shard_dir.parent / "reports" / "shard_report.json").read_text())
    assert report["self_unmatched"] == 2 and report["pairing"]["self_pairs"] == {"train": 3, "val": 0}


def test_the_prepare_stage_prints_the_pairing_counts(tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    root = make_deepfashion(tmp_path / "deepfashionHD", n=8)
    (root / "deepfashion_self_pair.txt").write_text(SELF_PAIRS)
    params = {"data": {**SOURCE, "image_size": 64, "root": str(root)}}
    (tmp_path / "params.yaml").write_text(json.dumps(params))  # JSON is YAML
    monkeypatch.chdir(tmp_path)
    assert main(["prepare"]) == 0
    assert "8 images ready, 0 skipped; pairing lists: 0 listed exemplars, 3 self pairs, 2 names that match no " \
           "image" in capsys.readouterr().out


def test_a_folder_lists_exemplars_and_self_pairs_by_relative_path_or_file_name(tmp_path):
    root = make_folder(tmp_path / "photos", n=4)  # a/photo 1.v2.png, a/photo 3.v2.png, b/photo 0.v2.png, ...
    (root / "pairs.txt").write_text("a/photo 1.v2.png,b/photo 0.v2.png\n")
    (root / "self_pairs.txt").write_text("photo 1.v2.png,a/photo 3.v2.png\nb/photo 2.v2.png,c/missing.png\n")
    source = get_source("folder", root=str(root), task="edge", image_size=32, label_nc=1)
    index = prepare_dataset(source, tmp_path / "prepared", progress=False)
    assert index["listed_pairs"] == {"a/photo_1_v2": ["b/photo_0_v2"]}
    assert index["self_pairs"] == {"a/photo_1_v2": ["a/photo_3_v2"]} and index["self_unmatched"] == 1


def test_a_broken_self_pair_line_names_the_file_and_line(tmp_path):
    root = make_deepfashion(tmp_path / "deepfashionHD", n=2)
    broken = "img/MEN/Denim/id_00000000/01_1_front.jpg"  # a name and no pair
    (root / "deepfashion_self_pair.txt").write_text(f"{SELF_PAIRS.splitlines()[0]}\n{broken}\n")
    source = get_source("deepfashion", root=str(root), task="pose", image_size=32, label_nc=20)
    with pytest.raises(DataError, match=r"deepfashion_self_pair\.txt:2: expected 'name,ref1,...'"):
        source.self_pair_lists()


def test_samples_with_a_self_pair_store_it_as_a_real_photo_without_flow(shards):
    _, manifest, samples = shards
    assert manifest["format"] == "cocosnet-wds/3"
    assert manifest["pairing"]["self_pairs"] == {"train": 3, "val": 0}
    assert manifest["pairing"]["unmatched"] == {"listed": 0, "self": 2}
    assert len(samples) == 6
    for sample_key, members in samples.items():
        name = json.loads(members["meta.json"])["name"]
        pair = WITH_PAIR.get(name)
        assert json.loads(members["meta.json"])["self_pair"] == pair
        assert ("self.jpg" in members) == ("self_input.png" in members) == (pair is not None)
        assert not any("flow" in m and "pseudo" not in m for m in members)  # the only flow is the pseudo exemplars'
        if pair:  # the same bytes as that image's own sample: its photo and its pose map
            assert members["self.jpg"] == samples[key(pair)]["image.jpg"]
            assert members["self_input.png"] == samples[key(pair)]["input.png"]


def pairs_by_epoch(shard_dir, epochs=3, **kw):
    """{epoch: {key: (pair, is_pseudo)}} read with a fresh loader per epoch (as a resumed run does)."""
    out = {}
    for epoch in range(epochs):
        train = loader(shard_dir, **kw)
        train.set_epoch(epoch)
        out[epoch] = {k: (p, bool(s)) for b in train for k, p, s in zip(b["key"], b["pair"], b["is_pseudo"])}
    return out


def test_video_like_trains_on_the_self_pair_where_a_sample_has_one(shards):
    shard_dir, _, samples = shards
    for batch in loader(shard_dir, video_like=True):
        assert batch["is_pseudo"].all()  # a self pair is supervised, as the official self_ref = 1
        for row, (sample_key, pair) in enumerate(zip(batch["key"], batch["pair"])):
            members = samples[sample_key]
            assert pair == ("self" if "self.jpg" in members else "pseudo")
            if pair == "self":
                assert torch.equal(batch["exemplar"][row], chw(members["self.jpg"]))
                pose = decode_map(members["self_input.png"], "channels", 20, "self_input.png")
                assert torch.equal(batch["exemplar_map"][row], torch.from_numpy(pose))
    for epoch, pairs in pairs_by_epoch(shard_dir, video_like=True).items():
        assert {k for k, (p, _) in pairs.items() if p == "self"} == {key(n) for n in WITH_PAIR}, epoch


def test_without_video_like_the_self_pair_is_never_read(shards):
    shard_dir, _, _ = shards
    for prob in (0.0, 0.5):
        plain = pairs_by_epoch(shard_dir, real_exemplar_prob=prob)
        assert all(p != "self" for pairs in plain.values() for p, _ in pairs.values())
        # video_like changes which supervised pair, never whether a sample is supervised
        video = pairs_by_epoch(shard_dir, real_exemplar_prob=prob, video_like=True)
        assert {e: {k: s for k, (_, s) in v.items()} for e, v in video.items()} == \
               {e: {k: s for k, (_, s) in v.items()} for e, v in plain.items()}
    mixed = pairs_by_epoch(shard_dir, real_exemplar_prob=0.5, video_like=True)
    assert {p for pairs in mixed.values() for p, _ in pairs.values()} == {"real", "self", "pseudo"}


def test_video_like_pairs_are_a_function_of_seed_epoch_and_key(shards):
    shard_dir, _, _ = shards
    first = pairs_by_epoch(shard_dir, real_exemplar_prob=0.5, video_like=True, seed=7)
    assert pairs_by_epoch(shard_dir, real_exemplar_prob=0.5, video_like=True, seed=7, num_workers=2,
                          batch_size=2) == first  # not the worker split or batch size
    assert len({tuple(sorted(p.items())) for p in first.values()}) > 1  # epochs differ


def test_the_evaluation_view_keeps_the_pseudo_exemplar_and_its_flow_beside_a_self_pair(shards):
    shard_dir, _, samples = shards
    batch = next(iter(loader(shard_dir, batch_size=6, video_like=True, with_flow=True)))
    assert set(batch["pair"]) == {"self", "pseudo"}
    for row, (sample_key, pair) in enumerate(zip(batch["key"], batch["pair"])):
        k = pseudo_variant(sample_key, 2, seed=0, epoch=0)  # the epoch's stored pseudo exemplar and its flow
        members = samples[sample_key]
        assert torch.equal(batch["pseudo"][row], chw(members[f"pseudo.{k}.jpg"]))
        flow = torch.from_numpy(decode_npy(members[f"pseudo_flow.{k}.npy"], "flow"))
        assert torch.equal(batch["flow"][row].nan_to_num(-1), flow.nan_to_num(-1))
        assert torch.equal(batch["exemplar"][row], batch["pseudo"][row]) == (pair == "pseudo")


def test_video_like_needs_shards_with_self_pairs(shards, tmp_path):
    shard_dir, manifest, _ = shards
    with pytest.raises(DataError, match=r"manifest.json: video_like needs self pairs, and no 'val' sample has one"):
        loader(shard_dir, split="val", video_like=True)
    old = tmp_path / "format2"  # shards written before self pairs: still read, never video_like
    shutil.copytree(shard_dir, old)
    manifest = {**manifest, "format": "cocosnet-wds/2",
                "pairing": {k: v for k, v in manifest["pairing"].items() if k not in ("self_pairs", "unmatched")}}
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert sum(len(b["key"]) for b in loader(old)) == 6
    with pytest.raises(DataError, match=rf"{old}/manifest.json: video_like needs self pairs"):
        loader(old, video_like=True)


def test_the_official_deepfashion_recipe_trains_video_like_on_self_pairs_only():
    assert TrainConfig().video_like is False
    for path in ("params/deepfashion-512-gpu.yaml", "params/deepfashion-v1.yaml"):
        train = TrainConfig.from_dict(section(load_params(REPO_ROOT / path), "train"))
        assert train.video_like and train.real_exemplar_prob == 0.0, path


def test_the_training_driver_refuses_video_like_without_self_pairs_before_it_starts_ray(train_shards, tmp_path):
    from pipeline.train.launch import resolve

    with pytest.raises(DataError, match=rf"{train_shards}/manifest.json: video_like needs self pairs"):
        resolve({"model": {}, "train": {"video_like": True}}, train_shards, tmp_path)


def test_the_training_driver_refuses_class_nce_without_class_channels(train_shards, tmp_path):
    """loss.class_nce reads a pixel's class from the maps; shards without class channels (edge or pose inputs,
    or written before the manifest recorded them) are refused, naming their manifest, before Ray starts."""
    from pipeline.train.launch import resolve

    manifest = json.loads((train_shards / "manifest.json").read_text())
    assert manifest["class_channels"] == [0, 12]
    resolve({"model": {}, "train": {"loss": {"class_nce": 1.0}}}, train_shards, tmp_path)
    old = tmp_path / "old"
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "class_channels"}))
    with pytest.raises(DataError, match=rf"{old}/manifest.json: loss.class_nce needs inputs that say each pixel"):
        resolve({"model": {}, "train": {"loss": {"class_nce": 1.0}}}, old, tmp_path)
