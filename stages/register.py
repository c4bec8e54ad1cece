"""DVC stage `register`: the trained model -> MLflow registry (alias challenger; champion when it is better).

    python -m stages.register [--params params.yaml] [--model models] [--eval metrics/eval.json]

Reads the model's MLflow model URI and run from models/run.json and the candidate's metric (register.metric)
from metrics/eval.json; writes the decision to metrics/register.json and as tags on the model version.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", default="models", help="exported model folder (its run.json names the MLflow model)")
    parser.add_argument("--eval", default="metrics/eval.json", help="metrics written by the evaluate stage")
    parser.add_argument("--out", default="metrics/register.json")
    args = parser.parse_args(argv)
    import mlflow

    from pipeline import tracking
    from pipeline.data.imageio import atomic_write_json
    from pipeline.params import load_params
    from pipeline.registry import RegisterConfig, register_model
    from pipeline.train.config import MlflowConfig
    from pipeline.train.export import RUN_FILE, read_run_info

    try:
        params = load_params(args.params)
        cfg = RegisterConfig.from_dict(params.get("register") or {})
        uri = tracking.tracking_uri(MlflowConfig.from_dict(params.get("mlflow") or {}))
        run_file, eval_file = Path(args.model) / RUN_FILE, Path(args.eval)
        for path in (run_file, eval_file):
            if not path.is_file():
                raise FileNotFoundError(f"{path}: not found (run the train and evaluate stages first)")
        run, metrics = read_run_info(args.model), json.loads(eval_file.read_text())
        if not run.get("model_uri"):
            raise ValueError(f"{run_file}: no MLflow model_uri (was mlflow.log_model false for this training run?)")
        decision = register_model(mlflow.MlflowClient(tracking_uri=uri), run["model_uri"], run.get("mlflow_run_id"),
                                  metrics, cfg, where=args.eval)
    except (ValueError, FileNotFoundError, mlflow.exceptions.MlflowException) as exc:
        print(f"register: error: {exc}", file=sys.stderr)
        return 1
    atomic_write_json(args.out, decision.to_metrics())
    verdict = "champion" if decision.promoted else "challenger (champion unchanged)"
    print(f"register: models:/{cfg.name}/{decision.version} is {verdict}: {decision.reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
