"""What a cluster costs: the same `pipeline evaluate --address` on a one-node Ray cluster with all
of this machine's cores, and on a two-node Ray cluster on this machine with the same cores split
between the nodes (each node: half the CPUs and half the inference cores). Both clusters are up
before the runs, which alternate. Prints both images/s and the ratio.

    PYTHONPATH=$PWD python benchmarks/bench_cluster.py [--data DIR] [--model FILE] [--repeat N]

Images/s are given twice: end to end (the evaluation's wall time, joining the cluster included)
and run (from the start of Ray Data's execution: actors starting and loading the model included),
which is the figure the ratio and the per-core rate use. Writes them to benchmarks/results/cluster.json
(and .md) with the machine and the commit.
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
from results_file import write_results  # noqa: E402
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

    lines = [f"{args.model.name} on {args.data.name} ({runs['one node'][0]['images']} images), "
             f"{cores} cores in total, median of {args.repeat} run(s)",
             "",
             "| cluster | nodes | inference cores | end-to-end img/s | run img/s | run img/s per core |",
             "|---|---:|---:|---:|---:|---:|"]
    run, figures = {}, {}
    for name, metrics in runs.items():
        run[name] = median(m["run_images_per_s"] for m in metrics)
        used = metrics[0]["cluster"]["inference_cores_used"]
        end_to_end = median(m["images_per_s"] for m in metrics)
        lines.append(f"| {name} | {metrics[0]['cluster']['nodes']} | {used} | {end_to_end:.1f} | {run[name]:.1f} "
                     f"| {run[name] / used:.1f} |")
        figures[name] = {"nodes": metrics[0]["cluster"]["nodes"], "inference_cores": used,
                         "images_per_s": end_to_end, "run_images_per_s": run[name],
                         "per_node": metrics[-1]["cluster"]["per_node"]}
    ratio = run["two nodes"] / run["one node"]
    lines += ["", f"two nodes / one node (run img/s): {ratio:.2f}x  (target: >= 0.90x, the cluster costs no more "
              "than 10%)"]
    text = "\n".join(lines)
    print(text)
    write_results(__file__, {"model": args.model.name, "data": args.data.name, "repeat": args.repeat,
                             "clusters": figures, "two_nodes_over_one_node": ratio}, text)

if __name__ == "__main__":
    main()
