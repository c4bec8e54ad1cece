"""DVC stage `train`: data/shards -> models/ (state dict + ModelConfig), metrics/train.json, reports/train_losses.*

    python -m stages.train [--params params.yaml] [--shards data/shards] [--out models]

The same as `cocosnet train ...`: the stage is pipeline.train.launch.run_training (Ray Train, tracked in MLflow);
its arguments are in pipeline/cli/stages.py.
"""
import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
