"""Checked access to a state dict while building a graph: every tensor is looked up by name with
its expected shape, and tensors the architecture does not use are reported, so a checkpoint for
another architecture fails with a clear message instead of producing a wrong model."""

from __future__ import annotations

import numpy as np

from pipeline.weights import WeightsError

# Batch norm bookkeeping that inference does not need.
IGNORED_SUFFIXES = (".num_batches_tracked",)


class StateDict:
    def __init__(self, tensors: dict[str, np.ndarray], source: str):
        self.tensors = tensors
        self.source = source
        self.used: set[str] = set()

    def tensor(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.tensors:
            raise WeightsError(f"{self.source}: missing tensor {name} (is this the right architecture?)")
        value = self.tensors[name]
        if tuple(value.shape) != tuple(shape):
            raise WeightsError(f"{self.source}: tensor {name} has shape {tuple(value.shape)}, expected {shape}")
        self.used.add(name)
        return value.astype(np.float32)

    def batch_norm(self, prefix: str, channels: int) -> dict[str, np.ndarray]:
        return {k: self.tensor(f"{prefix}.{k}", (channels,)) for k in ("weight", "bias", "running_mean", "running_var")}

    def check_all_used(self) -> None:
        unused = sorted(k for k in self.tensors if k not in self.used and not k.endswith(IGNORED_SUFFIXES))
        if unused:
            raise WeightsError(
                f"{self.source}: {len(unused)} tensors are not part of this architecture, e.g. {unused[:3]}"
            )
