"""How input maps are drawn in sample grids and figures."""
from __future__ import annotations

import torch

from pipeline.data.sources import get_source
from pipeline.viz import map_to_rgb, palette


def test_one_hot_classes_take_their_colour_and_edges_are_grey():
    ids = torch.tensor([[0, 1], [2, 2]])
    one_hot = torch.nn.functional.one_hot(ids, 3).permute(2, 0, 1)[None].float()
    rgb = map_to_rgb(one_hot)
    assert torch.equal(rgb[0, :, 1, 1], palette(3)[2]) and torch.equal(rgb[0, :, 0, 0], torch.zeros(3))
    edges = torch.tensor([[[[0.0, 1.0]]]])
    assert torch.equal(map_to_rgb(edges)[0, :, 0], torch.tensor([[0.0, 1.0]] * 3))


def test_a_channel_stack_shows_its_edges_and_masks_not_its_distance_maps():
    """The synthetic "classes" input, [edges, 12 distance maps, 12 masks]: edges white, each class's mask its colour,
    and the distance maps (smooth, or 255 for a class the image lacks) left out; drawing them would whiten it all."""
    source = get_source("synthetic", task="edge", edges="classes", label_nc=25, image_size=64, num_images=2)
    example = source.load(source.items()[0])
    labels = source.scene(0)[0]
    maps = torch.from_numpy(example.input_map)[None].float() / 255
    rgb = map_to_rgb(maps)
    edges = maps[0, 0] > 0
    assert torch.all(rgb[0][:, edges] == 1)
    colours = palette(25)
    for c in range(12):
        inside = torch.from_numpy(labels == c) & ~edges
        if inside.any():
            assert torch.allclose(rgb[0][:, inside], colours[13 + c][:, None].expand(-1, int(inside.sum())))
    assert rgb[0][:, ~edges].mean() < 0.9
