"""Each source on a tiny fake dataset in its on-disk layout; the synthetic generator; exemplar pairing."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.errors import DataError
from pipeline.data.maps import label_boundaries
from pipeline.data.pairing import choose_exemplars, describe_example, nearest_others, pairing_list, rank_others
from pipeline.data.pose import POSE_CHANNELS
from pipeline.data.prepare import prepare_dataset
from pipeline.data.sources import SOURCES, get_source
from pipeline.data.sources.synthetic import render
from tests.test_data_helpers import make_ade20k, make_celebahq, make_deepfashion, make_folder, write_image


def load_all(source):
    return {item.name: source.load(item) for item in source.items()}


# ---------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_render_is_pure():
    a = get_source("synthetic", task="mask", image_size=32, label_nc=12, seed=3, num_images=6)
    b = get_source("synthetic", task="mask", image_size=32, label_nc=12, seed=3, num_images=6)
    examples_a, examples_b = load_all(a), load_all(b)
    for name, example in examples_a.items():
        np.testing.assert_array_equal(example.photo, examples_b[name].photo)
        # The photo is exactly render(labels, palette): the ideal translation is computable.
        np.testing.assert_array_equal(example.photo, render(example.input_map, example.meta["palette"]))
    other_seed = load_all(get_source("synthetic", task="mask", image_size=32, label_nc=12, seed=4, num_images=6))
    assert any((examples_a[n].photo != other_seed[n].photo).any() for n in examples_a)


def test_synthetic_scenes_cover_classes_regions_and_textures():
    source = get_source("synthetic", task="mask", image_size=64, label_nc=12, seed=0, num_images=30)
    examples = list(load_all(source).values())
    classes = set().union(*(np.unique(e.input_map).tolist() for e in examples))
    assert len(classes) >= 9  # at least 8 semantic classes plus background
    assert all(len(np.unique(e.input_map)) >= 3 for e in examples)
    kinds = {entry["texture"]["kind"] for e in examples for entry in e.meta["palette"]}
    assert kinds == {"flat", "stripes", "checker", "dots", "gradient", "noise"}
    palette = examples[0].meta["palette"]
    assert len(palette) == 12 and all(len(entry["color"]) == 3 for entry in palette)


def test_grain_textures_make_most_matches_identifiable():
    """data.synthetic.textures: [grain] draws fine value noise in every region, so most pixels (all but noise
    extrema and saddles) can be told from their neighbours at any image size; the default draw is unchanged."""
    import torch

    from pipeline import metrics as M

    for size in (64, 128):
        source = get_source("synthetic", task="mask", image_size=size, label_nc=12, seed=0, num_images=4,
                            textures=["grain"])
        examples = list(load_all(source).values())
        assert {entry["texture"]["kind"] for e in examples for entry in e.meta["palette"]} == {"grain"}
        photos = torch.from_numpy(np.stack([e.photo for e in examples])).permute(0, 3, 1, 2).float() / 127.5 - 1
        rows, cols = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
        flow = torch.stack([rows, cols]).expand(len(examples), -1, -1, -1)
        valid = torch.ones(len(examples), 1, size, size, dtype=torch.bool)
        assert M.identifiable(photos, flow, valid, gradient=0.02).float().mean() > 0.4
    default = get_source("synthetic", task="mask", image_size=32, label_nc=12, seed=0, num_images=2)
    listed = get_source("synthetic", task="mask", image_size=32, label_nc=12, seed=0, num_images=2,
                        textures=["flat", "stripes", "checker", "dots", "gradient", "noise"])
    assert default.scene(1)[1] == listed.scene(1)[1]
    with pytest.raises(DataError, match="textures must be a non-empty list"):
        get_source("synthetic", task="mask", image_size=32, label_nc=12, textures=["fur"])


def test_synthetic_edges_of_the_photo_carry_the_texture_regions_only_their_boundaries():
    """data.synthetic.edges: "regions" (the default) draws region boundaries only, "photo" the Canny edges of the
    rendered photo, whose textures add edges inside the regions."""
    from pipeline.data.maps import label_boundaries

    options = dict(task="edge", image_size=64, label_nc=1, seed=0, num_images=3, textures=["checker"])
    regions = load_all(get_source("synthetic", **options))
    photo = load_all(get_source("synthetic", edges="photo", **options))
    for name, example in regions.items():
        labels = get_source("synthetic", **options).scene(int(name))[0]
        assert np.array_equal(example.input_map[0] > 0, label_boundaries(labels))
        inside = ~label_boundaries(labels)
        assert (photo[name].input_map[0][inside] > 0).mean() > 0.05  # the checkers' edges
        assert np.array_equal(photo[name].photo, example.photo)
    assert get_source("synthetic", edges="photo", **options).describe()["edges"] == "photo"
    with pytest.raises(DataError, match="edges must be one of"):
        get_source("synthetic", edges="canny", **options)


def test_synthetic_edges_with_classes_say_which_class_a_region_is():
    """data.synthetic.edges: "classes" is [boundaries and the photo's edges, one distance map per class, one mask per
    class]: a class's distance map is 0 on its own boundary, grows away from it, and is 255 ("far") for a class the
    image lacks, as the pseudo exemplars' distortions also fill it in."""
    from pipeline.data.maps import label_boundaries

    options = dict(task="edge", image_size=64, seed=0, num_images=3, textures=["checker"])
    source = get_source("synthetic", edges="classes", label_nc=25, **options)
    photo = load_all(get_source("synthetic", edges="photo", label_nc=1, **options))
    for name, example in load_all(source).items():
        labels = source.scene(int(name))[0]
        maps = example.input_map
        assert maps.shape == (25, 64, 64) and maps.dtype == np.uint8
        assert np.array_equal(maps[0] > 0, (photo[name].input_map[0] > 0) | label_boundaries(labels))
        for c in range(12):
            distance, mask, own = maps[1 + c], maps[13 + c], label_boundaries(labels == c)
            assert np.array_equal(mask > 0, labels == c)
            if not own.any():
                assert (distance == 255).all()
                continue
            assert (distance[own] == 0).all() and (distance[~own] > 0).all()
            assert distance[~own].max() > 10  # in units of 0.75 px at 64: far pixels are tens away
    assert source.map_fill == (0,) + (255,) * 12 + (0,) * 12
    assert source.class_channels == (13, 25)  # the masks: what loss.class_nce reads a pixel's class from
    assert get_source("synthetic", edges="photo", label_nc=1, **options).class_channels is None
    assert get_source("synthetic", task="mask", label_nc=12, image_size=64, seed=0).class_channels == (0, 12)
    with pytest.raises(DataError, match="set data.label_nc: 25"):
        get_source("synthetic", edges="classes", label_nc=1, **options)


