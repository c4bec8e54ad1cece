"""DVC stage `register`: the trained model -> MLflow registry (alias challenger; champion when it is better).

    python -m stages.register [--params params.yaml] [--model models] [--eval metrics/eval.json]

The same as `cocosnet register ...`: the stage is pipeline.registry.run_register;
its arguments are in pipeline/cli/stages.py.
"""
import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["register", *sys.argv[1:]]))
