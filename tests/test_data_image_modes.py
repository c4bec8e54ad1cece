"""Unusual image modes: 16-bit grey is scaled to 8 bits (not clipped to white), palette, grey+alpha, CMYK and RGBA
convert to the colours they show, and a mode that cannot be converted without guessing is refused by name."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.data.errors import DataError, SkipSample
from pipeline.data.imageio import read_gray, read_photo
from pipeline.inference import read_exemplar

RAMP16 = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
RAMP8 = ((RAMP16.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def saved(tmp_path, image: Image.Image, name: str) -> str:
    path = tmp_path / name
    image.save(path)
    return str(path)


def test_a_16_bit_grey_photo_is_scaled_not_clipped(tmp_path):
    path = saved(tmp_path, Image.fromarray(RAMP16), "grey16.png")
    assert Image.open(path).mode.startswith("I")
    photo = read_photo(path)
    assert photo.dtype == np.uint8 and photo.shape == (64, 64, 3)
    assert np.array_equal(photo[..., 0], RAMP8) and np.array_equal(photo[..., 2], RAMP8)
    assert (photo == 255).mean() < 0.01  # Pillow's convert("RGB") made 99.6% of this ramp white
    assert np.array_equal(read_gray(path), RAMP8)


def test_a_16_bit_exemplar_translates_as_grey_from_a_file_or_an_image(tmp_path):
    path = saved(tmp_path, Image.fromarray(RAMP16), "exemplar16.png")
    from_file, _ = read_exemplar(path, (64, 64))
    from_image, _ = read_exemplar(Image.fromarray(RAMP16), (64, 64))
    assert np.array_equal(from_file, from_image) and np.array_equal(from_file[..., 1], RAMP8)


@pytest.mark.parametrize("mode, make, expected", [
    ("P", lambda: Image.new("RGB", (8, 8), (255, 0, 0)).quantize(4), (255, 0, 0)),
    ("LA", lambda: Image.new("LA", (8, 8), (100, 128)), (100, 100, 100)),
    ("CMYK", lambda: Image.new("CMYK", (8, 8), (0, 255, 255, 0)), (255, 0, 0)),
    ("RGBA", lambda: Image.new("RGBA", (8, 8), (10, 20, 30, 40)), (10, 20, 30)),
    ("1", lambda: Image.new("1", (8, 8), 1), (255, 255, 255)),
])
def test_palette_grey_alpha_cmyk_and_rgba_convert_to_their_colours(tmp_path, mode, make, expected):
    image = make()
    assert image.mode == mode
    suffix = ".jpg" if mode == "CMYK" else ".png"
    photo = read_photo(saved(tmp_path, image, f"{mode}{suffix}"))
    assert photo.shape == (8, 8, 3) and np.abs(photo.astype(int) - expected).max() <= 2


def test_a_float_image_is_refused_by_its_mode(tmp_path):
    path = saved(tmp_path, Image.fromarray(np.full((8, 8), 0.5, np.float32)), "float.tif")
    with pytest.raises(SkipSample, match="float.tif: image mode F is not supported"):
        read_photo(path)
    with pytest.raises(DataError, match="exemplar: image mode F is not supported"):
        read_exemplar(Image.open(path), (64, 64))
