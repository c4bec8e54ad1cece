"""The driver of a training run in three steps: resolve (configs, paths), fit (MLflow run, Ray, TorchTrainer),
publish (the exported model, metrics and loss curves).

    result = run_training(load_params("params.yaml"))     # what `python -m stages.train` does

`train.ray_address: local` starts a small Ray inside this process sized for the machine, listening on 127.0.0.1
only, with Ray's token authentication and a temp dir of its own; any other value (`<head>:6379`, `ray://head:10001`
or `auto`) joins that cluster, presenting this machine's Ray token when it has one, and ships the `model` and
`pipeline` packages to it. An already initialised Ray (tests, notebooks) is used as it is.

The model is logged to MLflow here, by the driver, from this source tree (not from the copy Ray shipped to the
workers). SIGINT and SIGTERM (and, under DVC, the loss of the parent process) abort the workers and end the MLflow
run KILLED; with `train.resume: auto` the next run of the same params continues that run from its last checkpoint.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import ray
import ray.train
from ray.train.torch import TorchTrainer

import model as model_package
import pipeline as pipeline_package
from model import ModelConfig
from pipeline import tracking, viz
from pipeline.data.imageio import atomic_write_bytes, atomic_write_json
from pipeline.data.schema import read_manifest, require_class_channels, require_self_pairs, verify_split
from pipeline.model_files import export_model
from pipeline.tracking import MlflowConfig
from pipeline.train.checkpoint import find_checkpoint, load_state
from pipeline.train.config import TrainConfig, configs_from_params
from pipeline.train.loop import train_loop

REPO_ROOT = Path(pipeline_package.__file__).resolve().parents[1]
LOCAL_OBJECT_STORE_BYTES = 512 * 1024**2  # Ray's default would take 30% of RAM; checkpoints go to disk
# Ray's unix sockets live in <temp dir>/session_<date>_<time>_<pid>/sockets/ (~62 characters) and a socket path
# may not exceed 107 characters.
MAX_RAY_TEMP_DIR = 44
RESUMABLE = ("KILLED", "FAILED", "RUNNING")  # MLflow run states that train.resume: auto continues
NOT_IN_FINGERPRINT = ("resume", "ray_address", "max_failures")  # how to run, not what is trained


class TrainingError(RuntimeError):
    """Training failed after its retries; the message names the cause and the last good checkpoint."""


@dataclass
class TrainingResult:
    run_id: str
    tracking_uri: str
    run_dir: str  # Ray run folder: pass it as train.resume_from to continue this run
    checkpoint: str  # the final checkpoint
    model_dir: Path | None  # the exported model (None when not exported)
    model_uri: str | None  # the logged MLflow model
    metrics: dict[str, Any]  # the last report: losses over the last interval, agreement across ranks
    reports: list[dict[str, Any]]  # the reports of the kept checkpoints, oldest first
    wall_s: float


def say(message: str) -> None:
    print(f"[train] {message}", flush=True)


# ---------------------------------------------------------------- Ray


def runtime_env(local: bool) -> dict[str, Any]:
    """Local workers import this checkout; a cluster's workers get the driver's `model` and `pipeline`
    packages shipped with the job (the dependencies must be installed on its nodes)."""
    env: dict[str, Any] = {"worker_process_setup_hook": "pipeline.train.raylogs.quiet"}
    if local:
        python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        # OpenMP threads that spin while waiting make a shared machine crawl: with another busy process on a
        # 2-core box, a 2-thread forward pass took 18 s spinning and 0.6 s with passive waiting.
        env["env_vars"] = {"PYTHONPATH": python_path, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    else:
        env["py_modules"] = [str(Path(model_package.__file__).parent), str(Path(pipeline_package.__file__).parent)]
    return env


def local_ray_options(num_cpus: int | None = None, log_to_driver: bool = True,
                      temp_dir: str | None = None) -> dict[str, Any]:
    """ray.init arguments for a small, quiet Ray on this machine (also used by the tests and benchmarks)."""
    options = {"num_cpus": num_cpus or os.cpu_count(), "include_dashboard": False,
               "object_store_memory": LOCAL_OBJECT_STORE_BYTES, "logging_level": logging.ERROR,
               "log_to_driver": log_to_driver, "runtime_env": runtime_env(local=True)}
    if temp_dir:
        options["_temp_dir"] = temp_dir
    return options


def ray_temp_dir() -> str:
    """A fresh temp dir for one local Ray (under $RAY_TMPDIR, else /tmp): Rays of two runs on one host never share
    one, so neither finds nor joins the other's session."""
    base = os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()
    if len(base) + len("/cocosnet-ray-12345678") > MAX_RAY_TEMP_DIR:
        base = "/tmp"  # Ray's socket paths would pass the 107-character limit
    os.makedirs(base, exist_ok=True)  # Ray creates $RAY_TMPDIR when it is missing: so do we
    return tempfile.mkdtemp(prefix="cocosnet-ray-", dir=base)


