"""The checks a run makes before Ray starts and any image is read: a bad preset, model or input is
then one sentence at once, not the failure of every task after the cluster has started."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from pipeline.config import Preset, load_preset
from pipeline.onnx_model import ModelError, ModelInfo, checked_model_info
from pipeline.sources import check_source


def check_preset_fits(info: ModelInfo, preset: Preset) -> None:
    if (info.height, info.width) != (preset.crop, preset.crop):
        raise ModelError(f"{info.path}: the model takes {info.height}x{info.width} images but preset "
                         f"{preset.name!r} crops {preset.crop}x{preset.crop}.")


@dataclass(frozen=True)
class CheckedRun:
    """What the checks read: the model, the preset and the input's format."""

    info: ModelInfo
    preset: Preset
    fmt: str


def check_run(model: str, preset: str | Preset, data: str, fmt: Optional[str], labels: Optional[str] = None, *,
              check_model: Optional[Callable[[ModelInfo], None]] = None) -> CheckedRun:
    """Load PRESET, check MODEL (onnxruntime loads it; then CHECK_MODEL, the command's own check of
    it), check that the preset's crop is the model's input and that DATA (with LABELS) can be read as
    FMT, or as the format detected when FMT is None. The first that fails raises its UserError."""
    preset_obj = load_preset(preset)
    info = checked_model_info(model)
    if check_model:
        check_model(info)
    check_preset_fits(info, preset_obj)
    return CheckedRun(info, preset_obj, check_source(data, fmt, labels))
