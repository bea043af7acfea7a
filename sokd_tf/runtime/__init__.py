"""tf.distribute without the job: strategies and precision (`strategy`), chief and
workers (`cluster`), resume backups (`backup`), and training/evaluation under any
strategy (`loop`, whose `resumable_fit` is the one call the stages make).

Reference: docs/SCALING.md.
"""