@contextmanager
def loopback_only() -> Iterator[None]:
    """Make a new local Ray listen on 127.0.0.1 alone. On Linux Ray gives the node the machine's address and
    binds GCS, raylet and workers to all interfaces (`*:port`); with its macOS/Windows single-machine setting
    (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read at import, hence set here) the node address is 127.0.0.1 and
    every server binds to it."""
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def present_ray_token() -> bool:
    """Use token authentication when this machine has a Ray token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token) and RAY_AUTH_MODE is not set; -> whether the driver presents one. Ray does this by itself
    for `auto` alone: with an explicit address its driver presents no token, and a `ray start --head` cluster
    that uses one (Ray 2.60 turns it on when the head has a token) refuses it."""
    try:
        from ray._private.authentication import authentication_token_setup as auth
    except ImportError:  # a Ray without token authentication
        return False
    quiet = logging.getLogger(auth.__name__)
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its warning speaks of starting a cluster, not of joining one
    try:
        return auth.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    finally:
        quiet.setLevel(level)


def join_advice(address: str, err: Exception, token: bool) -> str:
    cause = next((line.strip() for line in reversed(str(err).splitlines()) if line.strip()), repr(err))
    presented = ("this driver presented the token it found (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or "
                 "~/.ray/auth_token): it must be the cluster's own" if token else
                 "this driver found no Ray token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)")
    return (f"could not join the Ray cluster at train.ray_address={address}: {type(err).__name__}: {cause}\n"
            f"Check that the cluster is up and reachable from here (`ray status --address {address}`). A cluster "
            f"started with token authentication needs its token on every node and on this driver; "
            f"{presented}. Print the head's token with `ray get-auth-token` on the head and export it here as "
            f"RAY_AUTH_TOKEN (or put it in ~/.ray/auth_token); set RAY_AUTH_MODE=token on nodes that join "
            f"with `ray start --address`.")


@contextmanager
def ray_session(cfg: TrainConfig) -> Iterator[None]:
    """Start or join Ray for one run, and leave it at the end: a Ray started here is shut down (its workers
    with it) and its temp dir removed. An already initialised Ray (tests, notebooks) is used as it is."""
    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    temp_dir = None
    if cfg.ray_address == "local":
        temp_dir = ray_temp_dir()
        with loopback_only():  # Ray 2.60 also turns token authentication on for a new local Ray
            ray.init(**local_ray_options(temp_dir=temp_dir))
    else:
        token = False
        try:
            token = present_ray_token()
            ray.init(address=cfg.ray_address, logging_level=logging.ERROR, runtime_env=runtime_env(local=False))
        except Exception as err:  # ConnectionError, AuthenticationError, ValueError of a bad address
            raise TrainingError(join_advice(cfg.ray_address, err, token)) from err
    try:
        yield
    finally:
        ray.shutdown()
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)


def scaling_config(cfg: TrainConfig) -> ray.train.ScalingConfig:
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = cfg.gpus_per_worker
    return ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker=resources,
                                   placement_strategy=cfg.placement_strategy)


def storage_path(cfg: TrainConfig, base: Path) -> str:
    """Absolute local folder, or a URI (s3://, gs://, ...) as given."""
    if "://" in cfg.storage_path:
        return cfg.storage_path
    return str((base / cfg.storage_path).resolve())


# ---------------------------------------------------------------- failures


