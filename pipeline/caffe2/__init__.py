"""Caffe2 int8 predictors (init_net + predict_net) into int8 ONNX: `pipeline model import-caffe2`.

- `proto`: reads and writes `.pb` and `.pbtxt` NetDefs, whose message classes `pipeline.proto`
  builds at run time from pipeline/proto/caffe2.proto (the subset of Caffe2's schema used here).
- `importer`: the graph conversion; `command`: the CLI command.
- `netbuilder`: writes Caffe2 nets from Python (tests, and the generated ResNet-50 of
  `testkit.caffe2_synthetic`).
"""