def test_synthetic_textures_by_class_keep_each_class_look_across_images():
    """data.synthetic.textures_by: "class" gives a class one texture kind and geometry in every image (colours and
    pattern instances stay per image), so an exemplar's regions can be told apart by class; "image" (the default)
    draws them anew per image and is unchanged by the option."""
    options = dict(task="edge", image_size=32, label_nc=1, seed=0, num_images=6, textures=["grain", "checker", "dots"])
    by_class = get_source("synthetic", textures_by="class", **options)
    palettes = [by_class.scene(i)[1] for i in range(6)]
    geometry = lambda entry: {k: v for k, v in entry["texture"].items() if k != "seed"}  # noqa: E731
    for class_id in range(by_class.num_classes):
        assert len({str(geometry(p[class_id])) for p in palettes}) == 1
    assert len({str(p[1]["color"]) for p in palettes}) == 6  # colours stay per image
    grain = [c for c in range(by_class.num_classes) if palettes[0][c]["texture"]["kind"] == "grain"]
    assert grain and len({p[grain[0]]["texture"]["seed"] for p in palettes}) == 6  # another instance each time
    by_image = [get_source("synthetic", **options).scene(i)[1] for i in range(6)]
    assert any(len({str(geometry(p[c])) for p in by_image}) > 1 for c in range(by_class.num_classes))
    assert by_image == [get_source("synthetic", textures_by="image", **options).scene(i)[1] for i in range(6)]
    assert by_class.describe()["textures_by"] == "class"
    assert "textures_by" not in get_source("synthetic", **options).describe()  # default shards keep their fingerprint
    with pytest.raises(DataError, match="textures_by must be one of"):
        get_source("synthetic", textures_by="region", **options)