def describe_failure(err: Exception, run_dir: str) -> str:
    """The root cause of a failed fit, with the last good checkpoint to resume from."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [repr(err)]
    cause = next((line for line in lines if "NonFiniteLossError" in line), lines[-1])
    try:
        last = (f"last good checkpoint: {find_checkpoint(run_dir)} (run again to continue it, train.resume: auto; "
                f"or set train.resume_from)")
    except (FileNotFoundError, ValueError):
        last = "no checkpoint was written"
    return f"training failed: {cause}\n{last}"


# ---------------------------------------------------------------- interruption


def orphan_watch(stop: threading.Event, parent: int) -> None:
    """SIGTERM this process once its parent is gone (polls every second until `stop`)."""
    while not stop.wait(1.0):
        if os.getppid() != parent:
            say("the parent process is gone: stopping")
            os.kill(os.getpid(), signal.SIGTERM)
            return


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM stops a run the way SIGINT does: during fit Ray Train's SIGINT handler aborts the workers (then
    exits with SystemExit), elsewhere it is a KeyboardInterrupt. Under DVC (DVC_STAGE is set), losing the parent
    counts as SIGTERM: a killed `dvc repro` must not leave training to write outputs behind its back (the stage
    is its child: the shell execs a single command). Handlers are restored at the end; only the main thread can
    install them, elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}

    def on_sigterm(number: int, frame: Any) -> None:
        handler = signal.getsignal(signal.SIGINT)
        if not callable(handler):  # SIGINT ignored (a background job): stop all the same
            raise KeyboardInterrupt
        handler(number, frame)

    signal.signal(signal.SIGTERM, on_sigterm)
    stop = threading.Event()
    if os.environ.get("DVC_STAGE"):
        threading.Thread(target=orphan_watch, args=(stop, os.getppid()), daemon=True, name="orphan-watch").start()
    try:
        yield
    finally:
        stop.set()
        for number, handler in saved.items():
            signal.signal(number, handler)


# ---------------------------------------------------------------- outputs


def write_curves(uri: str, run_id: str, csv_path: Path, png_path: Path | None) -> None:
    """Loss curves from the run's metric history -> a CSV for `dvc plots` and a PNG beside it."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    keys = sorted(k for k in client.get_run(run_id).data.metrics if k.startswith(("g/", "d/")) or k == "samples_per_s")
    rows: dict[int, dict[str, float]] = {}
    for key in keys:
        for point in client.get_metric_history(run_id, key):
            rows.setdefault(point.step, {"step": point.step})[key.replace("/", "_")] = point.value
    columns = ["step", *[k.replace("/", "_") for k in keys]]
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = csv_path.with_name(f".{csv_path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows[step] for step in sorted(rows))
    os.replace(tmp, csv_path)
    if png_path is not None and rows:
        atomic_write_bytes(png_path, viz.figure_png(viz.loss_figure([rows[s] for s in sorted(rows)])))


# ---------------------------------------------------------------- the run


@dataclass(frozen=True)
class Plan:
    """A training run resolved from params.yaml and the shard manifest: typed configs, absolute paths, names."""

    params: Mapping[str, Any]  # as given (recorded in MLflow with the training sections resolved)
    train: TrainConfig
    model: ModelConfig
    mlflow: MlflowConfig
    manifest: dict[str, Any]
    shard_dir: Path
    base: Path
    tracking_uri: str
    run_name: str
    storage: str
    resume_from: str | None

    @property
    def run_dir(self) -> str:
        return f"{self.storage}/{self.run_name}"


def resolve(params: Mapping[str, Any], shards: str | Path = "data/shards", base: str | Path = ".") -> Plan:
    """Configs and paths of a run; relative paths (shards, storage, vgg weights, sqlite tracking URI, artifacts)
    are resolved against `base`, since Ray workers run in another folder. Nothing is created yet."""
    base = Path(base).resolve()
    shard_dir = (base / shards).resolve()
    manifest, _ = read_manifest(shard_dir)
    train_cfg, model_cfg, mlflow_cfg = configs_from_params(params, manifest)
    if train_cfg.loss_weights.class_nce:
        require_class_channels(manifest, shard_dir / "manifest.json")
    verify_split(shard_dir, "train", train_cfg.verify_shards)  # a bad shard is no worker failure for Ray to retry
    if train_cfg.video_like:  # as a bad shard: fail here, not in every worker
        require_self_pairs(manifest, shard_dir / "manifest.json", "train")
    if train_cfg.vgg_weights not in ("random", "imagenet"):
        train_cfg = dataclasses.replace(train_cfg, vgg_weights=str((base / train_cfg.vgg_weights).resolve()))
    resume_from = train_cfg.resume_from
    if resume_from and "://" not in resume_from:
        resume_from = str((base / resume_from).resolve())
    # A fresh folder per run: Ray would continue a run whose folder already exists (so a fixed
    # train.run_name re-run continues that run from its latest checkpoint).
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    return Plan(params=params, train=train_cfg, model=model_cfg, mlflow=mlflow_cfg, manifest=manifest,
                shard_dir=shard_dir, base=base, tracking_uri=tracking.tracking_uri(mlflow_cfg, base),
                run_name=train_cfg.run_name or f"{mlflow_cfg.experiment}-{stamp}",
                storage=storage_path(train_cfg, base), resume_from=resume_from)


def run_fingerprint(plan: Plan) -> str:
    """What is trained (model, training settings, storage, the shards' manifest), not how it runs."""
    train = {k: v for k, v in plan.train.to_dict().items() if k not in NOT_IN_FINGERPRINT}
    what = {"model": plan.model.to_dict(), "train": train, "storage": plan.storage,
            "shards": tracking.manifest_sha256(plan.shard_dir)}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:20]


