"""`pipeline evaluate --address` on a real two-node Ray cluster on this machine, the faults it
survives (an inference actor SIGKILLed mid-run, a worker node gone mid-run), and the cluster
launcher configuration in deploy/, checked with Ray's own validation.

The cluster is two `ray start` nodes (1 CPU + 1 `inference_core` each), started once for the module.
The node-loss test runs last: it takes the worker node away.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from helpers import MOBILENET_INT8, REPO, VAL_1300, need, subset_folder
from pipeline.evaluate import evaluate
from pipeline.cores import parse_cpu_list, physical_cores_first, thread_siblings
from pipeline.runtime import INFERENCE_RESOURCE
from testkit.local_cluster import LocalCluster

# long enough to interrupt a run in its middle, short enough for 2 busy cores
IMAGES = 400
INFERENCE_ACTOR = "MapWorker(MapBatches(Classifier))"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return subset_folder(need(VAL_1300), tmp_path_factory.mktemp("cluster") / "images", IMAGES)


@pytest.fixture(scope="module")
def single_node_output(images, tmp_path_factory, ray_local) -> Path:
    """The same evaluation on one local node: its figures are what every cluster run must equal."""
    output = tmp_path_factory.mktemp("single")
    evaluate(str(need(MOBILENET_INT8)), str(images), "torch", str(output))
    return output


@pytest.fixture(scope="module")
def single_node(single_node_output) -> dict:
    return json.loads((single_node_output / "metrics.json").read_text())


@pytest.fixture(scope="module")
def a_third_written(single_node_output) -> int:
    """Bytes of predictions.parquet.partial once about a third of the images are written (the
    writer appends one row group per batch; the single-node file holds them all)."""
    return (single_node_output / "predictions.parquet").stat().st_size // 3


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


def start_evaluation(cluster: LocalCluster, images: Path, output: Path, *options: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "pipeline", "evaluate", "--model", str(MOBILENET_INT8), "--data", str(images),
               "--preset", "torch", "--output", str(output), "--address", cluster.address, *options]
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


def wait_mid_run(process: subprocess.Popen, output: Path, nodes, written: int, timeout: float = 300) -> dict:
    """Wait until the run has an inference actor on every node and WRITTEN bytes of predictions on
    disk; returns the actor PIDs per node. Fails if the run ends first (nothing was interrupted)."""
    deadline = time.monotonic() + timeout
    partial = output / "predictions.parquet.partial"
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be interrupted"
        actors = {i: node.pids_titled(INFERENCE_ACTOR) for i, node in enumerate(nodes)}
        if all(actors.values()) and partial.exists() and partial.stat().st_size >= written:
            return actors
        time.sleep(0.2)
    raise TimeoutError("the run did not start producing predictions")


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def wait_computing(pid: int, timeout: float = 60) -> None:
    """Return once PID has been using the CPU for most of the last 50 ms (it is running a batch)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        start = cpu_ticks(pid)
        time.sleep(0.05)
        if cpu_ticks(pid) - start >= 0.03 * os.sysconf("SC_CLK_TCK"):  # 30 ms of CPU in 50 ms
            return
    raise TimeoutError(f"inference actor {pid} never got busy")


def assert_pinned_to_distinct_cores(pids: set[int], timeout: float = 20) -> None:
    """Each process ends up allowed on one core only, and no two on the same one (as the OS sees it)."""
    deadline = time.monotonic() + timeout
    while True:
        cores = [os.sched_getaffinity(pid) for pid in pids]
        if all(len(c) == 1 for c in cores) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert all(len(c) == 1 for c in cores), f"inference actors not pinned: {cores}"
    assert len(set.union(*cores)) == len(pids), f"two inference actors on one core: {cores}"


def test_cluster_launcher_config_is_valid_for_ray_and_keeps_the_scheduling_contract():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "deploy" / "ray-cluster.yaml").read_text())
    config = prepare_config(raw)
    validate_config(config)
    for node_type in config["available_node_types"].values():
        assert node_type["resources"][INFERENCE_RESOURCE] >= 1 and node_type["resources"]["CPU"] >= 1
    # every node starts through ray-start.sh, which declares the inference cores and CPUs
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert any("deploy/ray-start.sh" in command for command in commands)
    # the project is synced to every node and installed there, with the data paths
    repo_on_node = next(remote for remote, local in config["file_mounts"].items() if local == ".")
    assert any("pip install" in c and repo_on_node in c for c in config["setup_commands"])
    assert any("imagenet" in remote for remote in config["file_mounts"])


