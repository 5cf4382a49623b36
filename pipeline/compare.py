"""`pipeline compare`: several models on the same images in one pass, the first the baseline.

Every record is read once, and decoded and preprocessed in that read task once per distinct preset
(models that share a preset share its input); one inference actor per core holds a `Classifier` of every model, all pinned to its core, and runs them
all on the same batch. The driver splits the stream into one prediction stream per model, counted
by the same AccuracyCounter and written by the same prediction_table as `evaluate`'s, so each
model's top-1/top-5 are what `evaluate` gives for it alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import time
import uuid
import warnings
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pyarrow.parquet as pq
import ray.data

from pipeline.config import Preset, load_preset
from pipeline.cores import CorePin
from pipeline.evaluate import PREDICTIONS_FILE, PREDICTIONS_PARTIAL, drop_previous_results
from pipeline.inference import Classifier
from pipeline.metrics import AccuracyCounter
from pipeline.onnx_model import ModelError, ModelInfo, checked_model_info
from pipeline.output import atomic_file, make_output_dir, write_json
from pipeline.prediction_table import prediction_schema, prediction_table
from pipeline.preprocess import Preprocessor
from pipeline.quality import Predictions, against_baseline, model_quality
from pipeline.real_labels import RealLabels
from pipeline.report import THUMBNAIL_SIZE, model_name, write_report
from pipeline.run_checks import check_preset_fits
from pipeline.runtime import inference_actor_options, inference_slots, init_ray, map_after_read
from pipeline.sources import check_source, read_source
from pipeline.streaming import ProgressCallback, stream_batches


def check_comparable(infos: list[ModelInfo]) -> None:
    """Every model takes the baseline's input size; the first that does not is named (before Ray
    starts and any image is read). Their classes are the same: ModelInfo names any model that does
    not score the 1,000 ImageNet classes (a 1,001st background output is dropped)."""
    base = infos[0]
    for info in infos[1:]:
        if (info.height, info.width) != (base.height, base.width):
            raise ModelError(f"{info.path} takes {info.height}x{info.width} images, the baseline {base.path} "
                             f"{base.height}x{base.width}: compare models of one input size")


def unique_names(paths: list[str]) -> list[str]:
    """Each model's file stem, numbered where two models share one: the name of its output folder."""
    stems = [model_name(p) for p in paths]
    return [f"{stem}-{i + 1}" if stems.count(stem) > 1 else stem for i, stem in enumerate(stems)]


class PresetsPreprocessor:
    """Ray Data map_batches callable: source rows -> `key, label, error` and `crop<j>` for each
    distinct preset j (the Preprocessor of each, over the same rows). A row that fails under any
    preset keeps the first reason."""

    def __init__(self, presets: list[Preset]):
        self.stages = [Preprocessor(preset) for preset in presets]

    def __call__(self, block: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for chunks in zip(*(stage(block) for stage in self.stages)):
            errors = chunks[0]["error"].copy()
            for chunk in chunks[1:]:
                errors = np.where(errors == "", chunk["error"], errors)
            yield {"key": chunks[0]["key"], "label": chunks[0]["label"], "error": errors,
                   **{f"crop{j}": chunk["crop"] for j, chunk in enumerate(chunks)}}


class ModelSet:
    """Ray actor: one `Classifier` per model, all pinned to the actor's one core; preprocessed rows ->
    for each model j its Classifier's `top_ids, top_probs, probs, error` suffixed with j, and
    `seconds<j>`, the model's time shared out over the rows."""

    PER_MODEL = ("top_ids", "top_probs", "probs", "error")

    def __init__(self, infos: list[ModelInfo], presets: list[Preset], preset_of_model: list[int], run_id: str):
        pin = CorePin(run_id)
        self.classifiers = [Classifier(info, presets[preset], top_k=5, probabilities=True, pin=pin)
                            for info, preset in zip(infos, preset_of_model)]
        self.preset_of_model = preset_of_model

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["key"])
        out = {}
        for j, (classifier, preset) in enumerate(zip(self.classifiers, self.preset_of_model)):
            started = time.perf_counter()
            rows = classifier({"key": batch["key"], "label": batch["label"], "error": batch["error"],
                               "crop": batch[f"crop{preset}"]})
            out.update({f"{column}{j}": rows[column] for column in self.PER_MODEL})
            out[f"seconds{j}"] = np.full(n, (time.perf_counter() - started) / max(n, 1))
        return {**{column: rows[column] for column in ("key", "label", "node", "core")}, **out}


def model_rows(batch: dict[str, np.ndarray], j: int) -> dict[str, np.ndarray]:
    """Model J's prediction rows of a ModelSet batch, in `Classifier`'s columns."""
    return {**{column: batch[column] for column in ("key", "label", "node", "core")},
            **{column: batch[f"{column}{j}"] for column in ModelSet.PER_MODEL}}


def image_thumbnails(data: str, fmt: str, labels: Optional[str], keys: set[str], preset: Preset) -> dict[str, bytes]:
    """JPEG thumbnails of the records KEYS, read again from the source (a few flipped images: a pass
    over the records that decodes only those, as PRESET's Preprocessor does: raw pixels, boxes)."""
    from PIL import Image

    if not keys:
        return {}
    with warnings.catch_warnings():  # Ray Data prefers an expression; a set lookup in Python is simpler here
        warnings.filterwarnings("ignore", message="Use 'expr' instead of 'fn'")
        rows = read_source(data, fmt=fmt, labels=labels).dataset.filter(lambda row: row["key"] in keys).take_all()
    pixels_of = Preprocessor(preset)._pixels
    thumbnails = {}
    for row in rows:
        try:
            pixels = pixels_of({column: [value] for column, value in row.items()}, 0)
        except ValueError:
            continue  # shown as "image not read"
        image = Image.fromarray(pixels)
        image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=85)
        thumbnails[row["key"]] = buffer.getvalue()
    return thumbnails


