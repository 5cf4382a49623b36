"""`pipeline label`: predictions with class names for every image of an unlabelled archive, written
exactly once and resumable.

The input is split into work units (pipeline/sources/units.py: a tar shard, or runs of at most
`unit_size` of its members when the shards are few; runs of at most `unit_size` rows of a Parquet
shard; runs of `unit_size` files of an image folder). Rows stream from the inference actors to the
driver, which appends each unit's rows to its own temporary files and, once the unit has all its
rows, renames them into place: first `errors/UNIT.parquet`, then `labels/UNIT.parquet`, whose
presence marks the unit done. A killed run leaves only temporary files and at most an errors shard
without its labels shard; `--resume` deletes both and reads every unit that is not done. The driver
holds open writers for the units in flight only, never a list of keys or predictions.
`manifest.json`, written last from the shards' footers, marks the run finished.

DIR layout: labels/*.parquet (`key`, `class_ids`, `synsets`, `names`, `probs`: the top K, best
first; probabilities from a softmax over all 1,000 classes), errors/*.parquet (`key`, `reason`),
run.json (what the run was asked to do: model and the sha256 of its bytes, data, format, preset and its
values, top-k, unit size), manifest.json (those settings and the counts, once finished). A resume or a re-run into a
DIR whose recorded settings differ is refused: its labels would mix two runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.classes import NUM_CLASSES, imagenet_classes
from pipeline.config import Preset
from pipeline.errors import UsageError
from pipeline.output import OutputDirError, check_not_a_file, make_output_dir, publish, temp_path, write_json
from pipeline.predict import predict
from pipeline.prediction_table import fixed_size_lists
from pipeline.run_checks import check_run
from pipeline.runtime import init_ray
from pipeline.sources import UNIT_FORMATS, read_work_units
from pipeline.sources.base import SourceError
from pipeline.sources.units import UNIT_COLUMNS
from pipeline.streaming import ProgressCallback, stream_batches

LABELS_DIR = "labels"
ERRORS_DIR = "errors"
RUN_FILE = "run.json"
MANIFEST_FILE = "manifest.json"
UNIT_SIZE = 1000
ROW_GROUP_ROWS = 1024
ERRORS_SCHEMA = pa.schema([("key", pa.string()), ("reason", pa.string())])


class AlreadyFinished(Exception):
    """DIR holds a finished run; `manifest` is its manifest."""

    def __init__(self, output: Path, manifest: dict):
        super().__init__(f"{output} already holds a finished labelling run ({manifest['images']} images: "
                         f"{manifest['labelled']} labelled, {manifest['errors']} errors); "
                         "nothing to do (pass --overwrite to label again)")
        self.manifest = manifest


def labels_schema(k: int) -> pa.Schema:
    return pa.schema([
        ("key", pa.string()),
        ("class_ids", pa.list_(pa.int32(), k)), ("synsets", pa.list_(pa.string(), k)),
        ("names", pa.list_(pa.string(), k)), ("probs", pa.list_(pa.float32(), k)),
    ])


class TableBuilder:
    """Prediction batches -> the labels table (with synset ids and names) and the errors table."""

    def __init__(self, k: int):
        classes = imagenet_classes()
        self.k = k
        self.schema = labels_schema(k)
        self.synsets = np.asarray(classes.synsets, dtype=object)
        self.names = np.asarray(classes.names, dtype=object)

    def labelled(self, batch: dict[str, np.ndarray]) -> pa.Table:
        ids = batch["top_ids"].reshape(-1, self.k)
        return pa.Table.from_arrays([
            pa.array(batch["key"].tolist(), pa.string()),
            fixed_size_lists(ids, pa.int32()), fixed_size_lists(self.synsets[ids], pa.string()),
            fixed_size_lists(self.names[ids], pa.string()),
            fixed_size_lists(batch["top_probs"].reshape(-1, self.k), pa.float32()),
        ], schema=self.schema)

    @staticmethod
    def errors(batch: dict[str, np.ndarray]) -> pa.Table:
        return pa.Table.from_arrays([pa.array(batch["key"].tolist(), pa.string()),
                                     pa.array(batch["error"].tolist(), pa.string())], schema=ERRORS_SCHEMA)


def shard_path(output: Path, table: str, unit: str) -> Path:
    return output / table / f"{unit}.parquet"


class BufferedParquet:
    """A Parquet file written in row groups of about ROW_GROUP_ROWS rows (the stream's batches are
    small; one row group each would make slow files)."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.path = path
        self.writer = pq.ParquetWriter(path, schema)
        self.pending: list[pa.Table] = []
        self.pending_rows = 0

    def write(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.pending_rows += table.num_rows
        if self.pending_rows >= ROW_GROUP_ROWS:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.writer.write_table(pa.concat_tables(self.pending))
            self.pending, self.pending_rows = [], 0

    def close(self) -> None:
        self.flush()
        self.writer.close()


class UnitWriter:
    """One unit's rows streamed to temporary shards, renamed into place once the unit is complete."""

    def __init__(self, output: Path, unit: str, builder: TableBuilder):
        self.output, self.unit, self.builder = output, unit, builder
        self.received = 0
        self.expected = -1  # unknown until a row of the unit's last block arrives
        self.labelled = BufferedParquet(temp_path(shard_path(output, LABELS_DIR, unit)), builder.schema)
        self.errors = BufferedParquet(temp_path(shard_path(output, ERRORS_DIR, unit)), ERRORS_SCHEMA)

    def write(self, batch: dict[str, np.ndarray]) -> None:
        ok = batch["error"] == ""
        if ok.any():
            self.labelled.write(self.builder.labelled({k: v[ok] for k, v in batch.items()}))
        if not ok.all():
            self.errors.write(self.builder.errors({k: v[~ok] for k, v in batch.items()}))
        self.received += len(ok)
        self.expected = max(self.expected, int(batch["unit_rows"].max()))
        if 0 <= self.expected < self.received:  # exactly once must fail loudly, never write duplicates
            raise RuntimeError(f"unit {self.unit} received {self.received} rows but holds {self.expected}")

    @property
    def complete(self) -> bool:
        return self.received == self.expected

    def commit(self) -> None:
        self.labelled.close()
        self.errors.close()
        for table in (ERRORS_DIR, LABELS_DIR):  # the labels shard last: its presence means done
            shard = shard_path(self.output, table, self.unit)
            publish(temp_path(shard), shard)


# what to do about a damaged file of a run's state, by its name
DAMAGED_STATE_ADVICE = {
    RUN_FILE: "pass --overwrite to label again",
    MANIFEST_FILE: "delete it and pass --resume to write it again from the shards",
    LABELS_DIR: "delete it and pass --resume to label its unit again",
}


def damaged_state(path: Path, what: str, advice: str, problem: object) -> OutputDirError:
    return OutputDirError(f"{path}: damaged {what} ({problem}), left by a crash or a full disk: {advice}")


def read_run_json(path: Path) -> dict:
    """run.json or manifest.json of a run, or an OutputDirError saying it is damaged and what to do."""
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise damaged_state(path, "run state", DAMAGED_STATE_ADVICE[path.name],
                            "empty" if not path.stat().st_size else f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise damaged_state(path, "run state", DAMAGED_STATE_ADVICE[path.name], "not a JSON object")
    return data


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def run_description(model: str, data: str, fmt: str, preset: Preset, top_k: int, unit_size: int) -> dict:
    # the model's bytes, not only its path, and the preset's values, not only its name: a model
    # rebuilt, or a preset file edited, in place labels differently
    return {"model": os.path.abspath(model), "model_sha256": file_sha256(model),
            "data": os.path.abspath(data) if os.path.exists(data) else data,
            "format": fmt, "preset": preset.name,
            "preset_values": json.loads(json.dumps(dataclasses.asdict(preset))),  # as run.json holds them
            "top_k": top_k, "unit_size": unit_size}


def changed_settings(previous: dict, run: dict) -> list[str]:
    """What RUN sets differently from the PREVIOUS run's record. A setting the record lacks (a run
    of a version that did not record the model's sha256) counts as changed: the outputs could not
    be told apart from a mix of two models, so the user decides, with --overwrite or a new DIR."""
    return [f"{name} was {previous[name]!r}, now {value!r}" if name in previous else f"{name} was not recorded"
            for name, value in run.items() if previous.get(name) != value]


def check_output(output: Path, run: dict, resume: bool, overwrite: bool) -> set[str]:
    """The units of RUN already done in OUTPUT; refuses (raises) what would mix runs. Changes nothing."""
    check_not_a_file(output)
    if overwrite:
        return set()
    if (output / MANIFEST_FILE).is_file():
        manifest = read_run_json(output / MANIFEST_FILE)
        changed = changed_settings(manifest, run)
        if changed:
            raise OutputDirError(f"{output} holds a finished labelling run with other settings ({'; '.join(changed)}): "
                                 "pass a new --output, or --overwrite to label again")
        raise AlreadyFinished(output, manifest)
    if not (output.is_dir() and any(output.iterdir())):
        return set()
    if not resume:
        raise OutputDirError(f"{output} is not empty and holds no finished run: pass --resume to finish "
                             "an interrupted run into it, or --overwrite to start again")
    if not (output / RUN_FILE).is_file():
        raise OutputDirError(f"{output} holds no labelling run to resume (no {RUN_FILE}); "
                             "pass --overwrite to label into it anyway")
    changed = changed_settings(read_run_json(output / RUN_FILE), run)
    if changed:
        raise OutputDirError(f"{output} holds an interrupted run with other settings ({'; '.join(changed)}): "
                             "resume it with the same options, pass a new --output, or --overwrite")
    return finished_units(output)


def finished_units(output: Path) -> set[str]:
    """The work units whose labels shard is in place (renamed there only once complete)."""
    return {p.stem for p in (output / LABELS_DIR).glob("*.parquet")}


def claim_output(output: Path, run: dict, overwrite: bool) -> None:
    """Make OUTPUT ready for RUN once check_output has accepted it: with OVERWRITE drop the previous
    run's files (and only those); otherwise drop what a killed run left half-written."""
    if overwrite:
        for name in (LABELS_DIR, ERRORS_DIR):
            shutil.rmtree(output / name, ignore_errors=True)
        for name in (MANIFEST_FILE, RUN_FILE):
            (output / name).unlink(missing_ok=True)
    for name in (LABELS_DIR, ERRORS_DIR):
        make_output_dir(output / name)
        for temp in (output / name).glob(temp_path(shard_path(output, name, "*")).name):
            temp.unlink()  # left by a killed run: that unit is read again
    done = finished_units(output)
    for orphan in (output / ERRORS_DIR).glob("*.parquet"):
        if orphan.stem not in done:  # killed between the two renames: that unit is read again
            orphan.unlink()
    write_json(output / RUN_FILE, run)


def release_output(output: Path) -> None:
    """Undo claim_output after a run that committed no unit: OUTPUT then takes a fresh run again."""
    for name in (LABELS_DIR, ERRORS_DIR):
        (output / name).rmdir()  # empty: a unit's files exist only once one of its rows has arrived
    (output / RUN_FILE).unlink()


def shard_counts(output: Path) -> dict[str, dict[str, int]]:
    """labelled and error rows of every committed unit, from the shards' footers."""
    counts = {}
    for shard in sorted((output / LABELS_DIR).glob("*.parquet")):
        counts[shard.stem] = {"labelled": shard_rows(shard, shard),
                              "errors": shard_rows(shard_path(output, ERRORS_DIR, shard.stem), shard)}
    return counts


def shard_rows(path: Path, labels_shard: Path) -> int:
    """The rows of shard PATH of the unit of LABELS_SHARD, from its footer; an OutputDirError naming
    the labels shard, whose deletion redoes the unit, when it cannot be read."""
    try:
        return pq.read_metadata(path).num_rows
    except (OSError, pa.ArrowException) as exc:
        problem = " ".join(str(exc).split())
        raise damaged_state(labels_shard, "labels shard", DAMAGED_STATE_ADVICE[LABELS_DIR],
                            problem if path == labels_shard else f"its errors shard {path}: {problem}") from None


class RecordCount:
    """How many records the input holds, for the progress bar's ETA: KNOWN (done before plus the work
    units' own count) when the work units know it (an image folder's are listed); else tar shards'
    members, counted in a background thread, so that scanning many shards does not delay the start."""

    def __init__(self, data: str, fmt: str, known: Optional[int]):
        self.value = known
        self.thread = threading.Thread(target=self._count, args=(data,), daemon=True)
        if known is None and fmt == "tar":
            self.thread.start()

    def _count(self, data: str) -> None:
        from pipeline.sources.tar import count_tar_records

        try:
            self.value = count_tar_records(data)
        except Exception:  # an unreadable input is reported by the readers; the bar just has no total
            self.value = None


def label(model: str, data: str, output: str, *, top_k: int = 5, preset: str | Preset = "torch",
          fmt: Optional[str] = None, resume: bool = False, overwrite: bool = False,
          unit_size: int = UNIT_SIZE, batch_size: int = 32, address: Optional[str] = None,
          on_progress: Optional[ProgressCallback] = None) -> dict:
    """Label every image of DATA into OUTPUT and return the manifest. Raises AlreadyFinished when
    OUTPUT holds a finished run of the same settings (unless OVERWRITE), OutputDirError when it holds
    something else, and SourceError (recording no run in OUTPUT) when DATA holds no record.
    ON_PROGRESS(records_done, records_total) follows the stream, counting units done before."""
    if not 1 <= top_k <= NUM_CLASSES:
        raise UsageError(f"--top-k must be between 1 and {NUM_CLASSES}, got {top_k}")
    if unit_size < 1:
        raise UsageError(f"--shard-size must be at least 1, got {unit_size}")
    started = time.perf_counter()
    checked = check_run(model, preset, data, fmt)
    out = Path(output)
    if Path(data).is_dir() and out.resolve().is_relative_to(Path(data).resolve()):
        raise OutputDirError(f"{out} is inside the input {data}: its own files would be read as records; "
                             "give an --output outside it")
    fmt = checked.fmt
    run = run_description(model, data, fmt, checked.preset, top_k, unit_size)
    make_output_dir(out)  # writable, before Ray starts
    done = check_output(out, run, resume, overwrite)
    init_ray(address)
    source = read_work_units(data, fmt, done, unit_size)  # before claiming OUTPUT: a bad input leaves it as it was
    claim_output(out, run, overwrite)
    done_before = sum(sum(c.values()) for c in shard_counts(out).values())
    total = RecordCount(data, fmt, None if source.num_records is None else done_before + source.num_records)
    predictions = predict(source, checked.info, checked.preset, require_label=False, top_k=top_k,
                          batch_size=batch_size, run_id=uuid.uuid4().hex, carry=UNIT_COLUMNS)
    builder = TableBuilder(top_k)
    writers: dict[str, UnitWriter] = {}

    def take(batch: dict[str, np.ndarray]) -> None:
        for unit in np.unique(batch["unit"]):
            in_unit = batch["unit"] == unit
            writer = writers.get(unit)
            if writer is None:
                writer = writers[unit] = UnitWriter(out, unit, builder)
            writer.write({name: batch[name][in_unit] for name in ("key", "error", "top_ids", "top_probs",
                                                                  "unit_rows")})
            if writer.complete:
                writers.pop(unit).commit()

    if on_progress:
        on_progress(done_before, total.value)
    records = stream_batches(predictions, take, on_progress=on_progress, total=lambda: total.value,
                             done_before=done_before)
    # the stream has ended: every row of every unit has arrived, unless the source lost some, and
    # then the units still open are not committed (a resume reads them again)
    source.check_all_read(records, data)
    for writer in writers.values():
        writer.commit()

    wall = time.perf_counter() - started
    shards = shard_counts(out)
    if not shards:  # a finished run of 0 images would make a later run over the filled input "nothing to do"
        release_output(out)
        raise SourceError(f"{data}: no {'files' if fmt == 'folder' else 'records'} to read")
    labelled = sum(c["labelled"] for c in shards.values())
    errors = sum(c["errors"] for c in shards.values())
    manifest = {
        **read_run_json(out / RUN_FILE),
        "images": labelled + errors, "labelled": labelled, "errors": errors,
        "resumed_from": done_before, "this_run_images": records,
        "wall_s": round(wall, 3), "images_per_s": records / wall if wall else 0.0,
        "partitioned": fmt in UNIT_FORMATS,
        "shards": shards,
    }
    write_json(out / MANIFEST_FILE, manifest)
    return manifest
