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
from sokd_tf.data.tfrecord import IMAGE_FORMATS, IMAGE_KEY, LABEL_KEY

common.define_config_flags(sections=("data",), default_preset="quickstart")
flags.adopt_module_key_flags(common)
flags.DEFINE_string("out_dir", None, "Output directory of the TFRecord shards.", required=True)
flags.DEFINE_integer("num_shards", 8, "Shards of the train split (test: proportional).",
                     lower_bound=1)
flags.DEFINE_enum("image_format", "png", list(IMAGE_FORMATS),
                  "Encoding of image/encoded: png (lossless) or jpeg (quality 95).")
flags.DEFINE_string("image_key", IMAGE_KEY, "tf.Example feature of the encoded image.")
flags.DEFINE_string("label_key", LABEL_KEY, "tf.Example feature of the int64 label.")
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
