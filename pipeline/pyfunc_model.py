"""MLflow "model from code": the pyfunc wrapper logged with every trained CoCosNet.

MLflow copies this file (not a pickle of it) into the logged model, with the `model` package as code and
two artifacts, model_config.json and state_dict.pt. Loading rebuilds CoCosNet from the config and loads
the weights with torch.load(weights_only=True): nothing from training is unpickled.

    net = mlflow.pyfunc.load_model("models:/cocosnet@champion")
    image = net.predict({"input_map": x_a, "exemplar": y_b, "exemplar_map": y_a})   # (B, 3, H, W) in [-1, 1]

Inputs are float32 arrays: input_map and exemplar_map (B, label_nc, H, W), exemplar (B, 3, H, W) in [-1, 1].
"""
from __future__ import annotations

import json
import warnings

import mlflow
import numpy as np
import torch

INPUT_NAMES = ("input_map", "exemplar", "exemplar_map")


with warnings.catch_warnings(record=True):
    # MLflow advises type hints on predict() when the class is defined (and forces that warning past
    # filters); the inputs, a dict of arrays, are described by the logged tensor signature instead.

    class CoCosNetPyfunc(mlflow.pyfunc.PythonModel):
        def load_context(self, context) -> None:
            from model import CoCosNet, ModelConfig  # shipped with the logged model as code

            with open(context.artifacts["model_config"]) as f:
                cfg = ModelConfig.from_dict(json.load(f))
            self.net = CoCosNet(cfg).eval()
            state = torch.load(context.artifacts["state_dict"], map_location="cpu", weights_only=True)
            self.net.load_state_dict(state)

        def predict(self, context, model_input, params=None):
            missing = [name for name in INPUT_NAMES if name not in model_input]
            if missing:
                raise ValueError(f"CoCosNet needs inputs {list(INPUT_NAMES)}; missing {missing}")
            tensors = [torch.as_tensor(np.asarray(model_input[name], dtype=np.float32)) for name in INPUT_NAMES]
            with torch.no_grad():
                return self.net(*tensors).image.numpy()


mlflow.models.set_model(CoCosNetPyfunc())
