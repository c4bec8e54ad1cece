"""Translate images with a trained CoCosNet: the Python API behind `cocosnet translate`.

    from pipeline.inference import load

    translator = load("models")                     # or "models:/cocosnet@champion", "runs:/<id>/model"
    image = translator.translate("scene_mask.png", "photo.jpg", "photo_mask.png")   # PIL.Image, model size
    full = translator.translate_full("scene_mask.png", "photo.jpg", "photo_mask.png")
    full.image, full.warped                         # the output and the warped exemplar per level

Inputs are preprocessed as the data stages prepared the training shards:

    mask   an index PNG (mode L, P or I;16) of class ids < label_nc -> one-hot (label_nc, H, W)
    edge   a grey image (white edges on black) -> (1, H, W) in [0, 1]; without an exemplar map the
           exemplar's own map is its Canny edges (as the `folder` source computes them)
    pose   OpenPose keypoints (`<name>_candidate.txt` + `<name>_subset.txt`, or an OpenPose `.json`
           with COCO-18 or BODY_25 keypoints) -> the official 20-channel pose encoding
    any    a `.npy` array (C, H, W) of the map's own channels (uint8 0-255 or float 0-1), C = label_nc

Sizes (pipeline.data.imageio.fit, as in the data stages): every input is scaled to cover the model's
(H, W) and centre-cropped to it (for a square model: the shorter side is resized to the model's size,
then the centre is cut out); photos are filtered (area or bilinear), maps use nearest neighbour.
Outputs are at the model's size.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from model import CoCosNet, ModelConfig
from pipeline.data.errors import DataError, SkipSample
from pipeline.data.imageio import UnsupportedMode, eight_bit, fit, read_gray, read_label_png, read_photo, rgb_array
from pipeline.data.loader import to_model
from pipeline.data.maps import as_edge_map, canny_edges
from pipeline.data.pose import NUM_JOINTS, POSE_CHANNELS, encode_pose, keypoints_in_frame, read_openpose
from pipeline.mkl_vml import settle_vml_dispatch
from pipeline.model_files import load_model, read_run_info

TASKS = ("mask", "edge", "pose")
# OpenPose BODY_25 -> COCO-18 joint order (BODY_25 adds MidHip at 8 and six foot points at the end).
BODY25_TO_COCO18 = (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)

MapSource = str | Path | np.ndarray | Image.Image  # a file, (H, W) ids / grey or (C, H, W) channels, a PIL image
PhotoSource = str | Path | np.ndarray | Image.Image  # a file, (H, W, 3) uint8 RGB, a PIL image


@dataclass
class Translation:
    """One translated pair: the output and the warped exemplar at every level (coarse -> fine,
    H/8 ... H for v2, H/4 for v1), all RGB at their own resolution."""

    image: Image.Image
    warped: list[Image.Image]


@dataclass
class Prepared:
    """One pair as model-ready tensors: input_map and exemplar_map (label_nc, H, W), exemplar (3, H, W) in [-1, 1]."""

    input_map: torch.Tensor
    exemplar: torch.Tensor
    exemplar_map: torch.Tensor


# ---------------------------------------------------------------- reading inputs


@contextlib.contextmanager
def _data_errors() -> Iterator[None]:
    """The data stages' per-file skips become errors here (the message names the file and the problem)."""
    try:
        yield
    except SkipSample as exc:
        raise DataError(str(exc)) from None


def _where(source: object) -> str:
    return str(source) if isinstance(source, (str, Path)) else f"<{type(source).__name__}>"


def is_keypoint_file(path: str | Path) -> bool:
    """OpenPose output: `<name>_candidate.txt` (with `<name>_subset.txt` beside it) or a `.json` file."""
    name = Path(path).name.lower()
    return name.endswith(("_candidate.txt", ".json"))


