"""What a cluster costs: the same `pipeline evaluate --address` on a one-node Ray cluster with all
of this machine's cores, and on a two-node Ray cluster on this machine with the same cores split
between the nodes (each node: half the CPUs and half the inference cores). Both clusters are up
before the runs, which alternate. Prints both images/s and the ratio.

    PYTHONPATH=$PWD python benchmarks/bench_cluster.py [--data DIR] [--model FILE] [--repeat N]

Images/s are given twice: end to end (the evaluation's wall time, joining the cluster included)
and run (from the start of Ray Data's execution: actors starting and loading the model included),
which is the figure the ratio and the per-core rate use.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

from pipeline.runtime import local_cores  # noqa: E402
from testkit.local_cluster import LocalCluster  # noqa: E402


def run_evaluation(model: Path, data: Path, preset: str, output: Path, address: str, env: dict) -> dict:
    command = [sys.executable, "-m", "pipeline", "evaluate", "--model", str(model), "--data", str(data),
               "--preset", preset, "--output", str(output), "--address", address]
    result = subprocess.run(command, cwd=REPO, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise SystemExit(f"evaluation failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return json.loads((output / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "imagenet-sample-1000")
    parser.add_argument("--model", type=Path, default=SHARED / "models" / "mobilenetv2-12-int8.onnx")
    parser.add_argument("--preset", default="torch")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each, alternated; the median is shown")
    args = parser.parse_args()
    for path in (args.data, args.model):
        if not path.exists():
            raise SystemExit(f"{path} is absent: the shared ImageNet data and models live in ../shared")
    cores = local_cores()
    if cores < 2:
        raise SystemExit("a two-node cluster with the same cores needs at least 2 cores")

    work = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    clusters = {"one node": LocalCluster(), "two nodes": LocalCluster()}
    runs: dict[str, list[dict]] = {name: [] for name in clusters}
    try:
        clusters["one node"].head(num_cpus=cores, inference_cores=cores)
        clusters["two nodes"].head(num_cpus=cores // 2, inference_cores=cores // 2)
        clusters["two nodes"].worker(num_cpus=cores - cores // 2, inference_cores=cores - cores // 2)
        for cluster in clusters.values():
            cluster.wait_for_nodes(len(cluster.nodes))
        for i in range(args.repeat):
            for name, cluster in clusters.items():
                runs[name].append(run_evaluation(args.model, args.data, args.preset, work / f"{name}{i}",
                                                 cluster.address, cluster.env))
    finally:
        for cluster in clusters.values():
            cluster.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(f"{args.model.name} on {args.data.name} ({runs['one node'][0]['images']} images), "
          f"{cores} cores in total, median of {args.repeat} run(s)")
    print(f"{'':<10} {'nodes':>5} {'inference cores':>15} {'end-to-end img/s':>17} {'run img/s':>10} "
          f"{'img/s per core':>15}")
    run = {}
    for name, metrics in runs.items():
        run[name] = median(m["run_images_per_s"] for m in metrics)
        used = metrics[0]["cluster"]["inference_cores_used"]
        print(f"{name:<10} {metrics[0]['cluster']['nodes']:>5} {used:>15} "
              f"{median(m['images_per_s'] for m in metrics):>17.1f} {run[name]:>10.1f} "
              f"{run[name] / used:>15.1f}")
        for node in metrics[-1]["cluster"]["per_node"]:
            print(f"{'':<10}   node {node['address']} {node['node_id'][:8]}: {node['images']} images, "
                  f"{node['images_per_s']:.1f} img/s end to end, cores {node['cores_used']}")
    ratio = run["two nodes"] / run["one node"]
    print(f"two nodes / one node (run img/s): {ratio:.2f}x  (target: >= 0.90x, the cluster costs no more than 10%)")


if __name__ == "__main__":
    main()