def test_the_on_premises_variant_in_the_cluster_guide_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    guide = (REPO / "docs" / "cluster.md").read_text()
    section = guide[guide.index("**On-premises hosts**"):]
    replacement = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))
    config = yaml.safe_load((REPO / "deploy" / "ray-cluster.yaml").read_text())
    for field in ("max_workers", "available_node_types", "head_node_type"):
        del config[field]
    config = prepare_config({**config, **replacement})
    validate_config(config)
    assert config["provider"]["type"] == "local"
    assert config["max_workers"] == len(replacement["provider"]["worker_ips"])
    assert any("deploy/ray-start.sh" in command for command in config["worker_start_ray_commands"])


@pytest.mark.subprocess
def test_ray_start_script_declares_one_inference_core_per_physical_core():
    result = subprocess.run([str(REPO / "deploy" / "ray-start.sh"), "--head", "--port=6379"],
                            env={**os.environ, "DRY_RUN": "1"}, capture_output=True, text=True, check=True)
    cpus = os.sched_getaffinity(0)
    physical = {tuple(thread_siblings(cpu)) for cpu in cpus}  # from sysfs, not lscpu as the script
    assert result.stdout.split() == ["ray", "start", "--head", "--port=6379", f"--num-cpus={len(cpus)}",
                                     '--resources={"inference_core":', f"{len(physical)}}}"]


def test_actors_take_a_physical_core_each_before_any_second_hyperthread():
    # the topology of a c7i.2xlarge: 4 cores, CPUs 0-3 and their siblings 4-7
    siblings = {cpu: parse_cpu_list(f"{cpu % 4},{cpu % 4 + 4}") for cpu in range(8)}
    assert physical_cores_first(range(8), siblings) == [0, 1, 2, 3, 4, 5, 6, 7]
    # the same machine numbered core by core: 0-1 share a core, 2-3 the next...
    siblings = {cpu: parse_cpu_list(f"{cpu - cpu % 2}-{cpu - cpu % 2 + 1}") for cpu in range(8)}
    assert physical_cores_first(range(8), siblings)[:4] == [0, 2, 4, 6]


@pytest.mark.subprocess
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


@pytest.mark.subprocess
def test_one_tar_of_the_images_gives_the_single_node_figures_on_two_nodes(cluster, images, single_node, tmp_path):
    """The images as one .tar: cut into runs of members read by tasks across the cluster (2 CPUs want
    8 tasks), every member once, the same figures as the folder on one node."""
    archive = tmp_path / "images.tar"
    with tarfile.open(archive, "w") as tar:
        for image in sorted(images.glob("*.JPEG")):
            tar.add(image.resolve(), image.name)
    output = tmp_path / "out"
    metrics = finished(start_evaluation(cluster, archive, output, "--labels", str(images / "labels.txt")),
                       output, images)
    assert_same_figures(metrics, single_node)
    assert all(n["images"] > 0 for n in metrics["cluster"]["per_node"])


# predictions of one input on the cluster at ARGV[1], and Ray Data's account of where each operator ran
PREDICT_ON_CLUSTER = """
import sys
from pipeline.config import load_preset
from pipeline.onnx_model import ModelInfo
from pipeline.predict import predict
from pipeline.runtime import init_ray
from pipeline.sources import read_source
address, data, labels, model = sys.argv[1:]
init_ray(address)
source = read_source(data, labels=labels)
rows = predict(source, ModelInfo.from_path(model), load_preset("torch"), require_label=True, top_k=5,
               batch_size=32).materialize()
keys = [row["key"] for row in rows.take_all()]
correct = sum(int(batch["top_ids"][i][0] == batch["label"][i]) for batch in rows.iter_batches(batch_size=None)
              for i in range(len(batch["key"])))
print(source.recut_rows, len(keys), len(set(keys)), correct)
print(rows.stats())
"""