def read_keypoints(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """OpenPose keypoints -> (candidate (N, >=2) float [x, y, ...], joints (18,) int rows of candidate, -1 = missing).

    `<name>_candidate.txt` reads `<name>_subset.txt` beside it (the DeepFashionHD format); a `.json` is
    OpenPose's own output (`people[0].pose_keypoints_2d`, COCO-18 or BODY_25; confidence 0 = missing).
    """
    path = Path(path)
    if not path.name.lower().endswith(".json"):
        subset = path.with_name(path.name[: -len("_candidate.txt")] + "_subset.txt")
        with _data_errors():
            return read_openpose(path, subset)
    try:
        people = json.loads(path.read_text())["people"]
        flat = np.asarray(people[0]["pose_keypoints_2d"], dtype=np.float64) if people else None
    except FileNotFoundError:
        raise DataError(f"{path}: pose file is missing") from None
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not OpenPose JSON output with people[].pose_keypoints_2d ({exc!r})") from None
    if flat is None:
        raise DataError(f"{path}: OpenPose found no person")
    if flat.ndim != 1 or flat.size not in (18 * 3, 25 * 3) or not np.isfinite(flat).all():
        raise DataError(f"{path}: pose_keypoints_2d must hold 18 (COCO) or 25 (BODY_25) finite x, y, confidence "
                        f"triples, got {flat.size} values")
    points = flat.reshape(-1, 3)
    if len(points) == 25:
        points = points[list(BODY25_TO_COCO18)]
    joints = np.where(points[:, 2] > 0, np.arange(NUM_JOINTS), -1)
    return points, joints


def read_map_array(source: MapSource, task: str) -> np.ndarray:
    """A map file or object -> (H, W) ids / grey, or (C, H, W) channels, as stored (not yet resized)."""
    if isinstance(source, np.ndarray):
        return source
    if isinstance(source, Image.Image):
        if task == "mask" and source.mode in ("RGB", "RGBA"):
            raise DataError(f"label map must be single-channel class ids, got an image of mode {source.mode}")
        if task == "mask":
            return np.asarray(source)
        try:
            return np.asarray(eight_bit(source).convert("L"))
        except UnsupportedMode as exc:
            raise DataError(f"input map: {exc}") from None
    path = Path(source)
    if path.suffix.lower() == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise DataError(f"{path}: file is missing") from None
        except (ValueError, OSError, EOFError) as exc:  # object arrays are refused, never unpickled
            raise DataError(f"{path}: not a plain .npy array ({exc})") from None
    with _data_errors():
        return read_label_png(path) if task == "mask" else read_gray(path)


def expand(array: np.ndarray, name: str, label_nc: int) -> torch.Tensor:
    """One sample's compact array, as the loader gives it under `name`, -> its model tensor (loader.to_model)."""
    return to_model({name: torch.from_numpy(np.ascontiguousarray(array[None]))}, label_nc)[name][0]


def map_to_tensor(array: np.ndarray, task: str, cfg: ModelConfig, where: str) -> torch.Tensor:
    """(H, W) ids or grey, or (C, H, W) channels, any size -> (label_nc, H, W) float as the loader makes it."""
    size, label_nc = cfg.image_size, cfg.label_nc
    if array.ndim == 3:
        if array.shape[0] != label_nc:
            raise DataError(f"{where}: map has {array.shape[0]} channels, the model takes {label_nc}")
        if array.dtype == np.uint8:
            scaled = array
        elif np.issubdtype(array.dtype, np.floating) and np.isfinite(array).all() and array.min() >= 0 \
                and array.max() <= 1:
            scaled = np.round(array * 255).astype(np.uint8)
        else:
            raise DataError(f"{where}: channel maps must be uint8 (0-255) or float in [0, 1], got {array.dtype}")
        channels = fit(scaled.transpose(1, 2, 0), size, "nearest").reshape(*size, label_nc).transpose(2, 0, 1)
        return expand(channels, "input_map", label_nc)
    if array.ndim != 2:
        raise DataError(f"{where}: a map must be (H, W) or (C, H, W), got shape {array.shape}")
    if task == "pose":
        raise DataError(f"{where}: pose input must be OpenPose keypoints (<name>_candidate.txt or .json) "
                        f"or a ({POSE_CHANNELS}, H, W) .npy array")
    if task == "edge":
        if label_nc != 1:
            raise DataError(f"{where}: the model takes {label_nc} edge channels; give a ({label_nc}, H, W) .npy array")
        grey = as_edge_map(array) if array.dtype == bool else array
        if grey.dtype != np.uint8:
            raise DataError(f"{where}: an edge map must be an 8-bit grey image, got {array.dtype}")
        return expand(fit(grey, size, "nearest")[None], "input_map", 1)
    if not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"{where}: a label map must hold integer class ids, got {array.dtype}")
    if array.size and (int(array.min()) < 0 or int(array.max()) >= label_nc):
        bad = int(array.max()) if int(array.max()) >= label_nc else int(array.min())
        raise DataError(f"{where}: class id {bad} is outside 0..{label_nc - 1} (label_nc {label_nc} of the model); "
                        "label maps must be index PNGs of class ids")
    ids = fit(array.astype(np.uint8 if label_nc <= 256 else np.int32), size, "nearest")  # dtypes cv2 resizes
    return expand(ids, "input_map", label_nc)


