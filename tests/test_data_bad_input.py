"""Bad input: every case is a clear error naming the file, or a skip recorded with its reason."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.data.errors import DataError
from pipeline.data.prepare import prepare_dataset
from pipeline.data.shards import write_shards
from pipeline.data.sources import get_source
from tests.test_data_helpers import (make_ade20k, make_celebahq, make_deepfashion, make_folder, tiny_shard_config,
                                     write_image)


def ade20k(root, label_nc=151):
    return get_source("ade20k", root=str(root), task="mask", image_size=32, label_nc=label_nc)


def deepfashion(root):
    return get_source("deepfashion", root=str(root), task="pose", image_size=32, label_nc=20)


def skipped_after_prepare(source, out):
    """Run the prepare stage; -> {file: reason} of the skipped items."""
    index = prepare_dataset(source, out, progress=False)
    return {s["file"]: s["reason"] for s in index["skipped"]}


@pytest.fixture
def ade_root(tmp_path):
    return make_ade20k(tmp_path / "ADE", n_train=6, n_val=2)


def test_corrupt_image_is_skipped_with_its_reason(ade_root, tmp_path):
    photo = ade_root / "images" / "training" / "ADE_train_00000001.jpg"
    photo.write_bytes(b"this is not a jpeg at all" * 10)
    skipped = skipped_after_prepare(ade20k(ade_root), tmp_path / "prepared")
    assert list(skipped) == [str(photo)] and "corrupt or truncated image" in skipped[str(photo)]


def test_truncated_image_is_skipped(ade_root, tmp_path):
    photo = ade_root / "images" / "training" / "ADE_train_00000002.jpg"
    photo.write_bytes(photo.read_bytes()[: len(photo.read_bytes()) // 2])
    skipped = skipped_after_prepare(ade20k(ade_root), tmp_path / "prepared")
    assert list(skipped) == [str(photo)] and "truncated" in skipped[str(photo)]


def test_missing_label_file_is_skipped(ade_root, tmp_path):
    annotation = ade_root / "annotations" / "validation" / "ADE_val_00000000.png"
    annotation.unlink()
    skipped = skipped_after_prepare(ade20k(ade_root), tmp_path / "prepared")
    assert list(skipped) == [str(annotation)] and "missing annotation" in skipped[str(annotation)]


def test_photo_and_map_size_mismatch_is_skipped(ade_root, tmp_path):
    annotation = ade_root / "annotations" / "training" / "ADE_train_00000003.png"
    write_image(annotation, np.zeros((20, 20), np.uint8))
    skipped = skipped_after_prepare(ade20k(ade_root), tmp_path / "prepared")
    assert list(skipped) == [str(annotation)] and "does not match" in skipped[str(annotation)]


def test_label_id_at_or_above_label_nc_is_skipped(ade_root, tmp_path):
    annotation = ade_root / "annotations" / "training" / "ADE_train_00000000.png"
    labels = np.zeros((40, 48), np.uint8)
    labels[5, 5] = 151
    write_image(annotation, labels)
    skipped = skipped_after_prepare(ade20k(ade_root), tmp_path / "prepared")
    assert skipped == {str(annotation): "label id 151 >= label_nc 151"}


@pytest.mark.parametrize("name, make, cfg", [
    ("ade20k", lambda root: (root / "images" / "training").mkdir(parents=True), dict(task="mask", label_nc=151)),
    ("celebahq_edge", lambda root: (root / "CelebA-HQ-img").mkdir(parents=True), dict(task="edge", label_nc=1)),
    ("deepfashion", lambda root: (root / "img").mkdir(parents=True), dict(task="pose", label_nc=20)),
    ("folder", lambda root: root.mkdir(parents=True), dict(task="edge", label_nc=1)),
])
def test_empty_dataset_is_an_error_naming_the_folder(tmp_path, name, make, cfg):
    root = tmp_path / "empty"
    make(root)
    with pytest.raises(DataError, match=f"{root}.*empty dataset"):
        prepare_dataset(get_source(name, root=str(root), image_size=32, **cfg), tmp_path / "prepared")


def test_missing_dataset_folder_is_an_error(tmp_path):
    with pytest.raises(DataError, match="dataset folder not found"):
        get_source("folder", root=str(tmp_path / "nowhere"), task="edge", image_size=32, label_nc=1).items()
    with pytest.raises(DataError, match="needs data.root"):
        get_source("folder", root=None, task="edge", image_size=32, label_nc=1).items()


def test_unreadable_pose_file_is_skipped(tmp_path):
    root = make_deepfashion(tmp_path / "df", n=4)
    subset = next((root / "pose").rglob("*_subset.txt"))
    subset.write_text("0 1 two three\n")
    skipped = skipped_after_prepare(deepfashion(root), tmp_path / "prepared")
    assert list(skipped) == [str(subset)] and "unreadable pose file" in skipped[str(subset)]


def test_missing_pose_file_is_skipped(tmp_path):
    root = make_deepfashion(tmp_path / "df", n=4)
    candidate = sorted((root / "pose").rglob("*_candidate.txt"))[1]
    candidate.unlink()
    skipped = skipped_after_prepare(deepfashion(root), tmp_path / "prepared")
    assert skipped == {str(candidate): "pose file is missing"}


def test_pose_outside_the_photo_is_a_size_mismatch(tmp_path):
    root = make_deepfashion(tmp_path / "df", n=4)
    candidate = sorted((root / "pose").rglob("*_candidate.txt"))[2]
    values = np.loadtxt(candidate)
    values[:, :2] *= 16  # keypoints of a 1024-pixel photo next to a 64-pixel one
    np.savetxt(candidate, values)
    skipped = skipped_after_prepare(deepfashion(root), tmp_path / "prepared")
    assert list(skipped) == [str(candidate)] and "sizes do not match" in skipped[str(candidate)]


def test_skips_are_reported_and_counted_in_the_manifest(ade_root, tmp_path):
    bad = ade_root / "images" / "training" / "ADE_train_00000004.jpg"
    bad.write_bytes(b"\xff\xd8garbage")
    prepare_dataset(ade20k(ade_root), tmp_path / "prepared", progress=False)
    report_path = tmp_path / "reports" / "shard_report.json"
    manifest = write_shards(tmp_path / "prepared", tmp_path / "shards", tiny_shard_config(max_skipped_fraction=0.2),
                            report_path=report_path, progress=False)
    assert manifest["skipped"]["count"] == 1 and manifest["skipped"]["fraction"] == pytest.approx(1 / 8)
    report = json.loads(report_path.read_text())
    assert report["status"] == "ok"
    assert report["skipped"] == [{"file": str(bad), "reason": report["skipped"][0]["reason"], "stage": "prepare"}]
    assert manifest["splits"]["train"]["images"] == 5 and manifest["splits"]["val"]["images"] == 2  # ADE's split


def test_too_many_skips_fail_the_stage(ade_root, tmp_path):
    for i in (0, 1):
        (ade_root / "annotations" / "training" / f"ADE_train_{i:08d}.png").unlink()
    prepare_dataset(ade20k(ade_root), tmp_path / "prepared", progress=False)
    report_path = tmp_path / "reports" / "shard_report.json"
    with pytest.raises(DataError, match=r"2 of 8 images were skipped \(25.0% > shard.max_skipped_fraction 10.0%\)"):
        write_shards(tmp_path / "prepared", tmp_path / "shards", tiny_shard_config(max_skipped_fraction=0.1),
                     report_path=report_path, progress=False)
    report = json.loads(report_path.read_text())
    assert report["status"].startswith("failed") and len(report["skipped"]) == 2
    assert not list((tmp_path / "shards").glob("*.tar"))


def test_all_items_bad_is_an_error(tmp_path):
    root = make_folder(tmp_path / "photos", n=2)
    for photo in root.rglob("*.png"):
        photo.write_bytes(b"nope")
    with pytest.raises(DataError, match="all 2 items were skipped"):
        prepare_dataset(get_source("folder", root=str(root), task="edge", image_size=32, label_nc=1),
                        tmp_path / "prepared", progress=False)


def test_celebahq_corrupt_part_mask_is_skipped(tmp_path):
    root = make_celebahq(tmp_path / "celeba", n=3, with_parts=(1,))
    mask = next(root.rglob("00001_skin.png"))
    mask.write_bytes(b"\x89PNG broken")
    source = get_source("celebahq_edge", root=str(root), task="edge", image_size=32, label_nc=1)
    skipped = skipped_after_prepare(source, tmp_path / "prepared")
    assert list(skipped) == [str(mask)]
