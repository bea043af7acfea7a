"""Image-classification data: sources, the tf.data pipeline and the TFRecord converter.

`load_dataset(DataConfig) -> ImageDataset` is the entry point; see `pipeline.py`.
Sources (one module each): `fashion_mnist` (IDX files, offline default), `tfds_source`,
`tfrecord` (reader and writer), `image_folder`.
"""

from sokd_tf.data.convert import convert_to_tfrecords
from sokd_tf.data.info import DatasetInfo
from sokd_tf.data.inputs import model_inputs, normalize
from sokd_tf.data.pipeline import ImageDataset, load_dataset
from sokd_tf.data.records import data_errors
from sokd_tf.data.tfrecord import write_dataset_info, write_tfrecords

__all__ = [
    "DatasetInfo",
    "ImageDataset",
    "convert_to_tfrecords",
    "data_errors",
    "load_dataset",
    "model_inputs",
    "normalize",
    "write_dataset_info",
    "write_tfrecords",
]