def test_render_translates_a_layout_with_another_palette():
    source = get_source("synthetic", task="mask", image_size=32, label_nc=12, seed=0, num_images=2)
    (labels_a, palette_a), (labels_b, palette_b) = source.scene(0), source.scene(1)
    ideal = render(labels_a, palette_b)
    assert ideal.shape == (32, 32, 3) and ideal.dtype == np.uint8
    flat = [c for c in np.unique(labels_a) if palette_b[c]["texture"]["kind"] == "flat"]
    for c in flat:  # a flat class takes exactly the exemplar palette's colour
        assert (ideal[labels_a == c] == palette_b[c]["color"]).all()
    with pytest.raises(ValueError, match="no palette entry"):
        render(np.full((4, 4), 12), palette_a)


def test_synthetic_edge_task_gives_region_boundaries():
    source = get_source("synthetic", task="edge", image_size=32, label_nc=1, seed=0, num_images=2)
    labels, _ = source.scene(0)
    example = source.load(source.items()[0])
    assert example.input_map.shape == (1, 32, 32) and source.input_encoding == "channels"
    np.testing.assert_array_equal(example.input_map[0] > 0, label_boundaries(labels))
    with pytest.raises(DataError, match="label_nc"):
        get_source("synthetic", task="edge", image_size=32, label_nc=12)
    with pytest.raises(DataError, match="label_nc"):
        get_source("synthetic", task="mask", image_size=32, label_nc=10, num_classes=12)
    with pytest.raises(DataError, match="at least 8 classes"):
        get_source("synthetic", task="mask", image_size=32, label_nc=5)


def test_get_source_rejects_unknown_names_and_knobs():
    assert set(SOURCES) == {"synthetic", "ade20k", "celebahq_edge", "deepfashion", "folder"}
    with pytest.raises(DataError, match="unknown data source"):
        get_source("imagenet", task="mask", image_size=32, label_nc=12)
    with pytest.raises(DataError, match="bad settings"):
        get_source("synthetic", task="mask", image_size=32, label_nc=12, num_imgs=3)
    with pytest.raises(DataError, match="supports tasks"):
        get_source("ade20k", root="x", task="edge", image_size=32, label_nc=151)


# ---------------------------------------------------------------- real layouts


def test_ade20k_layout(tmp_path):
    root = make_ade20k(tmp_path / "ADEChallengeData2016")
    (root / "ade20k_ref.txt").write_text("ADE_train_00000000.jpg,ADE_train_00000002.jpg,ADE_train_00000003.jpg\n")
    source = get_source("ade20k", root=str(root), task="mask", image_size=32, label_nc=151)
    items = source.items()
    assert [it.name for it in items][:2] == ["training/ADE_train_00000000", "training/ADE_train_00000001"]
    assert {it.split_hint for it in items} == {"train", "val"}
    example = source.load(items[0])
    assert example.photo.shape == (32, 32, 3) and example.input_map.shape == (32, 32)
    assert example.input_map.dtype == np.uint8 and example.input_map.max() < 151
    index = prepare_dataset(source, tmp_path / "prepared", progress=False)
    assert index["listed_pairs"] == {"training/ADE_train_00000000": ["training/ADE_train_00000002",
                                                                     "training/ADE_train_00000003"]}


def test_celebahq_edge_layout(tmp_path):
    root = make_celebahq(tmp_path / "CelebAMask-HQ", n=3, with_parts=(0,))
    (root / "val.txt").write_text("2\n")
    source = get_source("celebahq_edge", root=str(root), task="edge", image_size=64, label_nc=1)
    items = source.items()
    assert [it.name for it in items] == ["0", "1", "2"] and items[2].split_hint == "val"
    with_parts, without = source.load(items[0]), source.load(items[1])
    assert with_parts.input_map.shape == (1, 64, 64) and set(np.unique(with_parts.input_map)) <= {0, 255}
    # The skin square's outline is in the edge map even where the photo is flat.
    assert with_parts.input_map[0, 16, 20:44].all()
    assert without.input_map.any()  # Canny alone
    full = get_source("celebahq_edge", root=str(root), task="edge", image_size=64, label_nc=15).load(items[0])
    assert full.input_map.shape == (15, 64, 64)
    assert (full.input_map[1 + 4] == 255).all()  # no r_eye mask: its distance map is "far" everywhere
    assert full.input_map[1].min() == 0  # skin distance map is 0 on the skin boundary