def pose_to_tensor(path: str | Path, cfg: ModelConfig, canvas: tuple[int, int]) -> torch.Tensor:
    """OpenPose keypoints detected on an image of size `canvas` (H, W) -> (20, H, W) float in [0, 1]."""
    if cfg.label_nc != POSE_CHANNELS:
        raise DataError(f"{path}: pose keypoints give {POSE_CHANNELS} channels, the model takes {cfg.label_nc}")
    candidate, joints = read_keypoints(path)
    height, width = canvas
    if not keypoints_in_frame(candidate, joints, canvas):
        raise DataError(f"{path}: keypoints lie outside the {width}x{height} canvas they are drawn on "
                        "(the exemplar photo's size unless a pose canvas is given)")
    pose = encode_pose(candidate, joints, (height, width), cfg.image_size)
    return expand(pose, "input_map", POSE_CHANNELS)


def read_exemplar(source: PhotoSource, size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """A photo -> ((H, W, 3) uint8 at the model's size, its original (h, w))."""
    if isinstance(source, (str, Path)):
        with _data_errors():
            photo = read_photo(source)
    elif isinstance(source, Image.Image):
        try:
            photo = rgb_array(source)
        except UnsupportedMode as exc:
            raise DataError(f"exemplar: {exc}") from None
    else:
        photo = np.asarray(source)
        if photo.ndim != 3 or photo.shape[2] != 3 or photo.dtype != np.uint8:
            raise DataError(f"an exemplar array must be (H, W, 3) uint8 RGB, got {photo.shape} {photo.dtype}")
    return fit(photo, size, "area"), photo.shape[:2]


def infer_task(source: MapSource, label_nc: int, hint: str | None = None) -> str:
    """The input domain of a map: pose for OpenPose files, else the model's recorded task, else edge for a
    1-channel model and mask otherwise."""
    if isinstance(source, (str, Path)) and is_keypoint_file(source):
        return "pose"
    if hint in TASKS:
        return hint
    return "edge" if label_nc == 1 else "mask"


def image_from_tensor(image: torch.Tensor) -> Image.Image:
    """(3, h, w) in [-1, 1] -> RGB PIL image (the inverse of the loader's expansion)."""
    array = image.detach().float().add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy(), "RGB")


# ---------------------------------------------------------------- the translator


class Translator:
    """A CoCosNet in eval mode plus the preprocessing its training data had.

    task: "mask" | "edge" | "pose" fixes how 2-D map images are read; None infers it per input
    (infer_task). device: where the network runs.
    """

    def __init__(self, net: CoCosNet, task: str | None = None, device: torch.device | str = "cpu"):
        if task is not None and task not in TASKS:
            raise ValueError(f"task must be one of {TASKS} or None, got {task!r}")
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.task = task
        settle_vml_dispatch()  # before the first forward pass of this process

    @property
    def cfg(self) -> ModelConfig:
        return self.net.cfg

    def load_map(self, source: MapSource, task: str | None = None,
                 pose_canvas: tuple[int, int] | None = None) -> torch.Tensor:
        """A map file or object -> (label_nc, H, W) float. pose_canvas: (H, W) of the image the keypoints
        were detected on (required for keypoint files)."""
        task = task or infer_task(source, self.cfg.label_nc, self.task)
        where = _where(source)
        if isinstance(source, (str, Path)) and is_keypoint_file(source):
            if pose_canvas is None:
                raise DataError(f"{where}: the size of the image the keypoints were detected on is needed")
            return pose_to_tensor(source, self.cfg, pose_canvas)
        return map_to_tensor(read_map_array(source, task), task, self.cfg, where)

    def prepare(self, input_map: MapSource, exemplar: PhotoSource, exemplar_map: MapSource | None = None,
                pose_canvas: tuple[int, int] | None = None) -> Prepared:
        """Read and preprocess one pair (no network). The input's pose canvas defaults to the exemplar's size;
        the exemplar's own keypoints are always drawn on the exemplar's size."""
        task = infer_task(input_map, self.cfg.label_nc, self.task)
        photo, photo_size = read_exemplar(exemplar, self.cfg.image_size)
        x_a = self.load_map(input_map, task, pose_canvas or photo_size)
        if exemplar_map is not None:
            y_a = self.load_map(exemplar_map, task, photo_size)
        elif task == "edge" and self.cfg.label_nc == 1:
            y_a = expand(as_edge_map(canny_edges(photo))[None], "exemplar_map", 1)
        else:
            raise DataError(f"{_where(exemplar)}: a {task} model needs the exemplar's own {task} map "
                            "(--exemplar-map); only 1-channel edge models compute it from the photo")
        y_b = expand(photo.transpose(2, 0, 1), "exemplar", self.cfg.label_nc)
        return Prepared(x_a, y_b, y_a)

    @torch.no_grad()
    def run(self, pairs: Sequence[Prepared]) -> list[Translation]:
        """One batched forward pass over prepared pairs."""
        if not pairs:
            return []
        stack = lambda name: torch.stack([getattr(p, name) for p in pairs]).to(self.device)  # noqa: E731
        out = self.net(stack("input_map"), stack("exemplar"), stack("exemplar_map"))
        return [Translation(image_from_tensor(out.image[i]), [image_from_tensor(level[i]) for level in out.warped])
                for i in range(len(pairs))]

    def translate_full(self, input_map: MapSource, exemplar: PhotoSource, exemplar_map: MapSource | None = None,
                       pose_canvas: tuple[int, int] | None = None) -> Translation:
        """The output and the warped exemplar at every level for one pair."""
        return self.run([self.prepare(input_map, exemplar, exemplar_map, pose_canvas)])[0]

    def translate(self, input_map: MapSource, exemplar: PhotoSource, exemplar_map: MapSource | None = None,
                  pose_canvas: tuple[int, int] | None = None) -> Image.Image:
        """Translate one input map in the style of one exemplar photo -> RGB image at the model's size."""
        return self.translate_full(input_map, exemplar, exemplar_map, pose_canvas).image


