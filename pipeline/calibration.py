"""Activation ranges for int8 quantisation by L2 error minimisation (the seed's method, after
Caffe2 DNNLOWP's norm minimisation).

For each activation we keep a 2,048-bin histogram of every value seen during calibration, then
choose the clipping range [lo, hi] that minimises the expected squared error of quantising that
histogram to 8 bits: rounding error for the values inside the range (a step of
(hi - lo) / 255 gives step^2 / 12 per value) plus clipping error for the values outside it
(their squared distance to lo or hi). A few outliers then no longer stretch the range and
coarsen the step for everyone else, which is what plain min/max calibration suffers from.

Values are assumed uniformly spread inside each histogram bin; with that, both error terms have
closed forms in prefix sums of the histogram, so every candidate range is scored at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader

from pipeline.inference import ModelInfo

HISTOGRAM_BINS = 2048
LEVELS = 256  # 8 bits


def _grid(low: float, high: float, bins: int) -> tuple[float, float]:
    """A histogram grid of `bins` bins covering [low, high] with 0 exactly on a bin edge, so a
    clipping range can start or stop at 0 (quantised ranges must contain 0). Returns (start, width)."""
    low, high = min(low, 0.0), max(high, 0.0)
    if high == low:
        return 0.0, 1.0 / bins
    zero_edge = int(round(bins * -low / (high - low)))
    if low < 0:
        zero_edge = max(zero_edge, 1)
    if high > 0:
        zero_edge = min(zero_edge, bins - 1)
    width = max(-low / zero_edge if zero_edge else 0.0, high / (bins - zero_edge) if zero_edge < bins else 0.0)
    return -zero_edge * width, width


@dataclass
class Histogram:
    """A streaming histogram with a fixed number of bins whose range grows with the data:
    when a batch falls outside, the counts so far are spread onto the wider grid (in proportion
    to overlap, i.e. by interpolating their cumulative distribution)."""

    bins: int = HISTOGRAM_BINS
    start: float = 0.0
    width: float = 0.0
    counts: np.ndarray | None = None

    @property
    def edges(self) -> np.ndarray:
        return self.start + self.width * np.arange(self.bins + 1)

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float32).ravel()
        values = values[np.isfinite(values)]
        if values.size == 0:
            return
        low, high = float(values.min()), float(values.max())
        if self.counts is None:
            self.start, self.width = _grid(low, high, self.bins)
            self.counts = np.zeros(self.bins, np.float64)
        elif low < self.start or high > self.start + self.width * self.bins:
            old_edges, old_cdf = self.edges, np.concatenate([[0.0], np.cumsum(self.counts)])
            self.start, self.width = _grid(min(low, self.start), max(high, old_edges[-1]), self.bins)
            self.counts = np.diff(np.interp(self.edges, old_edges, old_cdf))
        index = np.clip(((values - self.start) / self.width).astype(np.int64), 0, self.bins - 1)
        self.counts += np.bincount(index, minlength=self.bins)


def expected_l2_errors(
    counts: np.ndarray, edges: np.ndarray, lo_index: np.ndarray, hi_index: np.ndarray, levels: int = LEVELS
) -> np.ndarray:
    """Expected total squared quantisation error of the histogram (counts between edges) for
    the clipping ranges [edges[lo_index[i]], edges[hi_index[j]]], as a matrix [i, j]."""
    width = edges[1] - edges[0]
    centres = (edges[:-1] + edges[1:]) / 2
    # Prefix sums over bins: S[k] sums bins 0..k-1, so bins left of edge k.
    s0 = np.concatenate([[0.0], np.cumsum(counts)])
    s1 = np.concatenate([[0.0], np.cumsum(counts * centres)])
    s2 = np.concatenate([[0.0], np.cumsum(counts * (centres**2 + width**2 / 12))])
    lo, hi = edges[lo_index], edges[hi_index]
    # Sum over bins below lo of E[(x - lo)^2], and above hi of E[(x - hi)^2].
    below = s2[lo_index] - 2 * lo * s1[lo_index] + lo**2 * s0[lo_index]
    n_above = s0[-1] - s0[hi_index]
    above = (s2[-1] - s2[hi_index]) - 2 * hi * (s1[-1] - s1[hi_index]) + hi**2 * n_above
    inside = s0[hi_index][None, :] - s0[lo_index][:, None]
    step = (hi[None, :] - lo[:, None]) / (levels - 1)
    return below[:, None] + above[None, :] + inside * step**2 / 12


def l2_optimal_range(histogram: Histogram, levels: int = LEVELS) -> tuple[float, float]:
    """The clipping range (lo <= 0 <= hi, on histogram edges) with the least expected L2
    quantisation error for this histogram."""
    if histogram.counts is None or histogram.counts.sum() == 0:
        return 0.0, 0.0
    edges = histogram.edges
    zero = int(round(-histogram.start / histogram.width))
    lo_index, hi_index = np.arange(zero + 1), np.arange(zero, histogram.bins + 1)
    errors = expected_l2_errors(histogram.counts, edges, lo_index, hi_index, levels)
    errors[-1, 0] = np.inf  # the empty range [0, 0]
    i, j = np.unravel_index(np.argmin(errors), errors.shape)
    return float(edges[lo_index[i]]), float(edges[hi_index[j]])


def float_tensors(model: onnx.ModelProto) -> list[str]:
    """Every float activation in the graph (inputs and outputs of nodes, not weights): what a
    quantiser may ask a range for."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    }
    weights = {init.name for init in model.graph.initializer}
    names = dict.fromkeys(n for node in model.graph.node for n in list(node.input) + list(node.output))
    return [n for n in names if n and n not in weights and types.get(n) == onnx.TensorProto.FLOAT]


def collect_histograms(model_path: str, batches: Iterable[np.ndarray], bins: int = HISTOGRAM_BINS) -> dict[str, Histogram]:
    """Run the fp32 model over calibration batches and histogram every float activation, one
    batch at a time (the intermediate tensors of a whole calibration set would not fit in memory)."""
    model = onnx.load(model_path)
    tensors = float_tensors(model)
    outputs = {o.name for o in model.graph.output}
    input_name = ModelInfo.from_path(model_path).input_name
    model.graph.output.extend(
        onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
        for name in tensors if name not in outputs and name != input_name
    )
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    output_names = [o.name for o in session.get_outputs()]
    histograms = {name: Histogram(bins) for name in tensors}
    for batch in batches:
        histograms[input_name].add(batch)
        for name, value in zip(output_names, session.run(output_names, {input_name: batch})):
            if name in histograms:
                histograms[name].add(value)
    return histograms


class BatchReader(CalibrationDataReader):
    """Calibration batches for onnxruntime's calibrators, in chunks (`set_range`) so that its
    histogram calibrators, which keep every intermediate tensor of a `collect_data` call, see one
    batch at a time."""

    def __init__(self, input_name: str, batches: list[np.ndarray]):
        self.input_name = input_name
        self.batches = batches
        self.set_range(0, len(batches))

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= self.end:
            return None
        self.position += 1
        return {self.input_name: self.batches[self.position - 1]}

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.position, self.end = start_index, min(end_index, len(self.batches))
