"""Batch prediction with an exported student on Apache Beam (RunInference).

    python -m pipelines.batch_predict \
        --saved_model=workdir/quickstart/export/serving/student/1 \
        --input='data/fmnist_examplegen/Split-eval/*' --output=predictions/
    # on Dataflow: add --runner=DataflowRunner --project=P --region=R \
    #   --temp_location=gs://b/tmp (and gs:// paths); see docs/BATCH.md

Writes OUTPUT/predictions-*.jsonl ({"key", "class", "class_name", "probabilities"}) and
OUTPUT/dead_letter-*.jsonl ({"key", "reason", "record_base64"}: records that could not be
read, parsed or decoded), then prints the job's counters. Unknown flags are Beam pipeline
options; without --runner the job runs on Beam's in-process FnApiRunner.
"""

from absl import flags

from pipelines import beam_args
from sokd_tf.data.tfrecord import IMAGE_KEY

flags.DEFINE_string("saved_model", None, "Student SavedModel version directory.",
                    required=True)
flags.DEFINE_string("input", None, "TFRecord glob(s) of tf.Examples, comma-separated "
                    "(.gz files are read as GZIP).", required=True)
flags.DEFINE_string("output", None, "Output directory of the JSON-lines files.",
                    required=True)
flags.DEFINE_string("image_key", IMAGE_KEY, "tf.Example feature holding the encoded image.")
flags.DEFINE_string("key_feature", None,
                    "Feature whose value keys each prediction (default: <file>:<index>).")
flags.DEFINE_integer("batch_size", None, "Largest inference batch (default: adaptive).",
                     lower_bound=1)
FLAGS = flags.FLAGS


def body(pipeline_args):
    from sokd_tf.beam import batch_predict
    from sokd_tf.beam.options import format_counters

    written = batch_predict.run(
        FLAGS.saved_model, FLAGS.input, FLAGS.output, image_key=FLAGS.image_key,
        key_feature=FLAGS.key_feature, batch_size=FLAGS.batch_size, beam_args=pipeline_args)
    print(f"predictions: {', '.join(written['predictions'])}")
    print(f"dead letters: {', '.join(written['dead_letter'])}")
    print(format_counters("batch_predict", written["counters"]))


if __name__ == "__main__":
    beam_args.run(body)
