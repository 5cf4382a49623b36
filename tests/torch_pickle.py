"""Writes PyTorch checkpoints (zip and legacy formats) without torch, for the weights tests:
the pickle names torch's globals by module and name, exactly as torch.save would."""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np

STORAGE_NAMES = {np.dtype("float32"): "FloatStorage", np.dtype("int64"): "LongStorage",
                 np.dtype("float16"): "HalfStorage"}


class Global:
    """A global referenced by module and name, whether or not it is importable here."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle only reduces to callables
        raise AssertionError("never called")


class Call:
    """Pickles as `module.name(*args)`."""

    def __init__(self, function: Global, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


class Storage:
    def __init__(self, key: str, data: np.ndarray):
        self.key, self.data = key, np.ascontiguousarray(data).ravel()


class _Pickler(pickle._Pickler):
    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, file, legacy: bool):
        super().__init__(file, protocol=2)
        self.legacy = legacy

    def _save_global(self, obj: Global) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[Global] = _save_global

    def persistent_id(self, obj):
        if not isinstance(obj, Storage):
            return None
        pid = ("storage", Global("torch", STORAGE_NAMES[obj.data.dtype]), obj.key, "cpu", obj.data.size)
        return pid + (None,) if self.legacy else pid


def tensor(storage: Storage, offset: int, size: tuple, stride: tuple) -> Call:
    hooks = Call(Global("collections", "OrderedDict"))
    return Call(Global("torch._utils", "_rebuild_tensor_v2"), storage, offset, size, stride, False, hooks)


def dumps(obj, legacy: bool = False) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, legacy).dump(obj)
    return buffer.getvalue()


def _storages(obj, found: dict) -> dict:
    if isinstance(obj, Storage):
        found[obj.key] = obj
    elif isinstance(obj, Call):
        for arg in obj.args:
            _storages(arg, found)
    elif isinstance(obj, dict):
        for value in obj.values():
            _storages(value, found)
    return found


def save_zip(obj, path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", dumps(obj))
        archive.writestr("archive/byteorder", "little")
        for key, storage in _storages(obj, {}).items():
            archive.writestr(f"archive/data/{key}", storage.data.tobytes())
        archive.writestr("archive/version", "3\n")


def save_legacy(obj, path: Path) -> None:
    storages = _storages(obj, {})
    with open(path, "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(header, f, protocol=2)
        f.write(dumps(obj, legacy=True))
        pickle.dump(sorted(storages), f, protocol=2)
        for key in sorted(storages):
            f.write(struct.pack("<q", storages[key].data.size) + storages[key].data.tobytes())


def state_dict(**tensors) -> collections.OrderedDict:
    return collections.OrderedDict(tensors)
