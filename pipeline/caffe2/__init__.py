"""Caffe2 int8 predictors (init_net + predict_net) into int8 ONNX: `pipeline model import-caffe2`.

- `caffe2.proto`: the subset of Caffe2's schema a predictor uses; `proto` builds its message
  classes at run time and reads/writes `.pb` and `.pbtxt` NetDefs.
- `importer`: the graph conversion; `command`: the CLI command.
- `netbuilder` and `synthetic`: write Caffe2 nets from Python (tests, generated ResNet-50).
"""
