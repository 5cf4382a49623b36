"""Reading model weights without torch: `.pth`/`.pt` (PyTorch's zip and legacy formats), `.npz`
and `.safetensors`, each into a flat ``{name: numpy array}`` state dict.

A `.pth` file is a pickle, and unpickling runs whatever callables the file names. The reader
here resolves only the handful of globals a tensor state dict needs, to our own numpy
implementations, and refuses every other global *before* anything is called: loading an
untrusted checkpoint cannot run code.
"""

from __future__ import annotations

import collections
import io
import json
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import UserError


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 values held as uint16 -> float32 (bfloat16 is the top half of a float32)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


class WeightsError(UserError):
    """A weights file that cannot be read safely or correctly; the message says why."""


# torch's legacy serialisation starts with this pickled number, then a protocol version.
LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

# torch.<Name>Storage -> element type. bfloat16 has no numpy type: read as uint16, widened later.
STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


@dataclass(frozen=True)
class _StorageType:
    """Stands in for torch.<Name>Storage inside the pickle."""

    name: str

    @property
    def dtype(self) -> np.dtype:
        return STORAGE_DTYPES[self.name]


@dataclass
class _Storage:
    """A storage named by the pickle; its bytes are attached after unpickling (legacy files
    keep them after the pickle, zip files in separate members)."""

    key: str
    storage_type: _StorageType
    numel: int
    data: np.ndarray | None = None


@dataclass
class _TensorRef:
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def materialise(self) -> np.ndarray:
        base = self.storage.data
        if base is None:
            raise WeightsError(f"storage {self.storage.key} has no data in the file")
        count = int(np.prod(self.size)) if self.size else 1
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride)) if count else self.offset
        if count and (self.offset < 0 or last >= base.size):
            raise WeightsError(f"tensor of size {self.size} runs past its storage {self.storage.key}")
        view = np.lib.stride_tricks.as_strided(
            base[self.offset:], shape=self.size, strides=[s * base.itemsize for s in self.stride]
        )
        array = np.array(view)  # own, contiguous copy
        if self.storage.storage_type.name == "BFloat16Storage":
            array = bfloat16_to_float32(array)
        return array


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored) -> _TensorRef:
    """torch._utils._rebuild_tensor[_v2](storage, offset, size, stride, requires_grad, hooks, ...)."""
    if not isinstance(storage, _Storage):
        raise WeightsError("a tensor in the file is not backed by a storage")
    return _TensorRef(storage, int(storage_offset), tuple(int(n) for n in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data, requires_grad, backward_hooks) -> _TensorRef:
    """torch._utils._rebuild_parameter: an nn.Parameter is its tensor here."""
    return data


# The only globals a tensor state dict needs. Everything else is refused by name.
ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str, storages: dict[str, _Storage]):
        super().__init__(file)
        self.source = source
        self.storages = storages

    def find_class(self, module: str, name: str):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise WeightsError(
                f"{self.source}: refusing to load: the pickle names the global {module}.{name}, which a "
                "tensor state dict never needs (it could run code); only tensors, storages and "
                "OrderedDict are allowed"
            ) from None

    def persistent_load(self, pid):
        # Zip: ('storage', type, key, location, numel); legacy adds view_metadata.
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise WeightsError(f"{self.source}: unsupported persistent object {str(pid)[:80]!r}")
        storage_type, key, _location, numel = pid[1:5]
        if len(pid) == 6 and pid[5] is not None:
            raise WeightsError(f"{self.source}: storage views (pre-1.0 checkpoints) are not supported")
        if not isinstance(storage_type, _StorageType):
            raise WeightsError(f"{self.source}: storage {key} has no known element type")
        key = str(key)
        if key not in self.storages:
            self.storages[key] = _Storage(key, storage_type, int(numel))
        return self.storages[key]


def _materialise(obj):
    """Replace tensor references by numpy arrays throughout the unpickled object."""
    if isinstance(obj, _TensorRef):
        return obj.materialise()
    if isinstance(obj, dict):
        return type(obj)((k, _materialise(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialise(v) for v in obj)
    return obj


def _load_zip_pth(path: Path) -> object:
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise WeightsError(f"{path}: a zip .pth holds one data.pkl, found {len(pickles)}")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = prefix + "byteorder"
        if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
            raise WeightsError(f"{path}: big-endian checkpoints are not supported")
        storages: dict[str, _Storage] = {}
        obj = _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), str(path), storages).load()
        for key, storage in storages.items():
            member = f"{prefix}data/{key}"
            try:
                raw = archive.read(member)
            except KeyError:
                raise WeightsError(f"{path}: storage {key} is missing ({member})") from None
            storage.data = _storage_array(raw, storage, path)
    return obj


