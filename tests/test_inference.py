"""pipeline.inference: load a model, preprocess inputs as the shards were made, translate, make the figure."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from model import CoCosNet
from pipeline.data.errors import DataError
from pipeline.data.imageio import fit
from pipeline.data.pose import POSE_CHANNELS
from pipeline.inference import BODY25_TO_COCO18, Translator, figure, load, read_keypoints
from tests.tiny_translation import LABEL_NC, SIZE, tiny_config, write_pose

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def translator(model_dir):
    return load(model_dir)


def test_translate_one_pair_from_files(translator, pairs):
    image = translator.translate(pairs["maps"] / "s0.png", pairs["photos"] / "s0.jpg", pairs["photo_maps"] / "s0.png")
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == SIZE[::-1]
    full = translator.translate_full(pairs["maps"] / "s0.png", pairs["photos"] / "s0.jpg",
                                     pairs["photo_maps"] / "s0.png")
    assert np.array_equal(np.asarray(full.image), np.asarray(image))  # v2 default mode is deterministic
    assert [w.size for w in full.warped] == [(8, 8), (16, 16), (32, 32), (64, 64)]  # coarse -> fine


def test_arrays_and_files_give_the_same_translation(translator, pairs):
    ids = np.asarray(Image.open(pairs["maps"] / "s1.png"))
    photo = np.asarray(Image.open(pairs["photos"] / "s1.jpg").convert("RGB"))
    exemplar_ids = Image.open(pairs["photo_maps"] / "s1.png")
    from_arrays = translator.translate(ids, photo, exemplar_ids)
    from_files = translator.translate(pairs["maps"] / "s1.png", pairs["photos"] / "s1.jpg",
                                      pairs["photo_maps"] / "s1.png")
    assert np.array_equal(np.asarray(from_arrays), np.asarray(from_files))


def test_batched_run_equals_one_by_one(translator, pairs):
    prepared = [translator.prepare(pairs["maps"] / f"s{k}.png", pairs["photos"] / f"s{k}.jpg",
                                   pairs["photo_maps"] / f"s{k}.png") for k in range(3)]
    batched = translator.run(prepared)
    single = [translator.run([p])[0] for p in prepared]
    for a, b in zip(batched, single):
        assert np.abs(np.asarray(a.image, np.int16) - np.asarray(b.image, np.int16)).max() <= 1


def test_inputs_are_centre_cropped_and_resized_like_the_shards(translator, pairs):
    ids = np.asarray(Image.open(pairs["maps"] / "s0.png"))  # 80 x 96: the crop keeps the middle 80 x 80
    one_hot = translator.load_map(ids)
    expected = fit(ids, SIZE, "nearest")
    assert one_hot.shape == (LABEL_NC, *SIZE) and torch.equal(one_hot.argmax(0), torch.from_numpy(expected).long())
    assert torch.equal(one_hot.sum(0), torch.ones(SIZE))
    prepared = translator.prepare(ids, pairs["photos"] / "s0.jpg", ids)
    assert prepared.exemplar.shape == (3, *SIZE) and -1 <= prepared.exemplar.min() <= prepared.exemplar.max() <= 1


def test_bad_inputs_are_clear_errors_naming_the_file(translator, pairs, tmp_path):
    too_high = tmp_path / "ids.png"
    Image.fromarray(np.full((40, 40), LABEL_NC + 3, np.uint8), "L").save(too_high)
    with pytest.raises(DataError, match=rf"ids.png: class id {LABEL_NC + 3} is outside 0..{LABEL_NC - 1}"):
        translator.translate(too_high, pairs["photos"] / "s0.jpg", pairs["photo_maps"] / "s0.png")
    rgb = tmp_path / "colour.png"
    Image.new("RGB", (40, 40)).save(rgb)
    with pytest.raises(DataError, match="colour.png: label map must be single-channel class ids"):
        translator.load_map(rgb)
    corrupt = tmp_path / "broken.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(DataError, match="broken.jpg: corrupt or truncated image"):
        translator.translate(pairs["maps"] / "s0.png", corrupt, pairs["photo_maps"] / "s0.png")
    with pytest.raises(DataError, match="needs the exemplar's own mask map"):
        translator.translate(pairs["maps"] / "s0.png", pairs["photos"] / "s0.jpg")
    with pytest.raises(DataError, match="missing"):
        translator.translate(tmp_path / "nothing.png", pairs["photos"] / "s0.jpg", pairs["photo_maps"] / "s0.png")
    pickled = tmp_path / "objects.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="objects.npy: not a plain .npy array"):
        translator.load_map(pickled)


def test_load_refuses_what_is_not_a_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a model folder nor an MLflow model URI"):
        load(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match="missing state_dict.pt"):
        load(tmp_path)
    if not torch.cuda.is_available():
        with pytest.raises(DataError, match="CUDA is not available"):
            load(tmp_path, device="cuda")


def test_edge_model_computes_the_exemplar_edges_when_none_is_given(pairs, tmp_path):
    translator = Translator(CoCosNet(tiny_config(label_nc=1)))
    edges = tmp_path / "edges.png"
    Image.fromarray((np.asarray(Image.open(pairs["maps"] / "s0.png")) % 2 * 255).astype(np.uint8), "L").save(edges)
    prepared = translator.prepare(edges, pairs["photos"] / "s0.jpg")
    assert prepared.input_map.shape == prepared.exemplar_map.shape == (1, *SIZE)
    assert set(prepared.exemplar_map.unique().tolist()) <= {0.0, 1.0} and prepared.exemplar_map.sum() > 0
    assert translator.translate(edges, pairs["photos"] / "s0.jpg").size == SIZE[::-1]
    channels = np.stack([np.asarray(Image.open(edges))] * 2)
    with pytest.raises(DataError, match="map has 2 channels, the model takes 1"):
        translator.load_map(channels)


def test_pose_from_openpose_text_and_json(pairs, tmp_path):
    translator = Translator(CoCosNet(tiny_config(label_nc=POSE_CHANNELS)))
    candidate = write_pose(tmp_path, "person", (80, 96))
    exemplar_pose = write_pose(tmp_path, "exemplar", (80, 96), shift=0.05)
    from_text = translator.load_map(candidate, pose_canvas=(80, 96))
    assert from_text.shape == (POSE_CHANNELS, *SIZE) and 0 <= from_text.min() and from_text.max() <= 1
    # The same person as OpenPose BODY_25 JSON (MidHip and the feet are dropped on the way to COCO-18).
    coco = np.loadtxt(candidate)[:, :3]
    body25 = np.zeros((25, 3))
    body25[list(BODY25_TO_COCO18)] = coco
    as_json = tmp_path / "person_keypoints.json"
    as_json.write_text(json.dumps({"people": [{"pose_keypoints_2d": body25.ravel().tolist()}]}))
    points, joints = read_keypoints(as_json)
    assert np.array_equal(points[:, :2], coco[:, :2]) and np.array_equal(joints, np.arange(18))
    assert torch.equal(translator.load_map(as_json, pose_canvas=(80, 96)), from_text)
    image = translator.translate(candidate, pairs["photos"] / "s0.jpg", exemplar_pose)  # canvas: the photo's size
    assert image.size == SIZE[::-1]
    with pytest.raises(DataError, match="keypoints lie outside the 40x30 canvas"):
        translator.load_map(candidate, pose_canvas=(30, 40))
    with pytest.raises(DataError, match="pose input must be OpenPose keypoints"):
        translator.load_map(pairs["maps"] / "s0.png", task="pose")


def test_figure_shows_input_exemplar_warped_output(translator, train_shards, tmp_path):
    path = figure(translator, train_shards, tmp_path / "fig.png", rows=2)
    grid = np.asarray(Image.open(path))
    tile = 192  # 64-pixel tiles upscaled 3x
    assert grid.shape == (28 + 2 * tile + 2, 4 * tile + 3 * 2, 3)
