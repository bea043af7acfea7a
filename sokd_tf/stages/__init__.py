"""The stages of a run, one module each, talking only through the run's workdir.

`teacher` (train or load the teacher), `distill` (train the student with a method),
`evaluate` (every saved model on the test split), `export` (TF Serving + LiteRT),
`report` (report.md + plots), `run` (all of them, resumable); `fit` is the resumable fit
harness the two training stages share, `workdir` every file name and the atomic write.

This package's `__init__` imports nothing, so `sokd_tf.stages.workdir` is a light import.
"""
