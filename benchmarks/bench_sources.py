"""Throughput from an LMDB database vs from Parquet shards of the same images, side by side.

    PYTHONPATH=. python benchmarks/bench_lmdb.py [--images ../shared/data/imagenet-sample-1000]
        [--model ../shared/models/mobilenetv2-12-int8.onnx] [--rounds 2]

The images are written once as Parquet shards (`pipeline prepare`) and as an encoded Caffe Datum
LMDB (`pipeline prepare --format lmdb-datum`), into a temporary folder. Then, in one Ray session on
the same cores, alternating the two sources each round (best round kept, as the machine is shared):
- read: the source's rows only (read tasks, no decoding);
- read + preprocess: decode, scale, crop, normalise in map tasks (the pipeline's input side);
- evaluate: `pipeline evaluate` end to end with the model, images over wall time (start-up included),
  and "run" (metrics.json's run_images_per_s: from the start of the Ray Data execution).
It prints images/s for each and the ratio LMDB / Parquet, and the load average, since the figures
are only comparable within one run on a machine shared with other work.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"


def consume(dataset) -> int:
    return sum(len(batch["key"]) for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"))


def timed(run) -> float:
    """images/s of RUN() -> number of images."""
    started = time.perf_counter()
    images = run()
    return images / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", default=str(SHARED / "data" / "imagenet-sample-1000"))
    parser.add_argument("--model", default=str(SHARED / "models" / "mobilenetv2-12-int8.onnx"))
    parser.add_argument("--preset", default="torch")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from pipeline.config import load_preset
    from pipeline.evaluate import evaluate
    from pipeline.prepare import write_parquet_shards
    from pipeline.preprocess import Preprocessor
    from pipeline.runtime import init_ray
    from pipeline.sources import read_source
    from pipeline.sources.lmdb_writer import write_lmdb

    preset = load_preset(args.preset)
    with tempfile.TemporaryDirectory(prefix="bench-lmdb-") as work:
        sources = {"parquet": str(Path(work) / "parquet"), "lmdb": str(Path(work) / "lmdb")}
        write_parquet_shards(args.images, sources["parquet"], shard_size=100)
        write_lmdb(args.images, sources["lmdb"], fmt="lmdb-datum")
        init_ray(None)

        stages = {
            "read": lambda path: timed(lambda: consume(read_source(path).dataset)),
            "read + preprocess": lambda path: timed(lambda: consume(read_source(path).dataset.map_batches(
                Preprocessor(preset), batch_size=16, batch_format="numpy"))),
            "evaluate": lambda path: evaluate(args.model, path, args.preset),
        }
        lines = ["read", "read + preprocess", "evaluate", "evaluate (run)"]
        best = {(line, name): 0.0 for line in lines for name in sources}
        for round_ in range(args.rounds):
            order = list(sources) if round_ % 2 == 0 else list(reversed(sources))
            for stage, run in stages.items():
                for name in order:
                    result = run(sources[name])
                    figures = {stage: result} if stage != "evaluate" else {
                        "evaluate": result["images_per_s"], "evaluate (run)": result["run_images_per_s"]}
                    for line, value in figures.items():
                        best[line, name] = max(best[line, name], value)

    print(f"{Path(args.images).name}, model {Path(args.model).name}, best of {args.rounds} rounds (images/s), "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'stage':<20}{'Parquet':>10}{'LMDB':>10}{'LMDB/Parquet':>14}")
    for line in lines:
        parquet, lmdb = best[line, "parquet"], best[line, "lmdb"]
        print(f"{line:<20}{parquet:>10.1f}{lmdb:>10.1f}{lmdb / parquet:>13.2f}x")


if __name__ == "__main__":
    main()
