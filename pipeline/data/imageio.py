"""Reading, resizing and encoding images and maps; atomic file writes.

Everything that comes from a shard is decoded here with plain decoders (JPEG, PNG, JSON, NPY with
allow_pickle=False): nothing is ever unpickled. Encoders use fixed settings so the same pixels always
give the same bytes (shards are byte-identical across runs).
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from pipeline.data.errors import DataError, SkipSample

PNG_COMPRESSION = 3  # zlib level: fast to write, small enough; fixed for byte-identical output


# ---------------------------------------------------------------- image modes

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # Pillow opens 16-bit grey PNG/TIFF as one of these
CONVERTIBLE_MODES = ("1", "L", "P", "LA", "La", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")


class UnsupportedMode(ValueError):
    """An image mode that cannot be turned into 8-bit pixels without guessing (float, LAB, HSV, ...)."""


def eight_bit(image: Image.Image) -> Image.Image:
    """16-bit grey scaled to 8 bits (Pillow's own convert clips it: a 16-bit photo became white); other modes as
    they are. UnsupportedMode names a mode that neither Pillow nor this converts."""
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise UnsupportedMode(f"{image.mode} image with values outside 0..65535 (not 16-bit grey)")
        return Image.fromarray(((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8), "L")
    if image.mode not in CONVERTIBLE_MODES:
        raise UnsupportedMode(f"image mode {image.mode} is not supported (use 8/16-bit grey, palette, RGB(A), CMYK)")
    return image


def rgb_array(image: Image.Image) -> np.ndarray:
    """Any supported mode -> (H, W, 3) uint8 RGB: 16-bit grey scaled, palette and CMYK converted, alpha dropped."""
    return np.asarray(eight_bit(image).convert("RGB"))


# ---------------------------------------------------------------- reading source files (may skip)


def read_photo(path: str | Path) -> np.ndarray:
    """Decode a photo file -> (H, W, 3) uint8 RGB; corrupt or truncated files and unsupported modes raise
    SkipSample."""
    try:
        with Image.open(path) as im:
            im.load()  # forces the full decode: truncated files fail here, not later
            return rgb_array(im)
    except FileNotFoundError:
        raise SkipSample(str(path), "photo file is missing") from None
    except UnsupportedMode as exc:
        raise SkipSample(str(path), str(exc)) from None
    except Exception as exc:  # PIL raises many types for bad data; all mean "unusable file"
        raise SkipSample(str(path), f"corrupt or truncated image ({type(exc).__name__}: {exc})") from None


def read_label_png(path: str | Path) -> np.ndarray:
    """Decode a class-id PNG (mode L, P or I;16) -> (H, W) integer array of ids."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGB", "RGBA"):
                raise SkipSample(str(path), f"label map must be single-channel class ids, got mode {im.mode}")
            return np.asarray(im)
    except FileNotFoundError:
        raise SkipSample(str(path), "label file is missing") from None
    except SkipSample:
        raise
    except Exception as exc:
        raise SkipSample(str(path), f"corrupt or truncated label map ({type(exc).__name__}: {exc})") from None


def read_gray(path: str | Path) -> np.ndarray:
    """Decode any supported image as (H, W) uint8 grey (part masks, edge maps); 16-bit grey is scaled."""
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(eight_bit(im).convert("L"))
    except FileNotFoundError:
        raise SkipSample(str(path), "file is missing") from None
    except UnsupportedMode as exc:
        raise SkipSample(str(path), str(exc)) from None
    except Exception as exc:
        raise SkipSample(str(path), f"corrupt or truncated image ({type(exc).__name__}: {exc})") from None


# ---------------------------------------------------------------- geometry


