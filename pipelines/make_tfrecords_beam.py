"""Any data source -> GZIP TFRecords in TFX ExampleGen's layout, as an Apache Beam job.

    python -m pipelines.make_tfrecords_beam --out_dir=data/fmnist_examplegen
    python -m pipelines.make_tfrecords_beam --source=image_folder --data_dir=gs://b/images \
        --dataset=my_images --out_dir=gs://b/examples --num_shards=64 \
        --runner=DataflowRunner --project=P --region=R --temp_location=gs://b/tmp

Writes out_dir/Split-train/, out_dir/Split-eval/ (data_tfrecord-XXXXX-of-YYYYY.gz) and
dataset_info.json; read back with --source=tfrecord --data_dir=OUT_DIR or by a TFX
Trainer. Unknown flags are Beam pipeline options; without --runner the job runs on
Beam's in-process FnApiRunner. See docs/BATCH.md.
"""

from absl import flags

from pipelines import beam_args, common
from sokd_tf.data.tfrecord import IMAGE_FORMATS, IMAGE_KEY, LABEL_KEY

common.define_config_flags(default_preset="quickstart")
flags.DEFINE_string("out_dir", None, "Output directory (local or gs://...).", required=True)
flags.DEFINE_integer("num_shards", 8, "Shards of the train split (eval: proportional).",
                     lower_bound=1)
flags.DEFINE_enum("image_format", "png", list(IMAGE_FORMATS),
                  "Encoding of image/encoded: png (lossless) or jpeg (quality 95).")
flags.DEFINE_string("image_key", IMAGE_KEY, "tf.Example feature of the encoded image.")
flags.DEFINE_string("label_key", LABEL_KEY, "tf.Example feature of the int64 label.")
FLAGS = flags.FLAGS


def body(pipeline_args):
    from sokd_tf.beam import make_tfrecords
    from sokd_tf.beam.options import format_counters

    written = make_tfrecords.run(
        common.config_from_flags().data, FLAGS.out_dir, num_shards=FLAGS.num_shards,
        image_format=FLAGS.image_format, image_key=FLAGS.image_key,
        label_key=FLAGS.label_key, beam_args=pipeline_args)
    for split in make_tfrecords.OUTPUT_SPLITS.values():
        print(f"Split-{split}: {len(written[split])} file(s) in {FLAGS.out_dir}")
    print(format_counters("make_tfrecords", written["counters"]))


if __name__ == "__main__":
    beam_args.run(body)
