"""Input sources: a path in one of the input formats -> a Ray Dataset of source rows (the contract in
`pipeline.sources.base`).

Each format module plans its input as pieces (`folder`, `parquet`, `tar`, `lmdb`); one Datasource
reads any plan (`datasource`). `read_source` (evaluate, compare, quantize) plans pieces of a ReadTask's
share; `read_work_units` (label) plans work units through the same planners and tags their rows
(`units`).
"""

from __future__ import annotations

import dataclasses
import glob
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from pipeline.sources.base import (LMDB_DATA_FILE, Cut, Plan, Source, SourceError, is_directory, is_glob,
                                   is_image_name, is_tar_name, recut_rows, walk_files)
from pipeline.sources.folder import folder_labels_file, folder_root, plan_folder
from pipeline.sources.labels import read_labels_file
from pipeline.sources.lmdb import plan_lmdb
from pipeline.sources.parquet import plan_parquet
from pipeline.sources.tar import plan_tar
from pipeline.sources.units import WHOLE_SOURCE_UNIT, tag_unit_blocks, tag_whole_source

if TYPE_CHECKING:
    from ray.data import Dataset

    from pipeline.sources.datasource import BlockTagger

# format name -> planner(path, labels, cut) -> Plan
FORMATS: dict[str, Callable[[str, Optional[str], Cut], Plan]] = {
    "parquet": plan_parquet,
    "folder": plan_folder,
    "tar": plan_tar,
    "lmdb": plan_lmdb,
}
# the formats whose pieces are work units (stable ids); any other is labelled as the one unit "all"
UNIT_FORMATS = ("folder", "parquet", "tar")
ACCEPTED_INPUTS = ("a folder of images, a .parquet file, a .tar/.tar.gz/.tgz shard, a folder or glob of "
                   f"those, or an LMDB folder (holding {LMDB_DATA_FILE})")


def detect_format(path: str) -> str:
    """The input format of PATH: a folder or glob of .parquet files or of .tar shards (a folder tree
    of shards at any depth), an LMDB database (a folder holding data.mdb), or an image folder."""
    if is_glob(path):
        matches = glob.glob(path)
        if matches and all(m.endswith(".parquet") for m in matches):
            return "parquet"
        if matches and all(is_tar_name(m) for m in matches):
            return "tar"
        raise SourceError(f"{path}: the pattern matches no .parquet files or .tar shards")
    p = Path(path)
    if not p.exists():
        raise SourceError(f"{path}: no such file or directory")
    if p.is_file():
        if p.suffix == ".parquet":
            return "parquet"
        if is_tar_name(p.name):
            return "tar"
        # --format cannot help here: no format reads a lone image or an unknown file
        raise SourceError(f"{path}: not an input the pipeline reads: --data takes {ACCEPTED_INPUTS}; "
                          "put a single image in a folder")
    if (p / LMDB_DATA_FILE).is_file():
        return "lmdb"
    with os.scandir(p) as entries:
        names = [e.name for e in entries if not is_directory(e) and not e.name.startswith(".")]
    if names and all(n.endswith(".parquet") for n in names):
        return "parquet"
    return folder_tree_format(path)


def folder_tree_format(path: str) -> str:
    """"tar" for a folder tree holding .tar shards and no image files, "folder" otherwise; a
    SourceError when it holds both. Other files (a README) decide nothing: either reader makes each
    of them an error row."""
    shard = image = None
    for key in walk_files(path):
        if is_tar_name(key):
            shard = shard or key
        elif is_image_name(key):
            image = image or key
        if shard and image:  # the answer is known: no need to walk the rest of a large tree
            raise SourceError(f"{path}: holds both image files ({image}) and .tar shards ({shard}); "
                              "pass --format folder or --format tar")
    return "tar" if shard else "folder"


def check_source(path: str, fmt: Optional[str] = None, labels: Optional[str] = None) -> str:
    """The input format of PATH (FMT, or detected), once the checks that need neither Ray nor the
    records have passed: PATH exists, the format is known, the labels file parses. Cheap, so that a
    bad input is reported before Ray takes seconds to start; SourceError otherwise."""
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise SourceError(f"unknown input format {fmt!r}: known formats are {', '.join(sorted(FORMATS))}")
    if not (is_glob(path) or os.path.exists(path)):
        raise SourceError(f"{path}: no such file or directory")
    labels_file = labels
    if fmt == "folder":  # an image folder's own labels.txt is read too
        labels_file = folder_labels_file(folder_root(path), labels)
    if labels_file:
        read_labels_file(labels_file)
    return fmt


def dataset_of(plan: Plan, tag: Optional[BlockTagger] = None) -> Dataset:
    """The Ray Dataset of PLAN's rows (`pipeline.sources.datasource.read_plan`)."""
    # Ray Data takes about a second to import, and every `pipeline` command imports this package (its
    # console lists the formats): only the commands that read an input pay for it.
    from pipeline.sources.datasource import read_plan

    return read_plan(plan, tag)


def read_source(path: str, fmt: Optional[str] = None, labels: Optional[str] = None,
                limit: Optional[int] = None) -> Source:
    """Source rows from PATH in format FMT (detected when None), at most LIMIT of them."""
    fmt = check_source(path, fmt, labels)
    plan = FORMATS[fmt](path, labels, Cut(limit=limit))
    dataset = dataset_of(plan)
    if plan.limit is not None:
        dataset = dataset.limit(plan.limit)
    return Source(dataset, plan.records, plan.recut_rows, plan.exact_count)


def read_work_units(path: str, fmt: Optional[str], done: set[str], unit_size: int) -> Source:
    """Unit-tagged source rows (`pipeline.sources.units`) of every work unit of PATH not in DONE, and how
    many when known without reading. A format without units is read whole as the unit "all", unless
    DONE holds it."""
    fmt = check_source(path, fmt)
    if fmt not in UNIT_FORMATS:
        plan = FORMATS[fmt](path, None, Cut())
        if WHOLE_SOURCE_UNIT in done:
            plan = dataclasses.replace(plan, pieces=[], records=0)
        return Source(dataset_of(plan, tag_whole_source), plan.records, plan.recut_rows, plan.exact_count)
    plan = FORMATS[fmt](path, None, Cut(unit_size, frozenset(done)))
    tasks = plan.read_tasks or len(plan.pieces)
    # a read task's units hold up to UNIT_SIZE records each: taken as more than a small read
    return Source(dataset_of(plan, tag_unit_blocks), plan.records, recut_rows([None] * tasks, plan.records))
