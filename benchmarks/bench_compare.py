"""One `pipeline compare` of two models against two `pipeline evaluate` runs on the same images, each
run as a user runs it (its own process, its own local Ray). Prints the wall times and the ratio
(two evaluations / one comparison; above 1: the comparison is faster) and writes them to
benchmarks/results/compare.json (and .md) with the machine and the commit.

    PYTHONPATH=$PWD python benchmarks/bench_compare.py --model A.onnx --model B.onnx [--data DIR] [--limit N]

The models must carry their preset (`model build` and `quantize` write it). The machine should be
otherwise idle: on a shared machine the figures move with whatever else runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_file import write_results

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def timed_run(*args: str) -> float:
    """Wall seconds of `python -m pipeline ARGS`; exits with its output when it fails."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    if result.returncode != 0:
        raise SystemExit(f"pipeline {args[0]} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, help="two ONNX models (repeat)")
    parser.add_argument("--data", default=str(SHARED / "data" / "imagenet-val-1300"))
    parser.add_argument("--limit", type=int)
    args = parser.parse_args()
    if len(args.model) != 2:
        parser.error("give two --model")
    limit = ["--limit", str(args.limit)] if args.limit else []
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp:
        evaluations = [timed_run("evaluate", "--model", model, "--data", args.data, "--output", f"{tmp}/e{i}", *limit)
                       for i, model in enumerate(args.model)]
        comparison_s = timed_run("compare", "--model", args.model[0], "--model", args.model[1], "--data", args.data,
                                 "--output", f"{tmp}/c", *limit)
        comparison = json.loads(Path(f"{tmp}/c/comparison.json").read_text())
        alone = [json.loads(Path(f"{tmp}/e{i}/metrics.json").read_text()) for i in range(2)]
    images = comparison["images"]
    # the comparison's figures for each model are the ones its own evaluation gives
    same = [(m["top1_correct"], m["top5_correct"]) == (a["top1_correct"], a["top5_correct"])
            for m, a in zip(comparison["models"], alone)]
    result = {"models": args.model, "data": args.data, "images": images,
              "top1_top5": [{"model": m["name"], "compare": [m["top1"], m["top5"]], "evaluate": [a["top1"], a["top5"]]}
                            for m, a in zip(comparison["models"], alone)],
              "same_top1_top5_as_evaluate": all(same),
              "evaluate_s": [round(s, 2) for s in evaluations], "compare_s": round(comparison_s, 2),
              "two_evaluations_over_one_comparison": round(sum(evaluations) / comparison_s, 3)}
    text = (f"{images} images: evaluate {evaluations[0]:.1f} s + {evaluations[1]:.1f} s = {sum(evaluations):.1f} s; "
            f"compare {comparison_s:.1f} s; ratio {result['two_evaluations_over_one_comparison']:.2f}; "
            f"top-1/top-5 as evaluate gives them: {'yes' if all(same) else 'NO'}")
    print(text)
    write_results(__file__, result, text)

if __name__ == "__main__":
    main()
