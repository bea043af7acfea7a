"""sokd_tf: Semi-Online Knowledge Distillation (Liu, Liu & Huang, BMVC 2021) for Keras 3.

`import sokd_tf` registers the package's own Keras objects (its layers, the trainers, the
optimizer and its schedule), so every `.keras` file sokd_tf writes (a teacher, peer or
student model, or a whole trainer) loads with plain `keras.saving.load_model` (safe mode
on).

Reference: arXiv 2111.11747; docs/METHOD.md.
"""

import sys

__version__ = "0.2.0.dev0"


def _located_by_python_m() -> bool:
    """True while `python -m sokd_tf ...` imports this package to find its `__main__`.

    Python sets `sys.argv[0]` to "-m" while it locates the module (documented for `-m`).
    """
    argv = getattr(sys, "orig_argv", [])
    return (sys.argv[:1] == ["-m"] and "-m" in argv
            and argv[argv.index("-m") + 1: argv.index("-m") + 2] == ["sokd_tf"])


# The command (`sokd_tf/__main__.py` -> `pipelines.cli`) hides TensorFlow's start-up lines,
# which must happen before TensorFlow is first imported; it registers the layers and
# trainers through its own imports of `sokd_tf.models` and `sokd_tf.distillers`.
if not _located_by_python_m():
    from sokd_tf import distillers as _distillers  # noqa: F401
    from sokd_tf.models import fused_batch_norm as _fused_batch_norm  # noqa: F401