def resolve_device(device: torch.device | str) -> torch.device:
    """torch.device, refusing CUDA where there is none (with the reason)."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, no GPU visible"
        raise DataError(f"device {device} requested but CUDA is not available (torch {torch.__version__}: {build})")
    return device


def recorded_task(folder: Path) -> str | None:
    """The task written in a model folder's run.json (training and convert-official record it), if any."""
    try:
        task = read_run_info(folder).get("task")
    except (OSError, ValueError):
        return None
    return task if task in TASKS else None


def load(model_ref: str | Path, device: torch.device | str = "cpu", task: str | None = None) -> Translator:
    """A Translator for a model folder (models/, or one written by convert-official) or an MLflow model URI
    (pipeline.model_files.load_model; tracking URI from $MLFLOW_TRACKING_URI, default sqlite:///mlflow.db).
    task: None takes the one recorded in the folder's run.json, else infers it per input (see infer_task)."""
    device = resolve_device(device)
    folder = Path(model_ref)
    return Translator(load_model(model_ref, device), task or (recorded_task(folder) if folder.is_dir() else None),
                      device)


# ---------------------------------------------------------------- a figure of translations


def figure(translator: Translator, shards: str | Path, out: str | Path, rows: int = 4, split: str = "val",
           scale: int | None = None) -> Path:
    """A PNG grid input | exemplar | warped (finest level) | output for the first `rows` images of a shard split,
    each translated with its real (retrieved or listed) exemplar. Tiles are upscaled (nearest) to >= 192 px."""
    from pipeline.data.imageio import atomic_write_bytes
    from pipeline.data.loader import make_loader
    from pipeline.viz import image_to_rgb, map_to_rgb, png_bytes, tile

    cfg = translator.cfg
    loader = make_loader(shards, batch_size=rows, split=split, real_exemplar_prob=1.0, num_workers=0, shuffle=False)
    loader.check_fits(cfg, "the model")
    batch = to_model(next(iter(loader)), cfg.label_nc, translator.device)
    with torch.no_grad():
        result = translator.net(batch["input_map"], batch["exemplar"], batch["exemplar_map"])
    h, w = cfg.image_size
    scale = scale or max(1, -(-192 // min(h, w)))
    size = (h * scale, w * scale)
    columns = {"input": map_to_rgb(batch["input_map"], size), "exemplar": image_to_rgb(batch["exemplar"], size),
               "warped": image_to_rgb(result.warped[-1], size), "output": image_to_rgb(result.image, size)}
    atomic_write_bytes(out, png_bytes(tile(list(columns.values()), titles=list(columns)), compression=9))
    return Path(out)
