"""Activation ranges for int8 quantisation by L2 error minimisation (the seed's method, after
Caffe2 DNNLOWP's norm minimisation).

For each activation we keep a 2,048-bin histogram, over its range, of every value seen during
calibration, then choose the clipping range [lo, hi] that minimises the expected squared error of
quantising that histogram to 8 bits: rounding error for the values inside the range (a step of
(hi - lo) / 255 gives step^2 / 12 per value) plus clipping error for the values outside it
(their squared distance to lo or hi). A few outliers then no longer stretch the range and
coarsen the step for everyone else, which is what plain min/max calibration suffers from.

Values are assumed uniformly spread inside each histogram bin; with that, both error terms have
closed forms in prefix sums of the histogram, so every candidate range is scored at once.

That assumption is wrong for an activation that takes only a few distinct values: the model's input
when the preset maps 8-bit pixels to 256 values (tf127's (x - 127) / 128). Its own [min, max] can
quantise it with no error at all, while the histogram's estimate prefers a slightly narrower range
that shifts every pixel. An activation of at most 256 distinct values is therefore counted exactly,
and its range chosen by the exact error (`exact_l2_optimal_range`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader

from pipeline.onnx_model import ModelInfo

HISTOGRAM_BINS = 2048
LEVELS = 256  # 8 bits
DISTINCT_SAMPLE = 1 << 16  # values looked at before counting a whole activation's distinct values


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
    """A histogram of `bins` equal bins over a range fixed in advance (from a first pass over the
    data), with 0 on a bin edge. Fixing the range makes the histogram depend only on the values
    seen, not on the order the calibration batches arrive in (Ray streams them in no set order),
    so the same images always give the same int8 model. Values outside the range count in the
    outermost bins."""

    start: float
    width: float
    counts: np.ndarray
    # the activation's distinct values and their counts, when it takes at most LEVELS of them
    distinct: Optional["DistinctValues"] = None

    @classmethod
    def spanning(cls, low: float, high: float, bins: int = HISTOGRAM_BINS,
                 distinct: Optional["DistinctValues"] = None) -> "Histogram":
        start, width = _grid(low, high, bins)
        return cls(start, width, np.zeros(bins, np.float64), distinct)

    @property
    def bins(self) -> int:
        return self.counts.size

    @property
    def edges(self) -> np.ndarray:
        return self.start + self.width * np.arange(self.bins + 1)

    def add(self, values: np.ndarray) -> None:
        values = _finite_values(values)
        index = np.clip((values - self.start) * (1.0 / self.width), 0, self.bins - 1).astype(np.intp)
        self.counts += np.bincount(index, minlength=self.bins)


@dataclass
class DistinctValues:
    """The distinct values of an activation (sorted) and how often each occurred."""

    values: np.ndarray
    counts: np.ndarray

    @classmethod
    def merged(cls, values: np.ndarray, previous: Optional["DistinctValues"] = None,
               limit: int = LEVELS) -> Optional["DistinctValues"]:
        """PREVIOUS with VALUES counted in, or None once there are more than LIMIT distinct values.
        A sample is looked at first, so that a large activation of many values is not sorted whole."""
        values = _finite_values(values)
        if np.unique(values[:DISTINCT_SAMPLE]).size > limit:
            return None
        found, counts = np.unique(values, return_counts=True)
        if previous is not None:
            found, inverse = np.unique(np.concatenate([previous.values, found]), return_inverse=True)
            counts = np.bincount(inverse, np.concatenate([previous.counts, counts]))
        return cls(found, counts.astype(np.float64)) if found.size <= limit else None


def _finite_values(values: np.ndarray) -> np.ndarray:
    """VALUES as one float32 row, without NaNs and infinities (copied only when there are some)."""
    values = np.asarray(values, dtype=np.float32).ravel()
    finite = np.isfinite(values)
    return values if finite.all() else values[finite]


def finite_range(values: np.ndarray) -> tuple[float, float]:
    """(min, max) of the finite values; (0, 0) when there are none."""
    values = _finite_values(values)
    return (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)


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
    if histogram.distinct is not None:
        return exact_l2_optimal_range(histogram.distinct, levels)
    if histogram.counts.sum() == 0:
        return 0.0, 0.0
    edges = histogram.edges
    zero = int(round(-histogram.start / histogram.width))
    lo_index, hi_index = np.arange(zero + 1), np.arange(zero, histogram.bins + 1)
    errors = expected_l2_errors(histogram.counts, edges, lo_index, hi_index, levels)
    errors[-1, 0] = np.inf  # the empty range [0, 0]
    i, j = np.unravel_index(np.argmin(errors), errors.shape)
    return float(edges[lo_index[i]]), float(edges[hi_index[j]])


def exact_l2_optimal_range(distinct: DistinctValues, levels: int = LEVELS) -> tuple[float, float]:
    """The range, among those from one of the values (or 0) to another (lo <= 0 <= hi), with the least
    exact squared error, each range quantised as onnxruntime does: step (hi - lo) / (levels - 1) and
    the zero point rounded to a whole step, so 0 is exact and the grid may start just off lo."""
    values = distinct.values.astype(np.float64)
    lows, highs = np.union1d(values[values < 0], [0.0]), np.union1d(values[values > 0], [0.0])
    best, best_range = np.inf, (0.0, 0.0)
    for lo in lows:  # at most LEVELS + 1 of each: every range is scored, a low value at a time
        hi = highs[highs > lo]
        if not hi.size:
            continue
        step = (hi - lo) / (levels - 1)
        zero_point = np.round(-lo / step)[:, None]
        steps = np.clip(np.round(values / step[:, None]) + zero_point, 0, levels - 1) - zero_point
        errors = (distinct.counts * (values - steps * step[:, None]) ** 2).sum(axis=1)
        k = int(np.argmin(errors))
        if errors[k] < best:
            best, best_range = errors[k], (float(lo), float(hi[k]))
    return best_range


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


def collect_histograms(model_path: str, batches: Sequence[np.ndarray], bins: int = HISTOGRAM_BINS) -> dict[str, Histogram]:
    """Run the fp32 model over the calibration batches twice: once for each float activation's
    range (and its distinct values while they are few), then to histogram it over that range. One
    batch at a time: the intermediate tensors of a whole calibration set would not fit in memory."""
    activations = _activation_reader(model_path)
    ranges: dict[str, tuple[float, float]] = {}
    distinct: dict[str, Optional[DistinctValues]] = {}
    for batch in batches:
        for name, value in activations(batch).items():
            low, high = finite_range(value)
            if name in ranges:
                low, high = min(low, ranges[name][0]), max(high, ranges[name][1])
            ranges[name] = low, high
            if name not in distinct or distinct[name] is not None:  # None: too many values
                distinct[name] = DistinctValues.merged(value, distinct.get(name))
    histograms = {name: Histogram.spanning(low, high, bins, distinct[name]) for name, (low, high) in ranges.items()}
    for batch in batches:
        for name, value in activations(batch).items():
            histograms[name].add(value)
    return histograms


def _activation_reader(model_path: str) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """A function from a batch to every float activation of the model on it (the input included),
    by name; the model is loaded and its session made once, for both passes."""
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
    wanted = set(tensors)

    def activations(batch: np.ndarray) -> dict[str, np.ndarray]:
        values = session.run(output_names, {input_name: batch})
        return {input_name: batch, **{name: value for name, value in zip(output_names, values) if name in wanted}}

    return activations


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
