"""`pipeline evaluate --address` on a real two-node Ray cluster on this machine, and the faults it
survives: an inference actor SIGKILLed mid-run, a worker node gone mid-run.

The cluster is two `ray start` nodes (1 CPU + 1 `inference_core` each), started once for the module.
The node-loss test runs last: it takes the worker node away.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import MOBILENET_INT8, REPO, VAL_1300, need, subset_folder
from pipeline.evaluate import evaluate
from pipeline.local_cluster import LocalCluster

# long enough to interrupt a run in its middle, short enough for 2 busy cores
IMAGES = 400
INFERENCE_ACTOR = "MapWorker(MapBatches(Classifier))"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return subset_folder(need(VAL_1300), tmp_path_factory.mktemp("cluster") / "images", IMAGES)


@pytest.fixture(scope="module")
def single_node(images, tmp_path_factory, ray_local) -> dict:
    """The figures of the same evaluation on one local node: what every cluster run must equal."""
    return evaluate(str(need(MOBILENET_INT8)), str(images), "torch", str(tmp_path_factory.mktemp("single")))


@pytest.fixture(scope="module")
def cluster():
    cluster = LocalCluster()
    try:
        cluster.head(num_cpus=1, inference_cores=1)
        cluster.worker(num_cpus=1, inference_cores=1)
        cluster.wait_for_nodes(2)
        yield cluster
    finally:
        cluster.stop()


def start_evaluation(cluster: LocalCluster, images: Path, output: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "pipeline", "evaluate", "--model", str(MOBILENET_INT8), "--data", str(images),
               "--preset", "torch", "--output", str(output), "--address", cluster.address]
    return subprocess.Popen(command, cwd=REPO, env={**cluster.env, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finished(process: subprocess.Popen, output: Path, images: Path) -> dict:
    """The run's metrics, after checking it succeeded and wrote every image exactly once."""
    log, _ = process.communicate(timeout=600)
    assert process.returncode == 0, log[-3000:]
    keys = pq.read_table(output / "predictions.parquet", columns=["key"]).column("key").to_pylist()
    assert len(keys) == len(set(keys)), "an image was evaluated twice"
    expected = {line.split()[0] for line in (images / "labels.txt").read_text().splitlines() if line.strip()}
    assert set(keys) == expected, "an image is missing from predictions.parquet"
    return json.loads((output / "metrics.json").read_text())


def assert_same_figures(metrics: dict, single_node: dict) -> None:
    fields = ("images", "evaluated", "errors", "top1_correct", "top5_correct")
    assert {f: metrics[f] for f in fields} == {f: single_node[f] for f in fields}


def wait_mid_run(process: subprocess.Popen, output: Path, nodes, timeout: float = 300) -> dict:
    """Wait until the run has inference actors and its first predictions on disk; returns the
    actor PIDs per node. Fails if the run ends first (then nothing was interrupted)."""
    deadline = time.monotonic() + timeout
    partial = output / "predictions.parquet.partial"
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be interrupted"
        actors = {i: node.pids_titled(INFERENCE_ACTOR) for i, node in enumerate(nodes)}
        if all(actors.values()) and partial.exists() and partial.stat().st_size > 0:
            return actors
        time.sleep(0.2)
    raise TimeoutError("the run did not start producing predictions")


def test_two_nodes_give_the_single_node_figures_with_actors_pinned_on_both(cluster, images, single_node,
                                                                            tmp_path):
    metrics = finished(start_evaluation(cluster, images, tmp_path), tmp_path, images)
    assert_same_figures(metrics, single_node)
    nodes = metrics["cluster"]["per_node"]
    assert metrics["cluster"]["nodes"] == 2 and len(nodes) == 2
    assert [n["inference_cores"] for n in nodes] == [1, 1]
    # every node ran inference, each actor on its own core (the nodes share this machine's cores)
    assert all(n["images"] > 0 and len(n["cores_used"]) == 1 for n in nodes)
    assert sum(n["images"] for n in nodes) == IMAGES
    cores = [core for _, core in metrics["cluster"]["cores_used"]]
    assert len(cores) == len(set(cores)) == 2 and min(cores) >= 0
    assert all(n["images_per_s"] > 0 for n in nodes)


def test_a_killed_inference_actor_is_restarted_and_its_batches_redone(cluster, images, single_node, tmp_path):
    process = start_evaluation(cluster, images, tmp_path)
    actors = wait_mid_run(process, tmp_path, cluster.nodes)
    victim = actors[0][0]
    os.kill(victim, signal.SIGKILL)
    assert not (tmp_path / "predictions.parquet").exists(), "the run had already finished"
    metrics = finished(process, tmp_path, images)
    assert_same_figures(metrics, single_node)


def test_a_worker_node_that_leaves_mid_run_loses_no_image(cluster, images, single_node, tmp_path):
    process = start_evaluation(cluster, images, tmp_path)
    wait_mid_run(process, tmp_path, cluster.nodes)
    worker = cluster.nodes[1]
    worker.kill_raylet()
    assert not (tmp_path / "predictions.parquet").exists(), "the run had already finished"
    metrics = finished(process, tmp_path, images)
    assert_same_figures(metrics, single_node)
    assert metrics["cluster"]["nodes"] == 1
    assert worker.process.wait(timeout=60) is not None  # the node is gone, not just its raylet
