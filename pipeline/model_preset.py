"""The preprocessing preset travels with the model, in the ONNX file's `metadata_props`.

A model written by this project (`model build`, `quantize`, `model import-caffe2`) carries the preset
it was built for as JSON under PRESET_KEY, as timm's `pretrained_cfg` travels with its weights: a
run that is not given `--preset` preprocesses the images the way the model expects.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

from pipeline.config import ConfigError, Preset

PRESET_KEY = "int8_pipeline.preset"


def attach_preset(model, preset: Preset) -> None:
    """Write PRESET into MODEL's (an onnx.ModelProto) metadata, replacing any preset it held."""
    kept = [prop for prop in model.metadata_props if prop.key != PRESET_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    entry = model.metadata_props.add()
    entry.key = PRESET_KEY
    entry.value = json.dumps(dataclasses.asdict(preset))


def model_preset(path: str | os.PathLike) -> Optional[Preset]:
    """The preset the ONNX model at PATH carries, or None when it carries none. ConfigError when the
    metadata is there but is not a valid preset."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    value = next((prop.value for prop in model.metadata_props if prop.key == PRESET_KEY), None)
    if value is None:
        return None
    source = f"{path} (metadata {PRESET_KEY})"
    try:
        values = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source}: not JSON ({exc})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping of preset keys")
    return Preset.from_dict(values, source)
