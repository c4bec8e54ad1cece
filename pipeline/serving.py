"""The registered model over REST: the JSON request and response of `mlflow models serve`.

    mlflow models serve -m models:/cocosnet@champion --env-manager local --host 127.0.0.1 --port 5001
    curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' -d @request.json

Request: one record per pair in any of MLflow's JSON layouts ("dataframe_records", "dataframe_split", "inputs"),
each field a base64-encoded file (a "data:...;base64," prefix is allowed):

    {"dataframe_records": [{"input_map": "<base64>", "exemplar": "<base64>", "exemplar_map": "<base64>"}]}

    input_map     the structure: an index PNG of class ids (mask models), a grey image of white edges on black
                  (1-channel edge models), or a .npy file (C, H, W) of the map's channels (any model; pose and
                  multi-channel edge models take only this)
    exemplar      the style: a photo in any format Pillow reads (PNG, JPEG, WebP, ...)
    exemplar_map  the exemplar's own map, like input_map; optional for 1-channel edge models, which take the
                  Canny edges of the photo as cocosnet translate does

Response: {"predictions": [{"image": "<base64 PNG>", "warped": "<base64 PNG>"}, ...]}: the output and the exemplar
warped onto the input (finest level), RGB at the model's size. The fields are read by the same code as
`cocosnet translate` (pipeline.inference: scaled to cover the model's size, centre-cropped). A request that does
not match the logged signature is refused by MLflow, and a field that is not base64 of a readable image or array
by translate_request, both with HTTP 400 and the reason.
"""
from __future__ import annotations

import base64
import binascii
import io
import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import ColSpec, Schema
from PIL import Image

from pipeline.data.errors import DataError

if TYPE_CHECKING:
    import pandas as pd

    from model import ModelConfig
    from pipeline.inference import Translator

INPUTS = ("input_map", "exemplar", "exemplar_map")
OUTPUTS = ("image", "warped")
NPY_MAGIC = b"\x93NUMPY"


def signature(cfg: "ModelConfig") -> ModelSignature:
    """String columns of base64 files; exemplar_map is required except for 1-channel edge models."""
    return ModelSignature(
        inputs=Schema([ColSpec("string", "input_map"), ColSpec("string", "exemplar"),
                       ColSpec("string", "exemplar_map", required=cfg.label_nc != 1)]),
        outputs=Schema([ColSpec("string", name) for name in OUTPUTS]))


# ---------------------------------------------------------------- client side: files <-> fields


def encode_file(data: bytes | str | Path) -> str:
    """File bytes (or a file's path) -> a request field."""
    return base64.b64encode(data if isinstance(data, bytes) else Path(data).read_bytes()).decode("ascii")


def encode_png(image: Image.Image | np.ndarray) -> str:
    """A PIL image or (H, W) / (H, W, 3) uint8 array -> base64 PNG (what a response holds)."""
    buffer = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buffer, format="PNG")
    return encode_file(buffer.getvalue())


def encode_npy(array: np.ndarray) -> str:
    """A (C, H, W) map -> base64 .npy (the array form of input_map / exemplar_map)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return encode_file(buffer.getvalue())


def decode_image(field: str) -> Image.Image:
    """A response field -> PIL image."""
    image = Image.open(io.BytesIO(base64.b64decode(field)))
    image.load()
    return image


# ---------------------------------------------------------------- server side


class RequestError(ValueError):
    """A request that cannot be translated; the message names the record and field."""


def field_bytes(value: Any, where: str) -> bytes | None:
    """A request field -> the file's bytes (None when an optional field is absent)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):  # absent in a record of a batch
        return None
    if not isinstance(value, str):
        raise RequestError(f"{where}: expected a base64-encoded file (string), got {type(value).__name__}")
    text = value.strip()
    if text.startswith("data:") and ";base64," in text[:100]:
        text = text.split(",", 1)[1]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(f"{where}: not valid base64 ({exc})") from None
    if not data:
        raise RequestError(f"{where}: empty file")
    return data


def translate_request(translator: "Translator", model_input: "pd.DataFrame | dict") -> "pd.DataFrame":
    """The pyfunc's predict: records of base64 fields -> a DataFrame of base64 PNGs (image, warped).

    Every record is checked before any is translated; then all run in one batch. Raises MlflowException
    (INVALID_PARAMETER_VALUE: HTTP 400) naming the record and field of the first bad one.
    """
    import pandas as pd

    frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
    missing = [name for name in INPUTS[:2] if name not in frame.columns]
    if missing:
        raise MlflowException(f"request is missing {missing}; each record needs {list(INPUTS[:2])} "
                              f"(and exemplar_map except for 1-channel edge models)", INVALID_PARAMETER_VALUE)
    if frame.empty:
        raise MlflowException("request holds no records", INVALID_PARAMETER_VALUE)
    try:
        prepared = [prepare_record(translator, record, row) for row, record in enumerate(frame.to_dict("records"))]
    except RequestError as exc:
        raise MlflowException(str(exc), INVALID_PARAMETER_VALUE) from None
    results = translator.run(prepared)
    return pd.DataFrame({"image": [encode_png(r.image) for r in results],
                         "warped": [encode_png(r.warped[-1]) for r in results]})


def prepare_record(translator: "Translator", record: dict[str, Any], row: int):
    """One record -> pipeline.inference.Prepared. The fields go through temporary files so that they are read
    by exactly the readers of `cocosnet translate`; errors name `record <row> <field>` instead of the file."""
    with tempfile.TemporaryDirectory(prefix="cocosnet-request-") as tmp:
        paths: dict[str, Path] = {}
        for name in INPUTS:
            data = field_bytes(record.get(name), f"record {row} {name}")
            if data is not None:
                paths[name] = Path(tmp) / (name + (".npy" if data.startswith(NPY_MAGIC) else ".image"))
                paths[name].write_bytes(data)
        try:
            return translator.prepare(paths["input_map"], paths["exemplar"], paths.get("exemplar_map"))
        except DataError as exc:
            message = str(exc)
            for name, path in paths.items():
                message = message.replace(str(path), f"record {row} {name}")
            raise RequestError(message) from None
