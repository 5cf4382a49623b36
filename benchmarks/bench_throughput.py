"""Throughput side by side, on the same cores in one run:

1. bare:     one onnxruntime session per core (one thread, pinned), random input, no decoding: the ceiling;
2. naive:    one process reading, decoding, preprocessing and running one session in turn (the
             session gets every core as intra-op threads);
3. pipeline: `pipeline evaluate` (Ray Data: read + preprocess tasks, pinned inference actors).

    python benchmarks/bench_throughput.py [--model M.onnx] [--data FOLDER] [--preset caffe2]

Prints images/s for each and their ratios to the bare figure.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

from pipeline.config import load_preset  # noqa: E402
from pipeline.inference import ModelInfo, make_session  # noqa: E402
from pipeline.reference import reference_predictions  # noqa: E402
from pipeline.runtime import local_cores  # noqa: E402


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


def bare(model: str, cores: list[int], seconds: float, batch: int) -> float:
    queue: mp.Queue = mp.Queue()
    workers = [mp.Process(target=_bare_worker, args=(model, c, seconds, batch, queue)) for c in cores]
    for w in workers:
        w.start()
    rates = [queue.get() for _ in workers]
    for w in workers:
        w.join()
    return sum(rates)


def naive(model: str, data: str, preset: str, limit: int, cores: int) -> float:
    start = time.perf_counter()
    count = sum(1 for _ in reference_predictions(model, data, load_preset(preset), limit=limit, threads=cores))
    return count / (time.perf_counter() - start)


def repeated_folder(data: str, repeat: int, folder: Path) -> Path:
    """DATA's images REPEAT times over (symlinks), so that the run outlasts the actors' start-up."""
    lines = [line.split() for line in (Path(data) / "labels.txt").read_text().splitlines() if line.strip()]
    labels = []
    for copy in range(repeat):
        for name, label in lines:
            (folder / f"{copy}_{name}").symlink_to(Path(data).resolve() / name)
            labels.append(f"{copy}_{name} {label}")
    (folder / "labels.txt").write_text("\n".join(labels) + "\n")
    return folder


# The steady-state window: after the actors have started, and before the reads end. Ray Data reads
# and preprocesses ahead of inference (about 2,000 images here, bounded by its backpressure); once
# the reads are done, inference has the cores to itself and runs at the bare rate. A window that
# reaches into that tail (10% to 90% of a 5,000-image run did) overstates the sustained rate by 10%.
STEADY_WINDOW = (0.1, 0.8)


def steady_rate(marks: list[tuple[float, int]], total: int) -> float:
    """Images/s inside STEADY_WINDOW (fractions of the images done)."""
    t_start, n_start = next(m for m in marks if m[1] >= STEADY_WINDOW[0] * total)
    t_end, n_end = next(m for m in marks if m[1] >= STEADY_WINDOW[1] * total)
    return (n_end - n_start) / (t_end - t_start)


def pipeline(model: str, data: str, preset: str, repeat: int) -> dict[str, float]:
    """Images/s of `pipeline evaluate`: with Ray's start, of the Ray Data run, and in steady state."""
    from pipeline.evaluate import evaluate
    from pipeline.runtime import init_ray

    marks: list[tuple[float, int]] = []
    with tempfile.TemporaryDirectory() as tmp:
        images = repeated_folder(data, repeat, Path(tmp))
        started = time.perf_counter()
        init_ray(None)
        metrics = evaluate(model, str(images), preset,
                           on_progress=lambda done, total: marks.append((time.perf_counter(), done)))
        with_start = metrics["images"] / (time.perf_counter() - started)
    return {"images": metrics["images"], "with_start": with_start, "run": metrics["run_images_per_s"],
            "steady": steady_rate(marks, metrics["images"]), "cores": metrics["cluster"]["cores_used"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHARED / "models" / "resnet50-int8-generated.onnx"))
    parser.add_argument("--data", default=str(SHARED / "data" / "imagenet-sample-1000"))
    parser.add_argument("--preset", default="caffe2")
    parser.add_argument("--seconds", type=float, default=20.0, help="duration of the bare measurement")
    parser.add_argument("--naive-images", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=20,
                        help="pipeline: pass over the images this many times (enough that the read-ahead "
                             "stays out of the steady-state window)")
    args = parser.parse_args()
    for path in (args.model, args.data):
        if not Path(path).exists():
            sys.exit(f"{path} is absent: the benchmark reads ../shared")
    cores = sorted(os.sched_getaffinity(0))
    print(f"model {Path(args.model).name}, data {args.data}, preset {args.preset}, {len(cores)} cores")

    ceiling = bare(args.model, cores, args.seconds, batch=32)
    print(f"bare sessions (random input, {len(cores)} x 1 thread, pinned): {ceiling:8.1f} images/s")
    simple = naive(args.model, args.data, args.preset, args.naive_images, local_cores())
    print(f"naive single-process loop ({args.naive_images} images):        {simple:8.1f} images/s")
    run = pipeline(args.model, args.data, args.preset, args.repeat)
    print(f"pipeline evaluate ({run['images']} images), steady state:  {run['steady']:8.1f} images/s"
          f"  (between {STEADY_WINDOW[0]:.0%} and {STEADY_WINDOW[1]:.0%} of the images)")
    print(f"pipeline evaluate, whole Ray Data run:             {run['run']:8.1f} images/s"
          "  (with starting the actors and loading the model)")
    print(f"pipeline evaluate, including starting Ray:         {run['with_start']:8.1f} images/s")
    print(f"inference cores used: {run['cores']}")
    print()
    print(f"ratio naive / bare:                      {simple / ceiling:.2f}x")
    print(f"ratio pipeline steady state / bare:      {run['steady'] / ceiling:.2f}x")
    print(f"ratio pipeline whole run / bare:         {run['run'] / ceiling:.2f}x")
    print(f"ratio pipeline with Ray start / bare:    {run['with_start'] / ceiling:.2f}x")
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {len(cores)} cores")


if __name__ == "__main__":
    main()
