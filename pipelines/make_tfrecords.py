"""Converts any data source into sharded TFRecords of tf.Example (+ dataset_info.json).

    sokd-tf make-tfrecords --out_dir=data/fashion_mnist_tfrecord
    sokd-tf make-tfrecords --source=image_folder --data_dir=my_images \
        --dataset=my_images --out_dir=data/my_images_tfrecord --num_shards=16

The source is chosen with the data flags (--preset, --config, --source, --dataset,
--data_dir; default: the quickstart preset's Fashion-MNIST). The output is read back
with --source=tfrecord --data_dir=OUT_DIR and is the tf.Example data of the TF Serving
`predict_examples` signature.
"""

from absl import flags

from pipelines import common
from sokd_tf.data import convert_to_tfrecords

common.define_config_flags(sections=("data",), default_preset="quickstart")
common.define_tfrecord_flags(out_dir_help="Output directory of the TFRecord shards.", other_split="test")
flags.adopt_module_key_flags(common)
FLAGS = flags.FLAGS


def body():
    data_config = common.config_from_flags().data
    written = convert_to_tfrecords(
        data_config, FLAGS.out_dir, num_shards=FLAGS.num_shards,
        image_format=FLAGS.image_format, image_key=FLAGS.image_key, label_key=FLAGS.label_key)
    for split, paths in written.items():
        print(f"{split}: {len(paths)} file(s) in {FLAGS.out_dir}")


def main(argv=None):
    common.main(body, argv, module=__name__)


if __name__ == "__main__":
    main()