COMPARISON_FILES = ("comparison.json", "report.html")


def compare(models: list[str], data: str, presets: list[str | Preset], output: str, *,
            fmt: Optional[str] = None, labels: Optional[str] = None, limit: Optional[int] = None,
            batch_size: int = 32, address: Optional[str] = None, real_labels: Optional[str] = None,
            on_progress: Optional[ProgressCallback] = None) -> dict:
    """MODELS (the first the baseline, each with its preset in PRESETS) on DATA in one pass: OUTPUT gets
    <name>/predictions.parquet (with the class distributions) and <name>/metrics.json per model,
    comparison.json and report.html; returns the comparison."""
    started = time.perf_counter()
    if len(models) < 2:
        raise ModelError("compare needs at least two --model, the first the baseline")
    real = RealLabels.load(real_labels)
    preset_objs = [load_preset(p) for p in presets]
    infos = [checked_model_info(m) for m in models]
    check_comparable(infos)
    for info, preset in zip(infos, preset_objs):
        check_preset_fits(info, preset)
    distinct = list(dict.fromkeys(preset_objs))
    fmt = check_source(data, fmt, labels)
    names = unique_names(models)
    folders = [make_output_dir(Path(output) / name) for name in names]
    for folder in folders:
        drop_previous_results(folder)
    for name in COMPARISON_FILES:
        (Path(output) / name).unlink(missing_ok=True)
    init_ray(address)
    source = read_source(data, fmt=fmt, labels=labels, limit=limit)
    preprocessed = map_after_read(source.dataset, PresetsPreprocessor(distinct), source.recut_rows, batch_size=None,
                                  batch_format="numpy")
    batch_size = min([info.batch_size for info in infos if info.batch_size] or [batch_size])
    predictions = preprocessed.map_batches(
        ModelSet, fn_constructor_kwargs={"infos": [dataclasses.replace(info, path=os.path.abspath(info.path))
                                                   for info in infos],
                                         "presets": distinct,
                                         "preset_of_model": [distinct.index(p) for p in preset_objs],
                                         "run_id": uuid.uuid4().hex},
        batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=inference_slots()),
        **inference_actor_options())

    counters = [AccuracyCounter() for _ in models]
    seconds = [0.0 for _ in models]
    execution_started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        partials = [stack.enter_context(atomic_file(folder / PREDICTIONS_FILE, folder / PREDICTIONS_PARTIAL))
                    for folder in folders]
        writers = [stack.enter_context(pq.ParquetWriter(partial, prediction_schema(True))) for partial in partials]

        def take(batch: dict) -> None:
            for j, (counter, writer) in enumerate(zip(counters, writers)):
                rows = model_rows(batch, j)
                counter.update(rows)
                writer.write_table(prediction_table(rows))
                seconds[j] += float(batch[f"seconds{j}"].sum())

        stream_batches(predictions, take, on_progress=on_progress, total=lambda: source.num_records)
        finished = time.perf_counter()
        wall = finished - started
        source.check_all_read(counters[0].records, data)

    read = [Predictions.read(folder / PREDICTIONS_FILE) for folder in folders]
    reports = []
    for model, name, preset, counter, time_s, folder, predicted in zip(models, names, preset_objs, counters, seconds,
                                                                        folders, read):
        metrics = {
            "model": os.path.abspath(model), "data": os.path.abspath(data) if os.path.exists(data) else data,
            "preset": preset.name, **counter.summary(),
            # the pass, shared by every model
            "wall_s": round(wall, 3), "images_per_s": counter.records / wall if wall else 0.0,
            # this model's own inference time on one core, summed over the actors
            "inference_s": round(time_s, 3),
            "inference_images_per_core_s": counter.evaluated / time_s if time_s else 0.0,
            **model_quality(predicted, real),
        }
        write_json(folder / "metrics.json", metrics)
        reports.append({"name": name, "metrics": metrics})
    comparisons = [{"name": names[j], **against_baseline(read[0], read[j])} for j in range(1, len(models))]
    flipped = {f["key"] for c in comparisons for f in c["flipped_right_to_wrong"] + c["flipped_wrong_to_right"]}
    thumbnails = image_thumbnails(data, fmt, labels, flipped, preset_objs[0])
    comparison = {
        "data": reports[0]["metrics"]["data"], "images": counters[0].records, "baseline": names[0],
        "wall_s": round(wall, 3), "images_per_s": counters[0].records / wall if wall else 0.0,
        "run_images_per_s": counters[0].records / (finished - execution_started),
        "models": [{"name": r["name"], **{k: v for k, v in r["metrics"].items() if k != "per_class"}} for r in reports],
        "comparisons": comparisons,
    }
    write_json(Path(output) / COMPARISON_FILES[0], comparison)
    write_report(Path(output) / COMPARISON_FILES[1], f"{' vs '.join(names)} on {Path(str(comparison['data'])).name}",
                 reports, comparisons, thumbnails)
    return comparison
