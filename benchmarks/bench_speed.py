"""Throughput side by side, on the same cores in one run, for the int8 models people deploy:

1. ceiling:  one onnxruntime session per core (one thread, pinned), all at once, random input, no
             decoding;
2. naive:    one process reading, decoding, preprocessing and running one session in turn (the
             session gets every core as intra-op threads; `testkit/reference.py`);
3. pipeline: the whole `pipeline evaluate` command as a user runs it, timed from outside (start-up
             included), and its own `run_images_per_s` (from the start of the Ray Data execution).

Cases: the ONNX Model Zoo's int8 MobileNetV2 (imagenet-val-1300 four times over, 5,200 images), the
int8 ResNet-50 with generated weights (imagenet-sample-1000 five times, 5,000 full-resolution
images), and the project's own int8 EfficientNet-Lite0 (`pipeline quantize --method l2`, built here
when absent; imagenet-val-1300 four times). Then the README's main command (1,300 images) as a whole.

    python benchmarks/bench_speed.py [--cases mobilenetv2,resnet50,efficientnet-lite0] [--out FILE]

Prints a table of images/s and ratios to the ceiling, and writes it with the machine and the commit
to benchmarks/results/speed.json (and .md).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

from pipeline.config import load_preset  # noqa: E402
from results_file import RESULTS, write_results  # noqa: E402
from pipeline.onnx_model import ModelInfo, make_session  # noqa: E402
from testkit.reference import reference_predictions  # noqa: E402

VAL_1300 = SHARED / "data" / "imagenet-val-1300"
SAMPLE_1000 = SHARED / "data" / "imagenet-sample-1000"


@dataclass
class Case:
    name: str
    model: str  # a path, or "efficientnet-lite0-int8" (built here)
    data: Path
    preset: str
    repeat: int


CASES = {
    "mobilenetv2": Case("MobileNetV2 int8 (zoo)", str(SHARED / "models" / "mobilenetv2-12-int8.onnx"), VAL_1300,
                        "torch", 4),
    "resnet50": Case("ResNet-50 int8 (generated weights)", str(SHARED / "models" / "resnet50-int8-generated.onnx"),
                     SAMPLE_1000, "caffe2", 5),
    "efficientnet-lite0": Case("EfficientNet-Lite0 int8 (l2, ours)", "efficientnet-lite0-int8", VAL_1300, "tf127", 4),
}


def _bare_worker(model: str, core: int, seconds: float, batch: int, out: mp.Queue) -> None:
    os.sched_setaffinity(0, {core})
    info = ModelInfo.from_path(model)
    session = make_session(model, threads=1)
    x = np.random.default_rng(core).normal(size=(info.batch_size or batch, 3, info.height, info.width))
    x = x.astype(np.float32)
    session.run(None, {info.input_name: x})
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        session.run(None, {info.input_name: x})
        done += len(x)
    out.put(done / (time.perf_counter() - start))


def ceiling(model: str, seconds: float, batch: int = 32) -> float:
    """Images/s of one pinned one-thread session per core, all running at once."""
    queue: mp.Queue = mp.Queue()
    workers = [mp.Process(target=_bare_worker, args=(model, core, seconds, batch, queue))
               for core in sorted(os.sched_getaffinity(0))]
    for worker in workers:
        worker.start()
    rates = [queue.get() for _ in workers]
    for worker in workers:
        worker.join()
    return sum(rates)


def naive(model: str, data: Path, preset: str, images: int) -> float:
    """Images/s of the single-process loop over the first IMAGES images of DATA, repeated as needed."""
    cores = len(os.sched_getaffinity(0))
    start = time.perf_counter()
    done = 0
    while done < images:
        done += sum(1 for _ in reference_predictions(model, data, load_preset(preset), limit=images - done,
                                                     threads=cores))
    return done / (time.perf_counter() - start)


def repeated_folder(data: Path, repeat: int, folder: Path) -> Path:
    """DATA's images REPEAT times over (symlinks), with their labels."""
    lines = [line.split() for line in (data / "labels.txt").read_text().splitlines() if line.strip()]
    labels = []
    for copy in range(repeat):
        for name, label in lines:
            (folder / f"{copy}_{name}").symlink_to(data.resolve() / name)
            labels.append(f"{copy}_{name} {label}")
    (folder / "labels.txt").write_text("\n".join(labels) + "\n")
    return folder