def operator_nodes(stats: str) -> dict[str, int]:
    """How many nodes each operator of a Ray Data stats report ran on."""
    nodes, operator = {}, None
    for line in stats.splitlines():
        if line.startswith("Operator "):
            operator = line.split(":")[0].split(" ", 2)[2]
        elif operator and (used := re.search(r"(\d+) nodes used", line)):
            nodes[operator] = int(used.group(1))
    return nodes


@pytest.mark.subprocess
def test_one_compressed_tar_is_read_by_one_task_and_preprocessed_on_both_nodes(cluster, images, single_node,
                                                                              tmp_path):
    """A .tar.gz cannot be entered part-way: one task on one node reads it all. Its members are re-cut
    into blocks that map tasks preprocess on both nodes, not in that one read task; every image once,
    the single node's top-1."""
    from pipeline.sources.base import RECORDS_PER_BLOCK

    archive = tmp_path / "images.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for image in sorted(images.glob("*.JPEG")):
            tar.add(image.resolve(), image.name)
    result = subprocess.run([sys.executable, "-c", PREDICT_ON_CLUSTER, cluster.address, str(archive),
                             str(images / "labels.txt"), str(MOBILENET_INT8)],
                            cwd=REPO, env={**cluster.env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary, stats = result.stdout.split("\n", 1)
    assert summary.split() == [str(RECORDS_PER_BLOCK), str(IMAGES), str(IMAGES), str(single_node["top1_correct"])]
    nodes = operator_nodes(stats)
    assert nodes["ReadTarShard"] == 1 and nodes["MapBatches(Preprocessor)"] == 2


@pytest.mark.subprocess
def test_a_killed_inference_actor_is_restarted_and_its_batches_redone(cluster, images, single_node,
                                                                     a_third_written, tmp_path):
    process = start_evaluation(cluster, images, tmp_path)
    # killed early (a sixth of the way), so that the surviving actor cannot finish the run alone before
    # the killed one has been started again (seen in CI on a busy machine at a third)
    actors = wait_mid_run(process, tmp_path, cluster.nodes, a_third_written // 2)
    before = {pid for pids in actors.values() for pid in pids}
    assert_pinned_to_distinct_cores(before)
    # killed while it computes, so that it holds a batch the run cannot finish without (an idle
    # actor may be restarted only after the survivor has done the rest: MobileNetV2 is fast)
    wait_computing(actors[0][0])
    os.kill(actors[0][0], signal.SIGKILL)
    assert not (tmp_path / "predictions.parquet").exists(), "the run had already finished"
    # its batches can only be redone by its restarted self: Ray retries actor tasks on the same actor
    restarted = set()
    while not restarted and process.poll() is None:
        restarted = {pid for node in cluster.nodes for pid in node.pids_titled(INFERENCE_ACTOR)} - before
        time.sleep(0.1)
    assert restarted, "the killed inference actor was not started again"
    metrics = finished(process, tmp_path, images)
    assert_same_figures(metrics, single_node)


@pytest.mark.subprocess
def test_a_worker_node_that_leaves_mid_run_loses_no_image(cluster, images, single_node, a_third_written,
                                                          tmp_path):
    process = start_evaluation(cluster, images, tmp_path)
    wait_mid_run(process, tmp_path, cluster.nodes, a_third_written)
    worker = cluster.nodes[1]
    # the driver is paused until Ray has declared the node dead: else on a busy machine the head can
    # finish the run within the seconds that takes, and the run rightly reports two nodes alive
    os.kill(process.pid, signal.SIGSTOP)
    try:
        worker.kill_raylet()
        assert not (tmp_path / "predictions.parquet").exists(), "the run had already finished"
        cluster.wait_for_nodes(1, timeout=120, expect_exits=True)
    finally:
        os.kill(process.pid, signal.SIGCONT)
    metrics = finished(process, tmp_path, images)
    assert_same_figures(metrics, single_node)
    assert metrics["cluster"]["nodes"] == 1
    # the per-node record still accounts for every image, what the lost node did before it left included
    per_node = metrics["cluster"]["per_node"]
    assert sum(n["images"] for n in per_node) == IMAGES
    lost = [n for n in per_node if not n["alive"]]
    # listed, with whatever it did before it left (on a busy machine its actor may not have
    # finished a batch yet: the images it held were then all redone on the head node)
    assert len(lost) == 1 and not lost[0]["head"], per_node
    assert worker.process.wait(timeout=60) is not None  # the node is gone, not just its raylet
