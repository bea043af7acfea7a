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

from pipelines import common

common.define_config_flags(sections=("data",), default_preset="quickstart")
common.define_tfrecord_flags(out_dir_help="Output directory (local or gs://...).", other_split="eval")
flags.adopt_module_key_flags(common)
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


def main(argv=None):
    common.main(body, argv, module=__name__, config=common.config_from_flags, pipeline_args=True)


if __name__ == "__main__":
    main()
