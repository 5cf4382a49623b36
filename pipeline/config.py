"""Preprocessing presets: every preprocessing choice lives in a YAML file under conf/."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from pipeline.errors import UserError

INTERPOLATIONS = ("area", "bilinear", "bicubic", "nearest")


class ConfigError(UserError):
    """A preset or config file that cannot be used; the message says why."""


@dataclass(frozen=True)
class Preset:
    """How a model expects its input: decoded image -> float32 NCHW tensor."""

    name: str
    channel_order: Literal["RGB", "BGR"]
    mean: tuple[float, float, float]  # in channel_order, on 0..255 pixels
    std: tuple[float, float, float]
    interpolation: Literal["area", "bilinear", "bicubic", "nearest"]
    scale: int  # shorter side is resized to this
    crop: int  # centre crop, square
    crop_offset: Literal["floor", "round"]  # (size - crop) // 2, or round((size - crop) / 2)

    @classmethod
    def from_dict(cls, values: dict, source: str) -> "Preset":
        fields = set(cls.__dataclass_fields__)
        missing = fields - set(values)
        unknown = set(values) - fields
        if missing or unknown:
            raise ConfigError(
                f"{source}: " + "; ".join(
                    part for part in (
                        f"missing keys {sorted(missing)}" if missing else "",
                        f"unknown keys {sorted(unknown)}" if unknown else "",
                    ) if part
                )
            )
        preset = cls(
            name=str(values["name"]),
            channel_order=str(values["channel_order"]).upper(),
            mean=_three_numbers(values["mean"], "mean", source),
            std=_three_numbers(values["std"], "std", source),
            interpolation=str(values["interpolation"]),
            scale=_pixels(values["scale"], "scale", source),
            crop=_pixels(values["crop"], "crop", source),
            crop_offset=str(values["crop_offset"]),
        )
        preset._validate(source)
        return preset

    def _validate(self, source: str) -> None:
        if self.channel_order not in ("RGB", "BGR"):
            raise ConfigError(f"{source}: channel_order must be RGB or BGR, not {self.channel_order!r}")
        if min(self.std) <= 0:
            raise ConfigError(f"{source}: std must be > 0, got {list(self.std)}")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"{source}: interpolation must be one of {INTERPOLATIONS}")
        if not 0 < self.crop <= self.scale:
            raise ConfigError(f"{source}: need 0 < crop <= scale, got crop {self.crop}, scale {self.scale}")
        if self.crop_offset not in ("floor", "round"):
            raise ConfigError(f"{source}: crop_offset must be floor or round")


MAX_SIDE = 16384  # pixels: beyond any model's input, and within what the resize kernels take


def _three_numbers(value: object, key: str, source: str) -> tuple[float, float, float]:
    """VALUE as the three per-channel numbers KEY needs; ConfigError naming KEY otherwise."""
    if not (isinstance(value, list) and len(value) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise ConfigError(f"{source}: {key} must be a list of three numbers (one per channel), got {value!r}")
    # YAML's .nan and .inf are floats, and a whole number past float's range is no float: either
    # would make every preprocessed pixel NaN or infinite without a word
    numbers = [_finite_float(v) for v in value]
    if None in numbers:
        raise ConfigError(f"{source}: {key} must be finite numbers (not .nan or .inf), got {value!r}")
    return tuple(numbers)


def _finite_float(value: int | float) -> float | None:
    """VALUE as a float, or None when it is NaN, infinite or too large for a float."""
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _pixels(value: object, key: str, source: str) -> int:
    """VALUE as a side length in pixels (a whole number, 1 to MAX_SIDE); ConfigError naming KEY otherwise."""
    if not (isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_SIDE):
        raise ConfigError(f"{source}: {key} must be a whole number of pixels from 1 to {MAX_SIDE}, got {value!r}")
    return value


def conf_dirs() -> list[Path]:
    """Where presets are looked up: the repo's conf/ (editable install), then the packaged copy."""
    package = Path(__file__).resolve().parent
    return [package.parent / "conf", package / "conf"]


def preset_names() -> list[str]:
    return sorted({p.stem for d in conf_dirs() if d.is_dir() for p in d.glob("*.yaml")})


def load_preset(name_or_path: str | Preset) -> Preset:
    """A preset by name (conf/NAME.yaml) or by path to a YAML file; a Preset as it is (one read from a
    model's metadata)."""
    if isinstance(name_or_path, Preset):
        return name_or_path
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = next((d / f"{name_or_path}.yaml" for d in conf_dirs() if (d / f"{name_or_path}.yaml").is_file()), path)
    if not path.is_file():
        raise ConfigError(f"no preset {name_or_path!r}: known presets are {', '.join(preset_names())}")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not a valid YAML text file ({exc})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of preset keys")
    return Preset.from_dict(values, str(path))