def pipeline_command(model: str, data: Path, preset: str, output: Path) -> dict:
    """The whole `pipeline evaluate` command in its own process: wall time from outside, and its metrics."""
    command = [sys.executable, "-m", "pipeline", "evaluate", "--model", model, "--data", str(data),
               "--preset", preset, "--output", str(output)]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    metrics = json.loads((output / "metrics.json").read_text())
    return {"wall_s": wall, "images": metrics["images"], "whole": metrics["images"] / wall,
            "run": metrics["run_images_per_s"], "top1": metrics["top1"], "time": metrics["time"]}


def efficientnet_int8(folder: Path) -> str:
    """The project's own int8 EfficientNet-Lite0, as the README builds it (l2, 500 calibration images)."""
    fp32, int8 = folder / "efficientnet-lite0.onnx", folder / "efficientnet-lite0-int8.onnx"
    for command in (["model", "build", "efficientnet-lite0", "--out", str(fp32)],
                    ["quantize", "--model", str(fp32), "--preset", "tf127", "--calibration", str(SAMPLE_1000),
                     "--images", "500", "--method", "l2", "--out", str(int8)]):
        subprocess.run([sys.executable, "-m", "pipeline", *command], cwd=REPO, check=True, capture_output=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    return str(int8)


def run_case(case: Case, tmp: Path, seconds: float) -> dict:
    model = efficientnet_int8(tmp) if case.model == "efficientnet-lite0-int8" else case.model
    images = repeated_folder(case.data, case.repeat, Path(tempfile.mkdtemp(dir=tmp)))
    total = len((images / "labels.txt").read_text().splitlines())
    top = ceiling(model, seconds)
    simple = naive(model, case.data, case.preset, total)
    run = pipeline_command(model, images, case.preset, Path(tempfile.mkdtemp(dir=tmp)))
    return {"case": case.name, "images": run["images"], "ceiling": top, "naive": simple,
            "pipeline_whole": run["whole"], "pipeline_run": run["run"], "top1": run["top1"], "time": run["time"]}


def table(rows: list[dict], main: dict) -> str:
    lines = ["| case | images | ceiling img/s | naive loop | pipeline, whole command | pipeline after start-up "
             "| first prediction | CPU ms/image: read, decode+resize, normalise, inference, rest |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        c = row["ceiling"]
        per_image = ", ".join(f"{1000 * v:.2f}" for v in row["time"]["cpu_s_per_image"].values())
        lines.append(f"| {row['case']} | {row['images']} | {c:.1f} | {row['naive']:.1f} ({row['naive'] / c:.2f}x) "
                     f"| {row['pipeline_whole']:.1f} (**{row['pipeline_whole'] / c:.2f}x**) "
                     f"| {row['pipeline_run']:.1f} ({row['pipeline_run'] / c:.2f}x) "
                     f"| {row['time']['first_prediction_s']:.1f} s | {per_image} |")
    if main:
        lines.append("")
        lines.append(f"README main command (MobileNetV2 int8, 1,300 images): {main['wall_s']:.1f} s whole command, "
                     f"first prediction {main['time']['first_prediction_s']:.1f} s after it started, "
                     f"Ray's own start {main['time']['ray_start_s']:.1f} s.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--seconds", type=float, default=15.0, help="duration of each ceiling measurement")
    parser.add_argument("--out", type=Path, default=RESULTS / "speed.json")
    args = parser.parse_args()
    for path in (VAL_1300, SAMPLE_1000):
        if not path.exists():
            sys.exit(f"{path} is absent: the benchmark reads ../shared")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases.split(","):
            rows.append(run_case(CASES[name], Path(tmp), args.seconds))
            print(table(rows[-1:], {}).splitlines()[-1], flush=True)
        main_run = pipeline_command(CASES["mobilenetv2"].model, VAL_1300, "torch", Path(tmp) / "main")
    text = table(rows, main_run)
    print()
    print(text)
    write_results(__file__, {"cases": rows, "readme_main_command": main_run}, text, args.out)


if __name__ == "__main__":
    main()