def _storage_array(raw: bytes, storage: _Storage, path: Path) -> np.ndarray:
    dtype = storage.storage_type.dtype
    if len(raw) != storage.numel * dtype.itemsize:
        raise WeightsError(
            f"{path}: storage {storage.key} has {len(raw)} bytes, expected {storage.numel} x {dtype.itemsize}"
        )
    return np.frombuffer(raw, dtype=dtype)


def _load_legacy_pth(path: Path) -> object:
    source = str(path)
    with open(path, "rb") as f:
        # The header pickles hold plain ints and a dict: no global is allowed to them either.
        header = _RestrictedUnpickler(f, source, {})
        try:
            magic = header.load()
        except (pickle.UnpicklingError, EOFError, ValueError) as exc:
            if isinstance(exc, WeightsError):
                raise
            raise WeightsError(f"{source}: not a PyTorch checkpoint ({exc})") from None
        if magic != LEGACY_MAGIC_NUMBER:
            raise WeightsError(f"{source}: not a PyTorch checkpoint (no zip archive, no legacy magic number)")
        version = header.load()
        if version != LEGACY_PROTOCOL_VERSION:
            raise WeightsError(f"{source}: unsupported legacy checkpoint protocol {version}")
        sys_info = header.load()
        if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
            raise WeightsError(f"{source}: big-endian checkpoints are not supported")
        storages: dict[str, _Storage] = {}
        obj = _RestrictedUnpickler(f, source, storages).load()
        keys = _RestrictedUnpickler(f, source, {}).load()
        if not isinstance(keys, list) or set(map(str, keys)) != set(storages):
            raise WeightsError(f"{source}: the storage list does not match the tensors in the file")
        for key in keys:
            storage = storages[str(key)]
            (numel,) = struct.unpack("<q", f.read(8))
            if numel != storage.numel:
                raise WeightsError(f"{source}: storage {key} holds {numel} elements, expected {storage.numel}")
            storage.data = _storage_array(f.read(numel * storage.storage_type.dtype.itemsize), storage, path)
    return obj


def _flat_state_dict(obj: object, source: str) -> dict[str, np.ndarray]:
    """The tensors of a state dict, unwrapping a training checkpoint {'state_dict': ...} and
    DataParallel's `module.` prefix."""
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "model"):
            if wrapper in obj and isinstance(obj[wrapper], dict):
                return _flat_state_dict(obj[wrapper], source)
    if not isinstance(obj, dict) or not obj:
        raise WeightsError(f"{source}: expected a state dict of tensors, found {type(obj).__name__}")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, np.ndarray)}
    if not tensors:
        raise WeightsError(f"{source}: the file holds no tensors")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


SAFETENSORS_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
    "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?",
}


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    raw = path.read_bytes()
    if len(raw) < 8:
        raise WeightsError(f"{path}: too short for a safetensors file")
    (header_len,) = struct.unpack("<Q", raw[:8])
    if header_len > len(raw) - 8:
        raise WeightsError(f"{path}: safetensors header length {header_len} runs past the file")
    try:
        header = json.loads(raw[8:8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{path}: safetensors header is not JSON ({exc})") from None
    body = memoryview(raw)[8 + header_len:]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise WeightsError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        array = np.frombuffer(body[begin:end], dtype=dtype)
        if array.size != int(np.prod(shape)) or end > len(body):
            raise WeightsError(f"{path}: tensor {name} data does not match its shape {shape}")
        array = array.reshape(shape).copy()
        if info["dtype"] == "BF16":
            array = bfloat16_to_float32(array)
        tensors[name] = array
    return tensors


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of a weights file by name, as numpy arrays.

    `.npz` and `.safetensors` by extension; anything else is read as a PyTorch checkpoint
    (zip or legacy format) through the restricted unpickler.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"no weights file {path}")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                return {name: archive[name] for name in archive.files}
        except ValueError as exc:
            raise WeightsError(f"{path}: cannot read as .npz ({exc})") from None
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    try:
        obj = _load_zip_pth(path) if zipfile.is_zipfile(path) else _load_legacy_pth(path)
    except (pickle.UnpicklingError, EOFError, struct.error, zipfile.BadZipFile, TypeError, ValueError) as exc:
        if isinstance(exc, WeightsError):
            raise
        raise WeightsError(f"{path}: damaged or truncated checkpoint ({type(exc).__name__}: {exc})") from None
    return _flat_state_dict(_materialise(obj), str(path))
