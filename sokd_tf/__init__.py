"""sokd_tf: Semi-Online Knowledge Distillation (Liu, Liu & Huang, BMVC 2021) for Keras 3.

`import sokd_tf` registers the package's own Keras objects (its layers, the trainers, the
optimizer and its schedule), so every `.keras` file sokd_tf writes (a teacher, peer or
student model, or a whole trainer) loads with plain `keras.saving.load_model` (safe mode
on).

Reference: arXiv 2111.11747; docs/METHOD.md.
"""

__version__ = "0.2.0.dev0"

from sokd_tf import distillers as _distillers  # noqa: E402,F401
from sokd_tf.models import fused_batch_norm as _fused_batch_norm  # noqa: E402,F401
