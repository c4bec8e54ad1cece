"""The app's map logic without a browser: class palettes, canvas <-> map, bucket fill, edges, exemplar retrieval."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.app.canvas import (ADE20K_NAMES, bucket_fill, canvas_scale, classes_for, decode, distinct_colours,
                                 ids_of_map, model_map, photo_edges, render)
from pipeline.app.pool import ExemplarPool
from pipeline.data.pairing import nearest_others
from pipeline.data.prepare import prepare_dataset
from pipeline.data.sources import get_source


def test_classes_are_named_where_the_dataset_names_them():
    ade = classes_for(151, "mask", "ade20k")
    assert len(ADE20K_NAMES) == 150 and ade.names[0] == "unlabelled"
    assert (ade.names[1], ade.names[3], ade.names[13], ade.names[150]) == ("wall", "sky", "person", "flag")
    assert classes_for(12, "mask", "synthetic").names[:2] == ("background", "class 1")
    assert classes_for(5, "mask", None).names == ("class 0", "class 1", "class 2", "class 3", "class 4")
    edge = classes_for(1, "edge", "folder")
    assert edge.edge and edge.names == ("no edge", "edge") and edge.hex == ["#000000", "#ffffff"]
    with pytest.raises(ValueError, match="at most 256 classes"):
        classes_for(300, "mask")


def test_class_colours_are_distinct():
    colours = distinct_colours(256)
    assert len(np.unique(colours, axis=0)) == 256 and (colours[0] == 0).all()


def test_a_painted_canvas_decodes_to_the_painted_classes():
    classes = classes_for(12, "mask", "synthetic")
    ids = np.random.default_rng(0).integers(0, 12, (64, 48))
    scale = canvas_scale((64, 48))
    canvas = render(ids, classes, scale)
    assert scale == 8 and canvas.shape == (512, 384, 3)
    np.testing.assert_array_equal(decode(canvas, classes, (64, 48)), ids)
    # Transparent pixels (erased, or a cleared canvas) are class 0; a colour off the palette rounds to the nearest.
    rgba = np.concatenate([canvas, np.full((*canvas.shape[:2], 1), 255, np.uint8)], axis=2)
    rgba[:8, :8, 3] = 0
    rgba[8:16, :8, :3] = classes.colours[5].astype(int) + 3
    decoded = decode(rgba, classes, (64, 48))
    assert decoded[0, 0] == 0 and decoded[1, 0] == 5 and (decoded[2:] == ids[2:]).all()
    assert (decode(None, classes, (64, 48)) == 0).all()


def test_bucket_fill_changes_only_the_connected_region():
    ids = np.zeros((8, 8), np.int64)
    ids[:, 4] = 2  # a wall splitting class 0 in two
    filled = bucket_fill(ids, 0, 0, 7)
    assert (filled[:, :4] == 7).all() and (filled[:, 4] == 2).all() and (filled[:, 5:] == 0).all()
    assert (ids[:, :4] == 0).all()  # a new map; the old one is kept for undo


def test_loaded_maps_are_checked_and_resized():
    mask = classes_for(12, "mask")
    ids = np.arange(12, dtype=np.uint8).repeat(8).reshape(8, 12)
    assert ids_of_map(ids, mask, (16, 24)).shape == (16, 24)
    with pytest.raises(ValueError, match="class id 12 is outside 0..11"):
        ids_of_map(np.full((4, 4), 12, np.uint8), mask, (8, 8))
    edge = classes_for(1, "edge")
    grey = np.zeros((1, 8, 8), np.uint8)
    grey[0, 3] = 255
    edges = ids_of_map(grey, edge, (8, 8))
    assert edges.sum() == 8 and (model_map(edges, edge)[3] == 255).all() and model_map(edges, edge).dtype == np.uint8


def test_edges_of_a_photo_are_the_folder_sources_edges(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    source = get_source("synthetic", task="mask", image_size=(80, 96), label_nc=12, seed=3, num_images=2)
    photo = source.load(source.items()[0]).photo
    Image.fromarray(photo).save(photos / "scene.png")
    folder = get_source("folder", root=photos, task="edge", image_size=(64, 64), label_nc=1)
    expected = folder.load(folder.items()[0]).input_map[0] > 0
    edges = photo_edges(photo, (64, 64))
    assert edges.any() and np.array_equal(edges > 0, expected)


@pytest.fixture(scope="module")
def prepared_sets(tmp_path_factory):
    """Prepared synthetic data for a mask model and for an edge model (16 images each)."""
    root = tmp_path_factory.mktemp("pools")
    for task, label_nc in (("mask", 12), ("edge", 1)):
        source = get_source("synthetic", task=task, image_size=(64, 64), label_nc=label_nc, seed=0, num_images=16)
        prepare_dataset(source, root / task, progress=False)
    return root


def test_retrieval_finds_the_map_itself_and_then_the_shard_stages_choice(prepared_sets):
    pool = ExemplarPool(prepared_sets / "mask")
    assert len(pool) == 16 and pool.mismatch(12) is None and "12 input channels" in pool.mismatch(151)
    for i in (0, 5, 11):
        found = pool.nearest(pool.input_map(i), 4)
        assert found[0] == (i, 0.0) and [d for _, d in found] == sorted(d for _, d in found)
        # Class histograms are all of a mask descriptor: the runner-up is the exemplar the shard stage retrieves.
        assert found[1][0] == nearest_others(pool.prepared.descriptors, np.array([i]), np.arange(16))[0]


def test_retrieval_of_a_painted_edge_map_compares_the_map_part_only(prepared_sets):
    pool = ExemplarPool(prepared_sets / "edge")
    assert pool.encoding == "channels"
    for i in (2, 9):
        grey = pool.input_map(i)[0]  # the (H, W) grey image the canvas hands over
        assert pool.nearest(grey, 1) == [(i, 0.0)]
