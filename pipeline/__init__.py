"""Evaluate and run int8 ONNX ImageNet classifiers with Ray Data."""

__version__ = "0.1.0"
