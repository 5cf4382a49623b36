"""Throughput from Parquet shards, an LMDB database and single-file archives of the same images, side by side.

    PYTHONPATH=. python benchmarks/bench_sources.py [--images ../shared/data/imagenet-sample-1000]
        [--model ../shared/models/mobilenetv2-12-int8.onnx] [--rounds 2]

The images are written once as Parquet shards of 100 images (`pipeline prepare`), as an encoded Caffe
Datum LMDB (`pipeline prepare --format lmdb-datum`), as one Parquet file of one row group (what
pyarrow's `write_table` makes of up to a million rows), and as one uncompressed `.tar` and one
`.tar.gz` of them all (labels from the folder's labels.txt, keyed by member name), into a temporary
folder. Then, in one Ray session
on the same cores, rotating the order of the sources each round (best round kept, as the machine is
shared):
- read: the source's rows only (read tasks, no decoding);
- read + preprocess: decode, scale, crop, normalise, mapped as the pipeline maps them (the input side);
- evaluate: `pipeline evaluate` end to end with the model, images over wall time (start-up included),
  and "run" (metrics.json's run_images_per_s: from the start of the Ray Data execution).
It prints images/s for each and the ratios to Parquet, and writes them to
benchmarks/results/sources.json (and .md) with the machine, the commit and the load average, since
the figures are only comparable within one run on a machine shared with other work.
"""

from __future__ import annotations

import argparse
import tarfile
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
from results_file import write_results

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
    from pipeline.writers.parquet import write_parquet_shards
    from pipeline.preprocess import Preprocessor
    from pipeline.runtime import init_ray, map_after_read
    from pipeline.sources import read_source
    from pipeline.writers.lmdb import write_lmdb

    preset = load_preset(args.preset)
    labels = str(Path(args.images) / "labels.txt")
    with tempfile.TemporaryDirectory(prefix="bench-sources-") as work:
        sources = {"Parquet": str(Path(work) / "parquet"), "LMDB": str(Path(work) / "lmdb"),
                   "1 row group": str(Path(work) / "one-row-group.parquet"),
                   "one tar": str(Path(work) / "images.tar"), "one tar.gz": str(Path(work) / "images.tar.gz")}
        write_parquet_shards(args.images, sources["Parquet"], shard_size=100)
        pq.write_table(pq.read_table(sources["Parquet"]), sources["1 row group"])
        write_lmdb(args.images, sources["LMDB"], fmt="lmdb-datum")
        for name, mode in (("one tar", "w"), ("one tar.gz", "w:gz")):
            with tarfile.open(sources[name], mode) as archive:
                for image in sorted(Path(args.images).glob("*.JPEG")):
                    archive.add(image.resolve(), image.name)
        labels_of = {name: labels if name.startswith("one tar") else None for name in sources}
        init_ray(None)

        def preprocessed(source):
            return map_after_read(source.dataset, Preprocessor(preset), source.recut_rows, batch_size=None,
                                  batch_format="numpy")

        stages = {
            "read": lambda name: timed(lambda: consume(read_source(sources[name], labels=labels_of[name]).dataset)),
            "read + preprocess": lambda name: timed(lambda: consume(preprocessed(read_source(
                sources[name], labels=labels_of[name])))),
            "evaluate": lambda name: evaluate(args.model, sources[name], args.preset, labels=labels_of[name]),
        }
        lines = ["read", "read + preprocess", "evaluate", "evaluate (run)"]
        best = {(line, name): 0.0 for line in lines for name in sources}
        top1 = {}
        for round_ in range(args.rounds):
            shift = round_ % len(sources)
            order = list(sources)[shift:] + list(sources)[:shift]
            for stage, run in stages.items():
                for name in order:
                    result = run(name)
                    if stage == "evaluate":
                        top1[name] = result["top1"]  # the same images must score the same from every format
                    figures = {stage: result} if stage != "evaluate" else {
                        "evaluate": result["images_per_s"], "evaluate (run)": result["run_images_per_s"]}
                    for line, value in figures.items():
                        best[line, name] = max(best[line, name], value)

    others = [name for name in sources if name != "Parquet"]
    table = [f"{Path(args.images).name}, model {Path(args.model).name}, best of {args.rounds} rounds (images/s)", "",
             "| stage | " + " | ".join(sources) + " | " + " | ".join(f"{name} / Parquet" for name in others) + " |",
             "|---|" + "---:|" * (len(sources) + len(others))]
    for line in lines:
        table.append(f"| {line} | " + " | ".join(f"{best[line, name]:.1f}" for name in sources) + " | "
                     + " | ".join(f"{best[line, name] / best[line, 'Parquet']:.2f}x" for name in others) + " |")
    table += ["", "top-1: " + ", ".join(f"{name} {top1[name]:.2%}" for name in sources)]
    text = "\n".join(table)
    print(text)
    write_results(__file__, {"images": Path(args.images).name, "model": Path(args.model).name, "rounds": args.rounds,
                             "images_per_s": {line: {name: best[line, name] for name in sources} for line in lines},
                             "top1": top1}, text)

if __name__ == "__main__":
    main()
