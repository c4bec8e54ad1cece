"""Distributed CoCosNet-v2 training: one step function, one worker loop, a Ray Train driver.

    pipeline.train.config      TrainConfig, configs_from_params (params.yaml model:/train:/mlflow: + the manifest)
    pipeline.train.step        train_step (G step, then D step), build_parts, NonFiniteLossError
    pipeline.train.loop        train_loop (what every Ray Train worker runs)
    pipeline.train.launch      run_training (resolve, fit, publish), TrainingResult, TrainingError
    pipeline.train.checkpoint  training checkpoints (plain tensors)
    pipeline.train.raylogs     the setup hook of every Ray worker process (quiet logs)

Only stages (through pipeline/cli/stages.py) and benchmarks use this package; what evaluation, inference and
tracking share with training lives outside it (pipeline/model_files.py, viz.py, tracking.py).
Submodules are imported on demand (Ray and MLflow are heavy imports).
"""
