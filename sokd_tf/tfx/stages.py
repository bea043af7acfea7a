"""The library's training stages, as the TFX Trainer module calls them.

The one place the module imports them from, so a move of the stages is one import to
update here.
"""

from sokd_tf.training import distill, train_teacher
from sokd_tf.workflow import prepare_workdir

__all__ = ["distill", "prepare_workdir", "train_teacher"]
