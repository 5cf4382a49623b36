"""Input sources. Each input format is one module that turns a path into a Ray Dataset of
source rows; `read_source` picks the module by `--format` or by looking at the path.

Source rows (the contract every reader follows, one Arrow schema per dataset):

- ``key``    string: the record's identity (file name, path inside an archive, LMDB key).
- ``label``  int64: class index 0..999 in ILSVRC2012 order, ``NO_LABEL`` (-1) when the source has none.
- ``image``  binary: the encoded image (JPEG, PNG, ...) exactly as stored, or raw pixels when
             ``raw_height`` > 0.
- ``error``  string: "" for a good record; otherwise why the record could not be read. Such a row is
             carried to the output as an error row, never dropped.

Optional columns a reader may add (all or none, for every row):

- ``raw_height``, ``raw_width``, ``raw_channels`` int32: when > 0, ``image`` holds uint8 pixels in
  HWC order, RGB for 3 channels, greyscale for 1.
- ``bbox_ymin``, ``bbox_xmin``, ``bbox_height``, ``bbox_width`` int32: crop to this box before
  scaling (Caffe2 TensorProtos records); all 0 means no box.
"""

from __future__ import annotations

NO_LABEL = -1
SOURCE_COLUMNS = ("key", "label", "image", "error")
RAW_COLUMNS = ("raw_height", "raw_width", "raw_channels")
BBOX_COLUMNS = ("bbox_ymin", "bbox_xmin", "bbox_height", "bbox_width")