def test_deepfashion_layout_and_pose_encoding(tmp_path):
    root = make_deepfashion(tmp_path / "deepfashionHD", n=4)
    (root / "deepfashion_ref.txt").write_text(
        "img\\MEN\\Denim\\id_00000000\\00_1_front.jpg,img/MEN/Denim/id_00000001/01_1_front.jpg\n")
    (root / "train.txt").write_text("img/MEN/Denim/id_00000000/00_1_front.jpg\n")
    source = get_source("deepfashion", root=str(root), task="pose", image_size=32, label_nc=20)
    items = source.items()
    assert items[0].name == "img/MEN/Denim/id_00000000/00_1_front" and items[0].split_hint == "train"
    example = source.load(items[0])
    pose = example.input_map
    assert pose.shape == (POSE_CHANNELS, 32, 32) and pose.dtype == np.uint8
    assert pose[:3].any()  # the RGB skeleton is drawn
    assert (pose[3 + 7] == 255).all()  # limb 9-10 uses a missing joint: distance "far" everywhere
    assert pose[3 + 0].min() == 0  # limb 2-3 exists: distance 0 on the limb
    index = prepare_dataset(source, tmp_path / "prepared", progress=False)
    assert index["listed_pairs"] == {items[0].name: [items[3].name]}
    with pytest.raises(DataError, match="label_nc"):
        get_source("deepfashion", root=str(root), task="pose", image_size=32, label_nc=3)


def test_folder_layout(tmp_path):
    root = make_folder(tmp_path / "photos", n=4)
    source = get_source("folder", root=str(root), task="edge", image_size=32, label_nc=1)
    names = [it.name for it in source.items()]
    assert names == ["a/photo_1_v2", "a/photo_3_v2", "b/photo_0_v2", "b/photo_2_v2"]  # key-safe: no dots/spaces
    example = source.load(source.items()[0])
    assert example.photo.shape == (32, 32, 3) and example.input_map.shape == (1, 32, 32)
    assert example.input_map.any()


def test_folder_name_collision_is_an_error(tmp_path):
    write_image(tmp_path / "p" / "x.jpg", np.zeros((8, 8, 3), np.uint8))
    write_image(tmp_path / "p" / "x.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DataError, match="collides"):
        get_source("folder", root=str(tmp_path / "p"), task="edge", image_size=32, label_nc=1).items()


# ---------------------------------------------------------------- exemplar pairing


def test_retrieval_picks_the_nearest_other_image_deterministically():
    descriptors = np.array([[0, 0], [0, 0], [5, 5], [5.1, 5], [9, 9]], np.float32)
    picks = nearest_others(descriptors, np.arange(5), np.arange(5))
    assert picks.tolist() == [1, 0, 3, 2, 3]  # identical descriptors: the other one, never itself
    pool_only = nearest_others(descriptors, np.arange(5), np.array([2, 4]))
    assert pool_only.tolist() == [2, 2, 4, 2, 2]
    ranked = rank_others(descriptors, np.arange(5), np.arange(5), k=3)
    assert ranked.tolist() == [[1, 2, 3], [0, 2, 3], [3, 4, 0], [2, 4, 0], [3, 2, 0]]  # nearest first, ties: earlier
    assert rank_others(descriptors, np.arange(2), np.array([2, 4]), k=5).shape == (2, 1)  # at most the pool minus one
    assert pairing_list(["a", "b", "c", "d", "e"], np.array([0, 4]), ranked[[0, 4]]) == "a,b,c,d\ne,d,c,a\n"


def test_listed_pairs_win_over_retrieval_and_never_pair_an_image_with_itself():
    names = ["a", "b", "c"]
    descriptors = np.array([[0.0], [0.1], [5.0]], np.float32)
    retrieved = nearest_others(descriptors, np.arange(3), np.arange(3))
    exemplars, how = choose_exemplars(names, {"a": ["a", "c"], "b": ["missing"]}, retrieved)
    assert exemplars.tolist() == [2, 0, 1] and how == ["listed", "retrieved", "retrieved"]


def test_descriptors_match_the_encoding():
    labels = np.zeros((8, 8), np.uint8)
    labels[:4] = 3
    hist = describe_example(np.zeros((8, 8, 3), np.uint8), labels, "ids", 5)
    np.testing.assert_allclose(hist**2, [0.5, 0, 0, 0.5, 0])
    stats = describe_example(np.zeros((8, 8, 3), np.uint8), np.zeros((1, 8, 8), np.uint8), "channels", 1)
    assert stats.shape == (64 + 16,) and stats[0] == 1.0
