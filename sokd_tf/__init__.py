"""sokd_tf: Semi-Online Knowledge Distillation (Liu, Liu & Huang, BMVC 2021) for Keras 3.

Reference: arXiv 2111.11747.
"""

__version__ = "0.1.0"