def this_driver() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def driver_alive(driver: str | None) -> bool:
    """Is the driver recorded on a RUNNING run (host:pid) still running on this host?"""
    host, _, pid = (driver or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def interrupted_run(plan: Plan, experiment_id: str, fingerprint: str) -> tuple[Any, Path] | None:
    """-> (MLflow run, its last checkpoint) of the newest run of the same params when it stopped before finishing
    (KILLED, FAILED, or RUNNING with its driver gone) and left a checkpoint; else None."""
    import mlflow

    runs = mlflow.MlflowClient(plan.tracking_uri).search_runs(
        [experiment_id], f"tags.fingerprint = '{fingerprint}'", order_by=["attributes.start_time DESC"],
        max_results=1)
    if not runs or runs[0].info.status not in RESUMABLE or "stopped_by_guard" in runs[0].data.tags:
        return None  # a guard's stop is deterministic: continuing would stop again
    run = runs[0]
    if run.info.status == "RUNNING" and driver_alive(run.data.tags.get("driver")):
        return None  # a run of the same params is training right now
    try:
        return run, find_checkpoint(run.data.tags.get("ray.run_dir", ""))
    except (FileNotFoundError, ValueError):
        return None


def start_run(plan: Plan) -> tuple[Plan, str]:
    """The MLflow run of this training -> (plan, run id). With train.resume: auto (and no resume_from) an
    interrupted run of the same params is continued: same MLflow run, same Ray run folder, from which Ray Train
    restores its last checkpoint; rank 0 does not log again the steps that run had logged."""
    cfg, uri = plan.train, plan.tracking_uri
    experiment_id = tracking.ensure_experiment(uri, plan.mlflow, plan.base)
    fingerprint = run_fingerprint(plan)
    previous = interrupted_run(plan, experiment_id, fingerprint) if cfg.resume == "auto" and not plan.resume_from \
        else None
    if previous is not None:
        run, checkpoint = previous
        tracking.reopen_run(uri, run.info.run_id, {"driver": this_driver(), "resumed_from": str(checkpoint)})
        plan = dataclasses.replace(plan, run_name=run.info.run_name)
        say(f"train.resume: auto: continuing MLflow run {run.info.run_id} ({run.info.run_name}, "
            f"{run.info.status}) from {checkpoint}")
        return plan, run.info.run_id
    if cfg.vgg_weights == "random":
        say("WARNING: train.vgg_weights=random: VGG19 has RANDOM weights, so the perceptual, feature-matching "
            "and contextual losses do not measure image quality. Use a vgg19_conv.pth path or 'imagenet'.")
    tags = {"vgg_weights": cfg.vgg_weights, "shards.manifest_sha256": tracking.manifest_sha256(plan.shard_dir),
            "shards.path": str(plan.shard_dir), "ray.run_dir": plan.run_dir, "workers": str(cfg.workers),
            "fingerprint": fingerprint, "driver": this_driver()}
    if plan.resume_from:
        tags["resumed_from"] = plan.resume_from
    resolved = {**plan.params, "model": plan.model.to_dict(), "train": cfg.to_dict(),
                "mlflow": dataclasses.asdict(plan.mlflow) | {"tracking_uri": uri}}  # defaults are recorded too
    run_id = tracking.create_run(uri, experiment_id, plan.run_name, resolved, tags)
    say(f"MLflow run {run_id} ({plan.run_name}) at {uri}; checkpoints in {plan.run_dir}")
    return plan, run_id


def fit(plan: Plan, run_id: str) -> tuple[ray.train.Result, float]:
    """Train on Ray into MLflow run `run_id`. -> (Ray's result, wall seconds); a failure raises TrainingError
    naming the cause and the last good checkpoint."""
    cfg, uri = plan.train, plan.tracking_uri
    config = {"train": cfg.to_dict(), "model": plan.model.to_dict(), "shards": str(plan.shard_dir),
              "resume_from": plan.resume_from, "class_channels": plan.manifest.get("class_channels"),
              "mlflow": {"tracking_uri": uri, "run_id": run_id, "system_metrics": plan.mlflow.system_metrics}}
    trainer = TorchTrainer(
        train_loop, train_loop_config=config, scaling_config=scaling_config(cfg),
        run_config=ray.train.RunConfig(
            name=plan.run_name, storage_path=plan.storage,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures)))
    start = time.perf_counter()
    try:
        result = trainer.fit()
        stopped = (result.return_value or {}).get("stopped")
        if stopped:  # a guard stopped every worker (pipeline/train/guard.py): deterministic, so not retried
            tracking.mlflow.MlflowClient(uri).set_tag(run_id, "stopped_by_guard", stopped[:5000])
            raise FloatingPointError(stopped)
    except Exception as err:
        raise TrainingError(describe_failure(err, plan.run_dir)) from err
    return result, time.perf_counter() - start


