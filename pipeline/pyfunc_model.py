"""MLflow "model from code": the pyfunc wrapper logged with every trained CoCosNet.

MLflow copies this file (not a pickle of it) into the logged model, with the `model` package as code and
two artifacts, model_config.json and state_dict.pt. Loading rebuilds CoCosNet from the config and loads
the weights with torch.load(weights_only=True): nothing from training is unpickled.

    net = mlflow.pyfunc.load_model("models:/cocosnet@champion")
    out = net.predict(pd.DataFrame([{"input_map": b64_png, "exemplar": b64_jpeg, "exemplar_map": b64_png}]))
    out["image"][0]                                   # base64 PNG at the model's size (and out["warped"][0])

Requests and responses are records of base64-encoded files (pipeline/serving.py, which reads them as
`cocosnet translate` does): serve it from the project's environment,
`mlflow models serve -m models:/cocosnet@champion --env-manager local`.
"""
from __future__ import annotations

import json
import warnings

import mlflow
import torch

with warnings.catch_warnings(record=True):
    # MLflow advises type hints on predict() when the class is defined (and forces that warning past
    # filters); the inputs, records of base64 files, are described by the logged column signature instead.

    class CoCosNetPyfunc(mlflow.pyfunc.PythonModel):
        def load_context(self, context) -> None:
            from model import CoCosNet, ModelConfig  # shipped with the logged model as code

            try:
                from pipeline.inference import Translator
                from pipeline.serving import translate_request
            except ModuleNotFoundError as exc:
                raise RuntimeError("the CoCosNet model reads requests with the cocosnet-pipeline package, which is "
                                   f"not installed here ({exc}); serve it from the project's environment with "
                                   "--env-manager local") from None
            with open(context.artifacts["model_config"]) as f:
                cfg = ModelConfig.from_dict(json.load(f))
            net = CoCosNet(cfg).eval()
            state = torch.load(context.artifacts["state_dict"], map_location="cpu", weights_only=True)
            net.load_state_dict(state)
            self.translator, self.translate_request = Translator(net), translate_request

        def predict(self, context, model_input, params=None):
            return self.translate_request(self.translator, model_input)


mlflow.models.set_model(CoCosNetPyfunc())
