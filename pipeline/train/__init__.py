"""Distributed CoCosNet-v2 training: one step function, one worker loop, a Ray Train driver.

    pipeline.train.config   TrainConfig, MlflowConfig, configs_from_params (params.yaml model:/train:/mlflow:)
    pipeline.train.step     train_step (G step, then D step), build_parts, NonFiniteLossError
    pipeline.train.loop     train_loop (what every Ray Train worker runs)
    pipeline.train.launch   run_training (MLflow run + TorchTrainer + export), TrainingResult, TrainingError
    pipeline.train.checkpoint, .export, .grid, .pyfunc_model   checkpoints, models/ folder, sample grids, MLflow model
    pipeline.train.raylogs  the setup hook of every Ray worker process (quiet logs)

Submodules are imported on demand (Ray and MLflow are heavy imports).
"""
