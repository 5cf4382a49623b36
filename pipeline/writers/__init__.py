"""What `pipeline prepare` writes from an image folder: Parquet shards (`parquet`) or an LMDB database
of Caffe or Caffe2 records (`lmdb`), read back by `pipeline.sources`."""
