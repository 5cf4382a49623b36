"""`pipeline evaluate`: source -> preprocessing map tasks -> inference actors -> streaming metrics."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Iterator, Optional

import pyarrow.parquet as pq
import ray

from pipeline.config import Preset
from pipeline.metrics import AccuracyCounter
from pipeline.output import atomic_file, make_output_dir, write_json
from pipeline.predict import predict
from pipeline.prediction_table import prediction_schema, prediction_table
from pipeline.real_labels import RealLabels
from pipeline.report import add_quality_and_report
from pipeline.run_checks import check_run
from pipeline.runtime import INFERENCE_RESOURCE, inference_slots, init_ray
from pipeline.sources import read_source
from pipeline.streaming import ProgressCallback, stream_batches
from pipeline.timing import TimeBreakdown, process_age_seconds
from pipeline.vnni import warn_u8s8_saturation

RESULT_FILES = ("metrics.json", "predictions.parquet", "report.html")
PREDICTIONS_FILE = "predictions.parquet"
# predictions.parquet's name while the run goes on, and what a run that fails or is interrupted
# leaves: named so, it is never taken for a result
PREDICTIONS_PARTIAL = "predictions.parquet.partial"


def drop_previous_results(output: Path) -> None:
    """Delete an earlier run's results from OUTPUT as a run into it starts: were this run
    interrupted, or to fail, they would stay beside its .partial file, looking like its own."""
    for name in RESULT_FILES:
        (output / name).unlink(missing_ok=True)


@contextlib.contextmanager
def predictions_writer(output: Optional[str], probabilities: bool) -> Iterator[Optional[pq.ParquetWriter]]:
    """The ParquetWriter of OUTPUT/predictions.parquet, written as its .partial file and renamed once
    the block ends without error; None without OUTPUT."""
    if not output:
        yield None
        return
    folder = Path(output)
    with atomic_file(folder / PREDICTIONS_FILE, folder / PREDICTIONS_PARTIAL) as partial:
        with pq.ParquetWriter(partial, prediction_schema(probabilities)) as writer:
            yield writer


def evaluate(model: str, data: str, preset: str | Preset = "torch", output: Optional[str] = None, *,
             fmt: Optional[str] = None, labels: Optional[str] = None, limit: Optional[int] = None,
             batch_size: int = 32, address: Optional[str] = None, probabilities: bool = False,
             on_progress: Optional[ProgressCallback] = None,
             real_labels: Optional[str] = None) -> dict:
    """Evaluate MODEL on DATA; write OUTPUT/metrics.json, OUTPUT/predictions.parquet (with
    PROBABILITIES, each image's whole class distribution too, column `probs`) and OUTPUT/report.html
    when OUTPUT is given, and return the metrics. ON_PROGRESS(records_done, records_total) follows the
    stream. REAL_LABELS: a ReaL labels file instead of the packaged one."""
    started = time.perf_counter()
    real = RealLabels.load(real_labels)
    checked = check_run(model, preset, data, fmt, labels, check_model=lambda info: warn_u8s8_saturation(info.path))
    if output:
        drop_previous_results(make_output_dir(output))
    ray_started = time.perf_counter()
    init_ray(address)
    ray_start_s = time.perf_counter() - ray_started
    nodes_at_start = {node["NodeID"] for node in ray.nodes() if node.get("Alive")}
    source = read_source(data, fmt=checked.fmt, labels=labels, limit=limit)
    predictions = predict(source, checked.info, checked.preset, require_label=True, top_k=5, batch_size=batch_size,
                          probabilities=probabilities)

    counter = AccuracyCounter()
    breakdown = TimeBreakdown()
    breakdown.start(ray.get_runtime_context().get_node_id())
    execution_started = time.perf_counter()
    first_prediction_s = None
    with predictions_writer(output, probabilities) as writer:
        def take(batch: dict) -> None:
            nonlocal first_prediction_s
            if first_prediction_s is None:
                first_prediction_s = process_age_seconds()
            counter.update(batch)
            breakdown.update(batch)
            if writer:
                writer.write_table(prediction_table(batch))

        stream_batches(predictions, take, on_progress=on_progress, total=lambda: source.num_records)
        finished = time.perf_counter()
        breakdown.finish()
        wall = finished - started
        source.check_all_read(counter.records, data)  # before any result is written as if it were whole

    metrics = {
        "model": os.path.abspath(model), "data": os.path.abspath(data) if os.path.exists(data) else data,
        "preset": checked.preset.name, **counter.summary(),
        "wall_s": round(wall, 3),
        "images_per_s": counter.records / wall if wall else 0.0,
        # from the start of the Ray Data execution: without starting or joining Ray, with starting
        # the actors and loading the model
        "run_images_per_s": counter.records / (finished - execution_started),
        "cluster": cluster_summary(counter, wall, nodes_at_start),
        "time": breakdown.summary(counter.records, {
            "ray_start_s": ray_start_s, "first_prediction_s": first_prediction_s or 0.0}),
    }
    if output:
        metrics = add_quality_and_report(output, metrics, real)  # the CIs, ECE, ReaL top-1; report.html
        write_json(Path(output) / "metrics.json", metrics)
    return metrics


def cluster_summary(counter: AccuracyCounter, wall_s: float, nodes_at_start: set[str]) -> dict:
    """The cluster the run used: its nodes, the cores that ran inference and each node's share of
    the throughput (a node that left mid-run is listed, with what it did before leaving)."""
    nodes = [n for n in ray.nodes()
             if n.get("Alive") or n["NodeID"] in counter.node_images or n["NodeID"] in nodes_at_start]
    per_node = []
    for node in nodes:
        resources = node.get("Resources", {})
        images = counter.node_images.get(node["NodeID"], 0)
        per_node.append({
            "node_id": node["NodeID"], "address": node["NodeManagerAddress"], "alive": bool(node.get("Alive")),
            "head": "node:__internal_head__" in resources,
            "cpus": int(resources.get("CPU", 0)), "inference_cores": int(resources.get(INFERENCE_RESOURCE, 0)),
            "cores_used": sorted(core for node_id, core in counter.cores if node_id == node["NodeID"]),
            "images": images, "images_per_s": round(images / wall_s, 2) if wall_s else 0.0,
        })
    per_node.sort(key=lambda n: (not n["head"], n["node_id"]))
    return {
        "nodes": sum(n["alive"] for n in per_node),
        "inference_actors": inference_slots(),
        "inference_cores_used": len(counter.cores),
        "cores_used": sorted([list(c) for c in counter.cores]),
        "images_per_node": dict(counter.node_images),
        "per_node": per_node,
    }