def center_crop_box(height: int, width: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Largest centred (top, left, h, w) box of the target aspect ratio: resizing it does not distort."""
    target_h, target_w = size
    if height * target_w > width * target_h:  # too tall
        crop_h, crop_w = max(1, round(width * target_h / target_w)), width
    else:
        crop_h, crop_w = height, max(1, round(height * target_w / target_h))
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def fit(array: np.ndarray, size: tuple[int, int], interpolation: str) -> np.ndarray:
    """Centre-crop to the aspect ratio of `size` (H, W) and resize. array: (H, W) or (H, W, C).

    interpolation: "nearest" (class ids, edges), "linear" (distance maps), "area" (photos).
    """
    top, left, crop_h, crop_w = center_crop_box(array.shape[0], array.shape[1], size)
    array = array[top : top + crop_h, left : left + crop_w]
    if array.shape[:2] == tuple(size):
        return np.ascontiguousarray(array)
    if interpolation == "area" and (crop_h < size[0] or crop_w < size[1]):
        interpolation = "linear"  # INTER_AREA is for shrinking
    flag = {"nearest": cv2.INTER_NEAREST, "linear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA}[interpolation]
    channels = array.shape[2] if array.ndim == 3 else 0
    if channels > 4:  # cv2.resize handles at most 4 channels at once
        return np.stack([fit(array[..., c], size, interpolation) for c in range(channels)], axis=-1)
    return cv2.resize(array, (size[1], size[0]), interpolation=flag)


# ---------------------------------------------------------------- encoding and decoding shard members


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    """(H, W, 3) uint8 -> JPEG bytes; baseline, no optimisation pass, 4:2:0: deterministic output."""
    buffer = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buffer, "JPEG", quality=quality, subsampling=2, optimize=False, progressive=False)
    return buffer.getvalue()


def decode_jpeg_bgr(data: bytes, where: str = "") -> np.ndarray:
    """JPEG bytes -> (H, W, 3) uint8 BGR, OpenCV's own order (for callers that reorder the channels anyway)."""
    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if array is None:
        raise DataError(f"{where}: cannot decode JPEG ({len(data)} bytes)")
    return array


def bgr_to_planar_rgb(bgr: np.ndarray, out: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 BGR -> (3, H, W) RGB planes written into `out` (one pass: cv2.split into the planes)."""
    if out.shape != (3, *bgr.shape[:2]) or out.dtype != np.uint8:
        raise ValueError(f"planar output must be (3, {bgr.shape[0]}, {bgr.shape[1]}) uint8, "
                         f"got {out.shape} {out.dtype}")
    planes = cv2.split(bgr, [out[2], out[1], out[0]])
    for plane, target in zip(planes, (out[2], out[1], out[0])):
        if plane.ctypes.data != target.ctypes.data:  # OpenCV allocated instead of writing in place
            target[...] = plane
    return out


def decode_jpeg(data: bytes, where: str = "", out: np.ndarray | None = None) -> np.ndarray:
    """JPEG bytes -> (H, W, 3) uint8 RGB, written into `out` when it has that shape (saves a copy)."""
    array = decode_jpeg_bgr(data, where)
    if out is not None and out.shape == array.shape and out.dtype == np.uint8:
        return cv2.cvtColor(array, cv2.COLOR_BGR2RGB, dst=out)
    return cv2.cvtColor(array, cv2.COLOR_BGR2RGB)


def stack_channels(channels: np.ndarray) -> np.ndarray:
    """(C, H, W) -> (C*H, W): a multi-channel map stored as one grey PNG, channels one above the other."""
    c, h, w = channels.shape
    return channels.reshape(c * h, w)


def unstack_channels(tall: np.ndarray, channels: int, where: str = "") -> np.ndarray:
    """(C*H, W) -> (C, H, W), the inverse of stack_channels."""
    if tall.ndim != 2 or tall.shape[0] % channels:
        raise DataError(f"{where}: map of shape {tall.shape} is not {channels} stacked channels")
    return tall.reshape(channels, tall.shape[0] // channels, tall.shape[1])


def encode_png(array: np.ndarray) -> bytes:
    """(H, W) uint8/uint16 -> PNG bytes (single channel, fixed compression level)."""
    if array.ndim != 2 or array.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"encode_png expects a (H, W) uint8/uint16 array, got {array.shape} {array.dtype}")
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(array), [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
    if not ok:
        raise DataError("PNG encoding failed")
    return encoded.tobytes()


def decode_png(data: bytes, where: str = "") -> np.ndarray:
    """PNG bytes -> (H, W) uint8/uint16 exactly as stored."""
    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None or array.ndim != 2:
        raise DataError(f"{where}: cannot decode a single-channel PNG ({len(data)} bytes)")
    return array


def encode_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def decode_npy(data: bytes, where: str = "") -> np.ndarray:
    """NPY bytes -> array. allow_pickle=False: an object array in a shard is refused, never unpickled."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:
        raise DataError(f"{where}: refusing NPY member ({exc})") from None


def decode_json(data: bytes, where: str = "") -> dict[str, Any]:
    """A JSON object member -> dict (JSON only: nothing is unpickled)."""
    try:
        obj = json.loads(data)
    except ValueError as exc:
        raise DataError(f"{where}: invalid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def encode_json(obj: Any) -> bytes:
    """Canonical JSON: sorted keys, no spaces, so equal content gives equal bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


# ---------------------------------------------------------------- atomic writes


def atomic_write_bytes(path: str | Path, data: bytes, durable: bool = True) -> None:
    """Write to a temporary name in the same folder, then rename: readers never see half a file.

    durable: fsync before the rename (also survives power loss); off for many small files.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would make outputs unreadable to others
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 1, durable: bool = True) -> None:
    text = json.dumps(obj, sort_keys=True, indent=indent, allow_nan=False) + "\n"
    atomic_write_bytes(path, text.encode(), durable=durable)


def read_json(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON ({exc})") from None


def encode_photo_png(rgb: np.ndarray) -> bytes:
    """(H, W, 3) uint8 RGB -> lossless PNG (prepared photos: no JPEG generation loss before sharding)."""
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
    if not ok:
        raise DataError("PNG encoding failed")
    return encoded.tobytes()


def read_photo_png(path: str | Path) -> np.ndarray:
    """A prepared photo written by encode_photo_png -> (H, W, 3) uint8 RGB."""
    array = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if array is None:
        raise DataError(f"{path}: cannot read prepared photo (re-run the prepare stage)")
    return cv2.cvtColor(array, cv2.COLOR_BGR2RGB)


def encode_map(input_map: np.ndarray) -> bytes:
    """Input map -> single-channel PNG: (H, W) ids as they are, (C, H, W) channels stacked vertically."""
    return encode_png(stack_channels(input_map) if input_map.ndim == 3 else input_map)


def decode_map(data: bytes, encoding: str, channels: int, where: str = "") -> np.ndarray:
    """Inverse of encode_map. -> (H, W) ids or (C, H, W) uint8 channels."""
    array = decode_png(data, where)
    return array if encoding == "ids" else unstack_channels(array, channels, where)
