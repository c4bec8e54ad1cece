"""VGG19: weight formats, loading errors, preprocessing, layer selection."""
from __future__ import annotations

import pytest
import torch

from model import vgg as vgg_module
from model.vgg import CONV_NAMES, TORCHVISION_INDICES, VGG19, load_vgg19


def _random_vgg(seed: int = 0) -> VGG19:
    with pytest.warns(UserWarning, match="RANDOM"):
        return load_vgg19("random", seed=seed)


@pytest.fixture(scope="module")
def official_state() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in _random_vgg(seed=7).state_dict().items()}


def _to_torchvision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    index = dict(zip(CONV_NAMES, TORCHVISION_INDICES))
    out = {}
    for key, value in state.items():
        conv, kind = key.split(".")
        out[f"features.{index[conv]}.{kind}"] = value
    out["classifier.0.weight"] = torch.zeros(4, 4)  # the head must be ignored
    out["classifier.0.bias"] = torch.zeros(4)
    return out


def test_state_dict_keys_are_the_official_format():
    keys = list(VGG19().state_dict())
    assert keys[:4] == ["conv1_1.weight", "conv1_1.bias", "conv1_2.weight", "conv1_2.bias"]
    assert keys[-1] == "conv5_4.bias"
    assert len(keys) == 32


def test_both_key_formats_load_the_same_weights(tmp_path, official_state):
    official_file, tv_file = tmp_path / "vgg19_conv.pth", tmp_path / "vgg19_tv.pth"
    torch.save(official_state, official_file)
    torch.save(_to_torchvision(official_state), tv_file)

    official = load_vgg19(str(official_file))
    torchvision = load_vgg19(str(tv_file), preprocess="caffe")
    for key, value in official_state.items():
        assert torch.equal(official.state_dict()[key], value)
        assert torch.equal(torchvision.state_dict()[key], value)

    image = torch.rand(1, 3, 32, 32) * 2 - 1
    for a, b in zip(official(image), torchvision(image)):
        assert torch.equal(a, b)

    # Without an override each format gets the input convention its weights were trained with.
    assert official.preprocess == "caffe"
    assert load_vgg19(str(tv_file)).preprocess == "torchvision"


def test_loaded_network_is_frozen(tmp_path, official_state):
    path = tmp_path / "w.pth"
    torch.save(official_state, path)
    vgg = load_vgg19(str(path))
    assert not vgg.training
    assert not any(p.requires_grad for p in vgg.parameters())


def test_caffe_preprocessing_matches_official_vgg_preprocess():
    # RGB (1, -1, 0) in [-1, 1] = (1, 0, 0.5) in [0, 1]; BGR = (0.5, 0, 1); minus Caffe means, x255.
    image = torch.tensor([1.0, -1.0, 0.0]).view(1, 3, 1, 1)
    got = VGG19("caffe").normalize_input(image).flatten()
    expected = (torch.tensor([0.5, 0.0, 1.0]) - torch.tensor([0.40760392, 0.45795686, 0.48501961])) * 255
    torch.testing.assert_close(got, expected)


def test_torchvision_preprocessing_is_imagenet_normalisation():
    image = torch.tensor([1.0, -1.0, 0.0]).view(1, 3, 1, 1)
    got = VGG19("torchvision").normalize_input(image).flatten()
    expected = (torch.tensor([1.0, 0.0, 0.5]) - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(got, expected)


def test_missing_file_names_it(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_vgg19(str(path))


def test_unreadable_file_names_it(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        load_vgg19(str(path))


def test_unknown_format_names_file_and_problem(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"layer1.0.conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=r"resnet\.pth.*neither torchvision"):
        load_vgg19(str(path))


def test_missing_key_is_reported(tmp_path, official_state):
    path = tmp_path / "partial.pth"
    torch.save({k: v for k, v in official_state.items() if k != "conv5_4.bias"}, path)
    with pytest.raises(ValueError, match=r"partial\.pth.*conv5_4\.bias"):
        load_vgg19(str(path))


def test_wrong_shape_is_reported(tmp_path, official_state):
    path = tmp_path / "shapes.pth"
    bad = _to_torchvision(official_state)
    bad["features.0.weight"] = torch.zeros(64, 1, 3, 3)  # grey-scale first layer
    torch.save(bad, path)
    with pytest.raises(ValueError, match=r"shapes\.pth.*conv1_1\.weight.*\(64, 3, 3, 3\)"):
        load_vgg19(str(path))


def test_batchnorm_torchvision_variant_is_rejected(tmp_path, official_state):
    path = tmp_path / "vgg19_bn.pth"
    bad = _to_torchvision(official_state)
    bad["features.1.running_mean"] = torch.zeros(64)
    torch.save(bad, path)
    with pytest.raises(ValueError, match=r"vgg19_bn\.pth.*features\.1\.running_mean"):
        load_vgg19(str(path))


def test_random_is_loud_and_deterministic():
    a, b, c = _random_vgg(0), _random_vgg(0), _random_vgg(1)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key])
    assert not torch.equal(a.conv1_1.weight, c.conv1_1.weight)


def test_random_does_not_touch_the_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    _random_vgg(5)
    assert torch.equal(torch.rand(3), expected)


def test_imagenet_goes_through_the_hub_cache_with_hash_check(monkeypatch, official_state):
    calls = {}

    def fake_download(url, **kwargs):
        calls.update(kwargs, url=url)
        return _to_torchvision(official_state)

    monkeypatch.setattr(vgg_module.torch.hub, "load_state_dict_from_url", fake_download)
    vgg = load_vgg19("imagenet")
    assert calls["url"] == "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"
    assert calls["check_hash"] is True and calls["weights_only"] is True
    assert vgg.preprocess == "torchvision"
    assert torch.equal(vgg.conv3_2.weight, official_state["conv3_2.weight"])


def test_layer_selection_shapes_and_order():
    vgg = VGG19()
    image = torch.rand(2, 3, 32, 32) * 2 - 1
    r11, r54, r32 = vgg(image, ("r11", "r54", "r32"))
    assert r11.shape == (2, 64, 32, 32)
    assert r32.shape == (2, 256, 8, 8)
    assert r54.shape == (2, 512, 2, 2)
    default = vgg(image)
    assert [f.shape[1:] for f in default] == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 2, 2)]
    assert torch.equal(default[2], vgg(image, ("r32",))[0])
    assert (r11 >= 0).all()  # ReLU outputs


def test_stops_at_the_deepest_requested_layer():
    vgg = VGG19()
    ran = []
    vgg.conv4_3.register_forward_hook(lambda *_: ran.append("conv4_3"))
    vgg(torch.zeros(1, 3, 32, 32), ("r12", "r42"))
    assert ran == []
    vgg(torch.zeros(1, 3, 32, 32), ("r43",))
    assert ran == ["conv4_3"]


def test_unknown_layer_is_rejected():
    with pytest.raises(ValueError, match="r61"):
        VGG19()(torch.zeros(1, 3, 32, 32), ("r61",))