def publish(plan: Plan, run_id: str, result: ray.train.Result, wall: float, models_dir: str | Path | None = "models",
            metrics_path: str | Path | None = None, curves_path: str | Path | None = None) -> TrainingResult:
    """The finished run's outputs: the final generator logged to the MLflow run (from this source tree, as Ray
    advises for MLflow models: the workers may run a shipped copy of it) and exported to models_dir (with
    run.json), the run ended FINISHED, the last report as metrics_path, the loss curves as curves_path (+ .png)."""
    uri = plan.tracking_uri
    with result.checkpoint.as_directory() as folder:
        state = load_state(folder)
    model_uri = tracking.log_model_to_run(uri, run_id, state["net"], plan.model) if plan.mlflow.log_model else None
    model_dir = None
    if models_dir:
        run_info = {"mlflow_run_id": run_id, "tracking_uri": uri, "model_uri": model_uri, "step": int(state["step"]),
                    "checkpoint": result.checkpoint.path, "ray_run_dir": plan.run_dir,
                    "task": plan.manifest["task"], "source": plan.manifest["source"]}  # inference reads the task
        model_dir = export_model(plan.base / models_dir, state["net"], plan.model, run_info)
    tracking.end_run(uri, run_id, "FINISHED")
    metrics = dict(result.metrics or {})
    if metrics_path:
        atomic_write_json(plan.base / metrics_path,
                          {**metrics, "wall_s": round(wall, 1), "global_batch": plan.train.global_batch})
    if curves_path:
        curves = plan.base / curves_path
        write_curves(uri, run_id, curves, curves.with_suffix(".png"))
    say(f"done in {wall:.0f}s: step {metrics.get('step')}, model {model_dir or '-'}, MLflow model {model_uri or '-'}")
    return TrainingResult(run_id=run_id, tracking_uri=uri, run_dir=plan.run_dir, checkpoint=result.checkpoint.path,
                          model_dir=model_dir, model_uri=model_uri, metrics=metrics,
                          reports=[dict(m) for _, m in result.best_checkpoints or []], wall_s=wall)


def run_training(params: Mapping[str, Any], *, shards: str | Path = "data/shards",
                 models_dir: str | Path | None = "models", metrics_path: str | Path | None = None,
                 curves_path: str | Path | None = None, base: str | Path = ".") -> TrainingResult:
    """The train stage: resolve the run, start or join Ray, start (or continue) its MLflow run, fit, publish
    (see each). An interruption (SIGINT, SIGTERM) ends the MLflow run KILLED and raises KeyboardInterrupt; any
    other failure ends it FAILED."""
    plan = resolve(params, shards, base)
    with ray_session(plan.train), stop_on_signals():  # after ray.init, which sets a SIGTERM handler of its own
        plan, run_id = start_run(plan)
        try:
            result, wall = fit(plan, run_id)
            return publish(plan, run_id, result, wall, models_dir, metrics_path, curves_path)
        except (KeyboardInterrupt, SystemExit) as stop:  # SystemExit: Ray Train's SIGINT handler after its abort
            tracking.end_run(plan.tracking_uri, run_id, "KILLED")
            try:
                last = f"last checkpoint {find_checkpoint(plan.run_dir)}; run again to continue (train.resume: auto)"
            except (FileNotFoundError, ValueError):
                last = "no checkpoint was written"
            say(f"interrupted: MLflow run {run_id} ended KILLED; {last}")
            raise KeyboardInterrupt from stop
        except BaseException:
            tracking.end_run(plan.tracking_uri, run_id, "FAILED")
            raise
