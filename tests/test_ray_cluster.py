"""Ray as users run it, through the train stage's entry point (`python -m stages.train`, what `dvc repro` and
`dvc exp run -S train.ray_address=...` run):

- a cluster started with the `ray` CLI (`ray start --head`, then a second node with `ray start --address`, each
  with its own temp dir and resources, token authentication on): the stage joins it with the token it finds,
  trains 2 workers on both nodes, the second node is stopped mid-run, and training finishes from the last
  checkpoint with the model logged to MLflow by the driver; without the token the join fails and says what to do;
- the stage's own local Ray listens on 127.0.0.1 only; SIGTERM to the stage stops its Ray and workers and ends the
  MLflow run KILLED; the next run of the same params continues it from its last checkpoint without logging a step
  twice.
"""
from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import yaml

from pipeline.model_files import load_model, read_run_info
from pipeline.train.checkpoint import find_checkpoint
from tests.conftest import REPO_ROOT, TRAIN_DATA
from tests.test_train_step import TINY_MODEL

pytestmark = [pytest.mark.ray, pytest.mark.slow]

STEPS = 8
TIMEOUT_S = 300


def write_params(folder: Path, **train) -> Path:
    params = {"data": dict(TRAIN_DATA), "model": dict(TINY_MODEL),
              "train": {"steps": STEPS, "batch_size": 2, "checkpoint_every": 3, "log_every": 1, "image_every": 100,
                        "keep_checkpoints": 5, "loader_workers": 0, "cpus_per_worker": 1, **train},
              "mlflow": {"tracking_uri": f"sqlite:///{folder / 'mlflow.db'}", "experiment": "test"}}
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def start_stage(folder: Path, shards: Path, env: dict[str, str]) -> subprocess.Popen:
    """`python -m stages.train` in `folder` (its base: checkpoints/, models/, metrics/ land there); its output
    goes to folder/stage.log."""
    command = [sys.executable, "-m", "stages.train", "--params", "params.yaml", "--shards", str(shards),
               "--out", "models", "--metrics", "metrics/train.json", "--curves", "reports/train_losses.csv"]
    with open(folder / "stage.log", "w") as log:
        stage = subprocess.Popen(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
    stage.log = folder / "stage.log"  # type: ignore[attr-defined]
    return stage


def finish(stage: subprocess.Popen) -> tuple[int, str]:
    try:
        stage.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        stage.kill()
        stage.wait()
        pytest.fail(f"the stage ran longer than {TIMEOUT_S} s:\n{stage.log.read_text()[-6000:]}")
    return stage.returncode, stage.log.read_text()


def stage_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    return {**env, "PYTHONPATH": str(REPO_ROOT), "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1",
            "NO_ALBUMENTATIONS_UPDATE": "1", **extra}


def wait_for(condition, what: str, stage: subprocess.Popen, timeout: float = TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if stage.poll() is not None:
            pytest.fail(f"the stage ended ({stage.returncode}) before {what}:\n{stage.log.read_text()[-6000:]}")
        time.sleep(0.5)
    pytest.fail(f"no {what} within {timeout} s")


def first_checkpoint(run_root: Path) -> Path | None:
    """The run's latest checkpoint that Ray Train has registered (the one a restart resumes from), or None."""
    try:
        return find_checkpoint(next(p for p in run_root.iterdir() if p.is_dir()))
    except (StopIteration, FileNotFoundError, ValueError):
        return None


def runs(uri: str) -> list:
    client = mlflow.MlflowClient(uri)
    return client.search_runs([client.get_experiment_by_name("test").experiment_id])


def logged_steps(uri: str, run_id: str) -> list[int]:
    history = mlflow.MlflowClient(uri).get_metric_history(run_id, "g/total")
    return [m.step for m in sorted(history, key=lambda m: (m.timestamp, m.step))]


def listening(processes: list[psutil.Process]) -> set[str]:
    """"host:port process" of every TCP socket the processes listen on."""
    found = set()
    for process in processes:
        try:
            connections = process.net_connections(kind="tcp")
        except psutil.Error:
            continue
        found |= {f"{c.laddr.ip}:{c.laddr.port} {process.name()}" for c in connections
                  if c.status == psutil.CONN_LISTEN}
    return found


# ---------------------------------------------------------------- a cluster started with the ray CLI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_processes(temp_dir: str) -> list[psutil.Process]:
    """The Ray processes of one node (their command lines name its temp dir) and their children (workers)."""
    roots = [p for p in psutil.process_iter(["cmdline"]) if p.pid != os.getpid()
             and any(temp_dir in arg for arg in p.info["cmdline"] or [])]
    found = {p.pid: p for p in roots}
    for root in roots:
        try:
            found |= {child.pid: child for child in root.children(recursive=True)}
        except psutil.Error:
            pass
    return list(found.values())


def stop_node(temp_dir: str) -> None:
    """`ray stop` for one node only (`ray stop` itself stops every Ray of this user on the machine)."""
    for _ in range(3):  # again, for any process a first pass missed or that a dying one started
        processes = node_processes(temp_dir)
        if not processes:
            return
        for process in processes:
            try:
                process.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(processes, timeout=15)
        for process in alive:
            try:
                process.kill()
            except psutil.Error:
                pass


class RayCluster:
    """A head and a second node started with the `ray` CLI, with token authentication (a token file of its own)."""

    def __init__(self, work: Path):
        # Ray's socket paths must stay under 107 characters: a short temp dir per node.
        base = os.environ.get("RAY_TMPDIR") or "/tmp"
        base = base if len(base) < 30 else "/tmp"
        os.makedirs(base, exist_ok=True)
        self.root = tempfile.mkdtemp(prefix="rc-", dir=base)
        self.head_dir, self.node_dir = f"{self.root}/head", f"{self.root}/node"
        self.token_file = work / "ray_token"
        self.token_file.write_text(secrets.token_hex(32))
        self.address = f"127.0.0.1:{free_port()}"
        self.env = {**stage_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_file)}

    def ray_start(self, *args: str) -> None:
        result = subprocess.run([str(Path(sys.executable).parent / "ray"), "start", "--disable-usage-stats",
                                 f"--object-store-memory={256 * 1024**2}", *args],
                                env=self.env, capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, f"ray start {' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"

    def start(self) -> None:
        port = self.address.rsplit(":", 1)[1]
        # The head takes both workers after the second node is gone (2 CPUs); the node holds one (1 CPU).
        self.ray_start("--head", f"--port={port}", f"--temp-dir={self.head_dir}", "--num-cpus=2",
                       "--include-dashboard=false")
        self.ray_start(f"--address={self.address}", f"--temp-dir={self.node_dir}", "--num-cpus=1",
                       '--resources={"second_node": 1}')

    def stop(self) -> None:
        for temp_dir in (self.node_dir, self.head_dir):
            stop_node(temp_dir)
        subprocess.run(["rm", "-rf", self.root], check=False)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = RayCluster(tmp_path_factory.mktemp("cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def test_the_stage_trains_on_a_cli_cluster_and_finishes_after_losing_a_node(cluster, train_shards, tmp_path):
    write_params(tmp_path, ray_address=cluster.address, workers=2, placement_strategy="SPREAD", max_failures=2)
    # The driver finds the token through RAY_AUTH_TOKEN_PATH alone (RAY_AUTH_MODE unset), as with ~/.ray/auth_token.
    stage = start_stage(tmp_path, train_shards, stage_env(RAY_AUTH_TOKEN_PATH=str(cluster.token_file)))
    try:
        wait_for(lambda: first_checkpoint(tmp_path / "checkpoints"), "first checkpoint", stage)
        # A Ray Train worker runs on the second node (a child of its raylet): stopping the node kills it mid-run.
        workers = [p for p in node_processes(cluster.node_dir) if "RayTrainWorker" in " ".join(p.cmdline())]
        # (a worker's command line is its title, e.g. ray::RayTrainWorker.run_train_fn)
        assert workers, "no training worker on the second node"
        stop_node(cluster.node_dir)
        code, output = finish(stage)
    finally:
        if stage.poll() is None:
            stage.kill()
    assert code == 0, output[-6000:]
    assert "resumed after step 3" in output  # Ray Train restarted the group from the last checkpoint
    run = read_run_info(tmp_path / "models")
    assert run["step"] == STEPS
    client = mlflow.MlflowClient(run["tracking_uri"])
    assert client.get_run(run["mlflow_run_id"]).info.status == "FINISHED"
    assert logged_steps(run["tracking_uri"], run["mlflow_run_id"]) == list(range(1, STEPS + 1))  # none twice
    # The model was logged by the driver from this source tree (a worker's shipped copy could not be logged).
    mlflow.set_tracking_uri(run["tracking_uri"])
    try:
        logged = load_model(run["model_uri"])
    finally:
        mlflow.set_tracking_uri(None)
    exported = load_model(tmp_path / "models")
    assert all(v.equal(exported.state_dict()[k]) for k, v in logged.state_dict().items())


def test_joining_without_the_token_fails_and_says_what_to_do(cluster, train_shards, tmp_path):
    write_params(tmp_path, ray_address=cluster.address)
    home = tmp_path / "home"  # no ~/.ray/auth_token there
    home.mkdir()
    code, output = finish(start_stage(tmp_path, train_shards, stage_env(HOME=str(home))))
    assert code == 1, output[-4000:]
    assert f"could not join the Ray cluster at train.ray_address={cluster.address}" in output
    assert "found no Ray token" in output and "ray get-auth-token" in output
    assert not (tmp_path / "mlflow.db").exists()  # the join comes first: no MLflow run for a failed one


# ---------------------------------------------------------------- the stage's own Ray, interrupted


def test_sigterm_kills_the_run_and_the_next_run_continues_it(train_shards, tmp_path):
    """SIGTERM to the stage; then a re-run whose parent dies as a killed `dvc repro` does; then a run that ends."""
    write_params(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    stage = start_stage(tmp_path, train_shards, stage_env())
    try:
        wait_for(lambda: first_checkpoint(tmp_path / "checkpoints"), "first checkpoint", stage)
        tree = [psutil.Process(stage.pid), *psutil.Process(stage.pid).children(recursive=True)]
        addresses = listening(tree)
        exposed = {a for a in addresses if not a.startswith(("127.0.0.1:", "::ffff:127.0.0.1:"))}
        # Ray's GCS, raylet, agents and workers listen on 127.0.0.1. The one exception is torch's: rank 0 hosts
        # the DDP rendezvous store (TCPStore), which binds every interface and offers no bind address.
        assert len(addresses) > 5 and len(exposed) <= 1 and all(a.endswith("RayTrainWorker") for a in exposed), \
            addresses
        stage.send_signal(signal.SIGTERM)
        code, output = finish(stage)
    finally:
        if stage.poll() is None:
            stage.kill()
    assert code == 130, output[-6000:]
    assert "ended KILLED" in output
    _, alive = psutil.wait_procs(tree[1:], timeout=30)
    assert not alive, f"still running after the stage ended: {[p.name() for p in alive]}"
    (run,) = runs(uri)
    assert run.info.status == "KILLED"
    killed_at = logged_steps(uri, run.info.run_id)
    assert killed_at and killed_at[-1] < STEPS
    assert first_checkpoint(tmp_path / "checkpoints") is not None  # kept

    # DVC runs the stage as its child (`$SHELL -c cmd` execs it) with DVC_STAGE set; when DVC is killed the
    # stage must stop too. Here the parent is a shell that does not exec, killed once training is under way.
    parent = subprocess.Popen(["sh", "-c", f"{sys.executable} -m stages.train --params params.yaml --shards "
                               f"{train_shards} --out models > stage.log 2>&1; exit 0"],
                              cwd=tmp_path, env=stage_env(DVC_STAGE="train"))
    parent.log = tmp_path / "stage.log"  # type: ignore[attr-defined]
    try:
        wait_for(lambda: "resumed after step" in parent.log.read_text(), "resumed training", parent)
        (child,) = psutil.Process(parent.pid).children()
        parent.kill()
        parent.wait()
        child.wait(timeout=120)  # (not our child: its exit code is the shell's to read)
    finally:
        if parent.poll() is None:
            parent.kill()
    output = parent.log.read_text()
    assert f"continuing MLflow run {run.info.run_id}" in output and "the parent process is gone" in output
    assert "ended KILLED" in output and "cocosnet train: interrupted" in output
    (run,) = runs(uri)
    assert run.info.status == "KILLED"

    code, output = finish(start_stage(tmp_path, train_shards, stage_env()))
    assert code == 0, output[-6000:]
    assert f"continuing MLflow run {run.info.run_id}" in output and "resumed after step" in output
    (resumed,) = runs(uri)
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert logged_steps(uri, run.info.run_id) == list(range(1, STEPS + 1))  # no step logged twice
    assert read_run_info(tmp_path / "models")["step"] == STEPS
