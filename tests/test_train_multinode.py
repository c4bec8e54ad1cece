"""Two DDP workers on a simulated two-node Ray cluster (one CPU per node): the workers land on different nodes,
their weights stay bitwise identical, and no sample is read by both in the same epoch."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import ray
import torch
from ray.cluster_utils import Cluster

from pipeline.train.checkpoint import load_state, read_meta
from pipeline.train.launch import runtime_env, run_training
from tests.test_train_ray import params, sqlite_uri

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def two_nodes():
    cluster = Cluster(initialize_head=False)
    nodes = [cluster.add_node(num_cpus=1, object_store_memory=256 * 1024**2) for _ in range(2)]
    ray.init(address=cluster.address, logging_level=logging.ERROR, log_to_driver=False,
             runtime_env=runtime_env(local=True))
    yield [node.unique_id for node in nodes]
    ray.shutdown()
    cluster.shutdown()


def test_two_workers_on_two_nodes_stay_in_sync_on_disjoint_data(two_nodes, train_shards, tmp_path):
    assert len({n["NodeID"] for n in ray.nodes() if n["Alive"]}) == 2
    config = params(tmp_path, sqlite_uri(tmp_path), steps=4, checkpoint_every=2, workers=2,
                    placement_strategy="SPREAD", image_every=100, audit={})
    # gru_grad_iters=1 of 2 PatchMatch iterations leaves the GRU's initial layer without a gradient (frozen),
    # which DDP must not wait for.
    config["model"].update(patchmatch_iters=2, gru_grad_iters=1)
    result = run_training(config, shards=train_shards, models_dir=None, base=tmp_path)
    assert [m["step"] for m in result.reports] == [2, 4]
    for metrics in result.reports:
        assert metrics["world_size"] == 2
        assert metrics["nodes"] == 2  # one worker per node
        assert metrics["ranks_in_sync"] == 1.0  # all-gathered fingerprints of every weight and buffer agree
        assert metrics["data_overlap"] == 0  # no (epoch, sample) read by both ranks
        assert metrics["data_samples"] == 2 * 2 * 2  # ranks x steps since the last report x batch
    checkpoint = result.checkpoint
    assert read_meta(checkpoint)["world_size"] == 2
    files = {p.name for p in Path(checkpoint).iterdir()}
    assert {"state.pt", "meta.json", "rank-0.pt", "rank-1.pt"} <= files  # Ray merged both ranks' parts
    state = load_state(checkpoint)
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["net"].values() if v.is_floating_point())
