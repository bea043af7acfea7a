"""Entry points of sokd_tf: the `sokd-tf` command (`pipelines.cli`) and one module per stage.

Importing this package first gives every entry point a quiet start (`pipelines.startup`):
TensorFlow is imported here, before any entry point imports the library.
"""

from pipelines import startup

startup.quiet_tensorflow()
