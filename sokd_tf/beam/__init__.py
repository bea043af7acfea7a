"""Apache Beam jobs: ExampleGen-layout TFRecords and batch prediction.

`make_tfrecords.run` (any data source -> GZIP tf.Example shards in TFX ExampleGen's
`Split-*/` layout) and `batch_predict.run` (RunInference of an exported student over
TFRecord globs -> JSON lines, with a dead-letter output). Both run on Beam's in-process
FnApiRunner unless pipeline options name another runner (Dataflow, Flink, Spark); see
docs/BATCH.md. Importing `sokd_tf` does not import Beam; importing this package does.
"""
