"""Shards: schema, manifest, byte-identical reruns, resuming an interrupted run, the DVC stage entry points."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml

import pipeline.data.shards as shards_module
from pipeline.data.config import DataConfig, ShardConfig
from pipeline.data.imageio import decode_jpeg, decode_png
from pipeline.params import load_params
from tests.test_data_helpers import build_shards, tiny_shard_config

REPO = Path(__file__).resolve().parents[1]
MEMBERS = {"input.png", "image.jpg", "exemplar.jpg", "exemplar_input.png", "meta.json",  # and per pseudo exemplar:
           "pseudo.0.jpg", "pseudo_input.0.png", "pseudo_flow.0.npy", "pseudo.1.jpg", "pseudo_input.1.png",
           "pseudo_flow.1.npy"}


def tar_samples(path):
    """{key: {suffix: bytes}} and the raw TarInfo headers of one shard."""
    samples, headers = {}, []
    with tarfile.open(path) as tar:
        for info in tar.getmembers():
            headers.append(info)
            key, suffix = info.name.split(".", 1)
            samples.setdefault(key, {})[suffix] = tar.extractfile(info).read()
    return samples, headers


def meta_name(members):
    return json.loads(members["meta.json"])["name"]


def shard_bytes(shard_dir):
    return {p.name: p.read_bytes() for p in sorted(shard_dir.glob("*.tar"))}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_shards(tmp_path_factory.mktemp("built"))


def test_manifest_lists_every_shard_with_counts_and_sha256(built):
    shard_dir, manifest = built
    assert manifest["format"] == "cocosnet-wds/3" and manifest["label_nc"] == 12 and manifest["pseudo_per_image"] == 2
    assert manifest["image_size"] == [32, 32] and manifest["input_encoding"] == "ids"
    assert manifest["class_channels"] == [0, 12]  # class ids: every one-hot channel is a class mask
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert train["images"] + val["images"] == 16 and val["images"] == 4  # val_fraction 0.25
    assert train["samples"] == train["images"] and val["samples"] == 4  # one sample per image
    assert len(train["shards"]) == 4 and len(val["shards"]) == 4  # min_shards_per_split
    assert manifest["pairing"]["self_pairs"] == {"train": 0, "val": 0}
    for info in train["shards"] + val["shards"]:
        data = (shard_dir / info["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == info["sha256"]
        assert len(tar_samples(shard_dir / info["name"])[0]) == info["samples"]
    on_disk = json.loads((shard_dir / "manifest.json").read_text())
    assert on_disk["splits"] == manifest["splits"] and "shard" in on_disk["params"]


def test_retrieval_lists_rank_training_images_in_the_official_format(built):
    """retrieval_<split>.txt: "name,ref1,...,refk", the k nearest training images; the first is the exemplar."""
    shard_dir, manifest = built
    assert manifest["pairing"]["retrieval_lists"] == {"train": "retrieval_train.txt", "val": "retrieval_val.txt"}
    exemplar_of = {}
    for info in manifest["splits"]["train"]["shards"] + manifest["splits"]["val"]["shards"]:
        for members in tar_samples(shard_dir / info["name"])[0].values():
            meta = json.loads(members["meta.json"])
            exemplar_of[meta["name"]] = meta["exemplar"]
    train_names = set()
    for split, count in (("train", 12), ("val", 4)):
        rows = [line.split(",") for line in (shard_dir / f"retrieval_{split}.txt").read_text().splitlines()]
        assert len(rows) == count and all(len(row) == 1 + 5 for row in rows)  # shard.retrieval_top_k: 5
        assert all(row[0] not in row[1:] and len(set(row[1:])) == 5 for row in rows)
        assert all(exemplar_of[row[0]] == row[1] for row in rows)  # the shards' retrieved exemplar is the first
        train_names |= {row[0] for row in rows} if split == "train" else set()
    val_refs = {ref for line in (shard_dir / "retrieval_val.txt").read_text().splitlines() for ref in line.split(",")[1:]}
    assert val_refs <= train_names  # references come from the training split only


def test_samples_follow_the_schema(built):
    shard_dir, manifest = built
    keys = set()
    for info in manifest["splits"]["train"]["shards"]:
        samples, headers = tar_samples(shard_dir / info["name"])
        assert all(h.mtime == 0 and h.uid == 0 and h.gid == 0 and h.uname == "" for h in headers)
        for key, members in samples.items():
            keys.add(key)
            assert set(members) == MEMBERS
            assert key == f"synthetic/{meta_name(members)}"
            meta = json.loads(members["meta.json"])
            assert meta["key"] == key and meta["exemplar"] != meta["name"]
            assert meta["pairing"] == "retrieved" and len(meta["palette"]) == 12 and meta["exemplar_palette"]
            assert meta["self_pair"] is None  # synthetic data lists no self pairs
            assert decode_jpeg(members["image.jpg"]).shape == (32, 32, 3)
            assert decode_png(members["input.png"]).max() < 12
            assert len(meta["augmentation"]) == 2  # the sampled distortion of each pseudo exemplar
            for k in (0, 1):
                flow = np.load(io.BytesIO(members[f"pseudo_flow.{k}.npy"]), allow_pickle=False)
                assert flow.dtype == np.float16 and flow.shape == (2, 32, 32)
                assert np.isfinite(flow).mean() > 0.3
                assert any(p["transform"] == "Affine" for p in meta["augmentation"][k])
            assert members["pseudo.0.jpg"] != members["pseudo.1.jpg"]  # two different distortions
            assert meta["augmentation"][0] != meta["augmentation"][1]
    assert len(keys) == manifest["splits"]["train"]["images"]  # one sample per image
    report = json.loads((shard_dir.parent / "reports" / "shard_report.json").read_text())
    assert report["status"] == "ok" and report["skipped"] == []


def test_same_params_give_byte_identical_shards(built, tmp_path):
    shard_dir, manifest = built
    again_dir, again = build_shards(tmp_path)
    assert shard_bytes(again_dir) == shard_bytes(shard_dir)
    assert again["splits"] == manifest["splits"]
    other_dir, _ = build_shards(tmp_path / "seed1", seed=1)
    assert shard_bytes(other_dir) != shard_bytes(shard_dir)


def test_parallel_writers_give_the_same_bytes(built, tmp_path):
    shard_dir, _ = built
    parallel_dir, _ = build_shards(tmp_path, shard_cfg=tiny_shard_config(num_workers=2))
    assert shard_bytes(parallel_dir) == shard_bytes(shard_dir)


def test_interrupted_run_resumes_skipping_complete_shards(built, tmp_path, monkeypatch):
    reference = shard_bytes(built[0])
    real_build = shards_module.build_sample
    calls = {"n": 0}

    def failing_build(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 7:  # 3 samples per train shard: dies in the middle of the third
            raise KeyboardInterrupt
        return real_build(*args, **kwargs)

    monkeypatch.setattr(shards_module, "build_sample", failing_build)
    with pytest.raises(KeyboardInterrupt):
        build_shards(tmp_path)
    shard_dir = tmp_path / "shards"
    complete = sorted(p.name for p in shard_dir.glob("*.tar"))
    assert complete == ["train-00000.tar", "train-00001.tar"]  # nothing half-written under a final name
    assert not list(shard_dir.glob(".*.tmp")) and not (shard_dir / "manifest.json").exists()
    mtimes = {name: (shard_dir / name).stat().st_mtime_ns for name in complete}

    monkeypatch.setattr(shards_module, "build_sample", real_build)
    calls["n"] = 0
    build_shards(tmp_path)
    assert {name: (shard_dir / name).stat().st_mtime_ns for name in complete} == mtimes  # skipped, not rewritten
    assert shard_bytes(shard_dir) == reference


def test_a_tar_the_stage_did_not_finish_is_rewritten_not_accepted(built, tmp_path):
    reference = shard_bytes(built[0])
    shard_dir, _ = build_shards(tmp_path)
    truncated, unrecorded = shard_dir / "train-00000.tar", shard_dir / "val-00001.tar"
    truncated.write_bytes(reference["train-00000.tar"][:1000])
    flipped = bytearray(reference["train-00001.tar"])
    flipped[-2000] ^= 0xFF  # same size, other bytes
    (shard_dir / "train-00001.tar").write_bytes(bytes(flipped))
    records = json.loads((shard_dir / "completed.json").read_text())
    del records["val-00001.tar"]  # e.g. renamed into place by something else than this stage
    (shard_dir / "completed.json").write_text(json.dumps(records))
    untouched = (shard_dir / "val-00000.tar").stat().st_mtime_ns
    shard_dir, manifest = build_shards(tmp_path)
    assert shard_bytes(shard_dir) == reference and unrecorded.exists()
    assert (shard_dir / "val-00000.tar").stat().st_mtime_ns == untouched  # vouched for: kept
    for info in manifest["splits"]["train"]["shards"] + manifest["splits"]["val"]["shards"]:
        assert info["sha256"] == hashlib.sha256(reference[info["name"]]).hexdigest()


def test_changed_params_rebuild_instead_of_reusing(built, tmp_path):
    build_shards(tmp_path)
    shard_dir, manifest = build_shards(tmp_path, shard_cfg=tiny_shard_config(pseudo_per_image=1,
                                                                              samples_per_shard=100,
                                                                              min_shards_per_split=1))
    assert sorted(p.name for p in shard_dir.glob("*.tar")) == ["train-00000.tar", "val-00000.tar"]
    assert manifest["splits"]["train"]["samples"] == 12


def test_stages_run_from_params_yaml(tmp_path, monkeypatch):
    from pipeline.cli import main

    params = {
        "data": {"source": "synthetic", "root": None, "task": "edge", "image_size": 64, "label_nc": 1, "seed": 0,
                 "synthetic": {"num_images": 12}, "ade20k": {}},
        "shard": {"pseudo_per_image": 1, "samples_per_shard": 4, "val_fraction": 0.2, "num_workers": 1,
                  "augment": {"elastic_prob": 0.0}},
        "model": {"nef": 8},  # every section is checked by every stage (tests/test_params.py)
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    assert main(["prepare"]) == 0
    assert main(["shard"]) == 0
    manifest = json.loads((tmp_path / "data/shards/manifest.json").read_text())
    assert manifest["task"] == "edge" and manifest["input_encoding"] == "channels"
    assert manifest["class_channels"] is None  # an edge map does not say which class a pixel is
    assert manifest["params"]["data"]["synthetic"] == {"num_images": 12}
    assert json.loads((tmp_path / "reports/shard_report.json").read_text())["status"] == "ok"


def test_params_are_typed_and_checked(tmp_path):
    repo_params = load_params(REPO / "params.yaml")  # the repository's params.yaml is valid
    DataConfig.from_params(repo_params["data"])
    ShardConfig.from_params(repo_params["shard"])
    with pytest.raises(ValueError, match="unknown keys"):
        ShardConfig.from_params({"pseudo_per_img": 2})
    with pytest.raises(ValueError, match="unknown keys"):
        ShardConfig.from_params({"augment": {"rotate": 3}})
    with pytest.raises(ValueError, match="data.task"):
        DataConfig.from_params({"task": "depth"})
    bad = tmp_path / "params.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        load_params(bad)


def test_dvc_stages_declare_their_inputs_and_outputs():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert stages["prepare"]["cmd"] == "python -m stages.prepare"
    assert stages["shard"]["cmd"] == "python -m stages.shard"
    for name in ("prepare", "shard"):
        assert {"pipeline/data", "pipeline/params.py", f"stages/{name}.py"} <= set(stages[name]["deps"])
    assert "data/prepared" in stages["shard"]["deps"]
    outs = {next(iter(o)) if isinstance(o, dict) else o for s in stages.values() for o in s.get("outs", [])}
    assert {"data/prepared", "data/shards", "reports/shard_report.json"} <= outs
    assert stages["prepare"]["params"] == ["data"] and "shard" in stages["shard"]["params"]
