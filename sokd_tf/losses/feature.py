"""Feature-map terms: FitNet hints and attention transfer (AT, p = 2).

Pure functions of channels-last feature maps `[batch, height, width, channels]` with
per-example `[batch]` float32 outputs (features are cast, so mixed-precision models give
float32 losses). Argument order is target first, learner second; the target is
gradient-stopped inside each function.

Conventions (those of RepDistiller's `HintLoss` and `Attention`, so its weights carry over):

- **Hint** = mean over `height x width x channels` of `(target - learner)^2`; its batch mean
  is PyTorch's `nn.MSELoss()`. RepDistiller runs FitNet with weight (beta) 100 and a
  hint at the middle stage; the learner side first passes a learned regressor, which is
  not part of this loss (the distiller owns it and hands in regressed features).
- **AT** = mean over positions of `(a(target) - a(learner))^2`, with the attention map
  `a(f)` = channel mean of `f^2`, flattened and L2-normalised per example; its batch mean
  is RepDistiller's `(at(f_s) - at(f_t)).pow(2).mean()`. RepDistiller sums it over the
  stages and weights the sum by beta = 1000; the AT authors' code adds `beta / 2` times
  the same sum with beta = 1000, i.e. weight 500.

Spatial sizes (see `resize_features`): the hint resizes the learner map to the target's
size; AT brings both maps to the smaller size per axis (RepDistiller pools the larger map
to the smaller one), so it never upsamples.

Reference: Romero et al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015); Zagoruyko &
Komodakis, "Paying More Attention to Attention" (ICLR 2017), Sec. 3.1.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
from keras import ops

HINT = "hint"
ATTENTION = "at"
FEATURE_KINDS = (HINT, ATTENTION)

# `{learner role}/{kind}_from_{target role}`.
KD_FEATURE_TERMS = ("student/hint_from_teacher", "student/at_from_teacher")
SOKD_FEATURE_TERMS = (
    "peer/hint_from_teacher",
    "peer/at_from_teacher",
    "student/hint_from_peer",
    "student/at_from_peer",
)

_TERM_PATTERN = re.compile(r"^(\w+)/(" + "|".join(FEATURE_KINDS) + r")_from_(\w+)$")

_NORM_EPSILON = 1e-12  # PyTorch F.normalize's eps.


def feature_term_name(learner: str, kind: str, target: str) -> str:
    """`"student", "at", "peer"` -> `"student/at_from_peer"`."""
    return f"{learner}/{kind}_from_{target}"


def parse_feature_term(name: str) -> tuple[str, str, str] | None:
    """`"student/at_from_peer"` -> `("student", "at", "peer")`; None if not a feature term."""
    match = _TERM_PATTERN.match(name)
    return None if match is None else match.groups()


def _axis_matrix(source: int, target: int) -> np.ndarray:
    """`[target, source]` linear map resampling one spatial axis.

    Shrinking: adaptive average pooling (bin `i` averages source cells
    `floor(i * s / t) .. ceil((i + 1) * s / t) - 1`). Enlarging: linear interpolation with
    half-pixel centres, edges clamped.
    """
    matrix = np.zeros((target, source), np.float32)
    if target <= source:
        for i in range(target):
            start = (i * source) // target
            end = -((-(i + 1) * source) // target)
            matrix[i, start:end] = 1.0 / (end - start)
        return matrix
    for i in range(target):
        position = max((i + 0.5) * source / target - 0.5, 0.0)
        low = min(math.floor(position), source - 1)
        high = min(low + 1, source - 1)
        fraction = position - low
        matrix[i, low] += 1.0 - fraction
        matrix[i, high] += fraction
    return matrix


def _spatial_size(features) -> tuple:
    return tuple(features.shape[1:3])


def resize_features(features, size: Sequence[int]):
    """Resamples feature maps to `size = (height, width)`, each axis on its own.

    An axis that shrinks is average-pooled adaptively, exactly PyTorch's
    `F.adaptive_avg_pool2d` (for an integer ratio: plain average pooling, also
    `tf.image.resize(method="area")`, which has no gradient). An axis that grows is
    interpolated linearly with half-pixel centres, exactly
    `tf.image.resize(method="bilinear")` and PyTorch's `align_corners=False`. Both are
    linear in the input, so a 1x1 convolution commutes with the resize.

    Example (a 2x2 map averaged to 1x1; a 1x2 row interpolated to 1x4 at source
    positions -.25 (clamped to 0), .25, .75 and 1.25 (clamped to 1)):

    >>> import numpy as np
    >>> square = np.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 2, 2, 1)
    >>> print(np.asarray(resize_features(square, (1, 1))).ravel())
    [2.5]
    >>> row = np.array([0.0, 4.0]).reshape(1, 1, 2, 1)
    >>> print(np.asarray(resize_features(row, (1, 4))).ravel())
    [0. 1. 3. 4.]

    Args:
      features: `[batch, h, w, channels]` with static `h`, `w`.
      size: target `(height, width)`.

    Returns:
      `[batch, height, width, channels]` float32.

    Raises:
      ValueError: the spatial size of `features` is not static.
    """
    features = ops.cast(features, "float32")
    source = _spatial_size(features)
    size = tuple(int(s) for s in size)
    if source == size:
        return features
    if None in source:
        raise ValueError(
            f"resizing feature maps needs static spatial sizes, got {source} -> {size}"
        )
    rows = ops.convert_to_tensor(_axis_matrix(source[0], size[0]))
    columns = ops.convert_to_tensor(_axis_matrix(source[1], size[1]))
    features = ops.einsum("ih,bhwc->biwc", rows, features)
    return ops.einsum("jw,biwc->bijc", columns, features)


def hint_loss(target_features, learner_features):
    """FitNet hint: mean squared error per example; target gradient-stopped.

    When the spatial sizes differ, the learner map is resized to the target's
    (`resize_features`). Channels must already match: a learner with other channel
    counts goes through a learned 1x1 regressor first (owned by the distiller).

    Example (2x2x1 maps; differences 1, 0, 0, -2, so (1 + 0 + 0 + 4) / 4):

    >>> import numpy as np
    >>> target = np.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 2, 2, 1)
    >>> learner = np.array([0.0, 2.0, 3.0, 6.0]).reshape(1, 2, 2, 1)
    >>> print(np.asarray(hint_loss(target, learner)))
    [1.25]

    Args:
      target_features: `[batch, H, W, C]`, the features to imitate.
      learner_features: `[batch, h, w, C]`, the (regressed) features being trained.

    Returns:
      `[batch]` float32.

    Raises:
      ValueError: the channel counts differ.
    """
    target = ops.stop_gradient(ops.cast(target_features, "float32"))
    learner = ops.cast(learner_features, "float32")
    if target.shape[-1] != learner.shape[-1]:
        raise ValueError(
            f"hint_loss needs equal channel counts (regress the learner first), got "
            f"target {target.shape[-1]} and learner {learner.shape[-1]}"
        )
    learner = resize_features(learner, _spatial_size(target))
    return ops.mean(ops.square(target - learner), axis=(1, 2, 3))


def attention_map(features):
    """AT's spatial attention map (p = 2): channel mean of `f^2`, flattened, L2-normalised.

    Example (a 2x2x2 map whose one active position has channels 3 and 4: channel
    means of squares `[12.5, 0, 0, 0]`, normalised):

    >>> import numpy as np
    >>> features = np.zeros((1, 2, 2, 2))
    >>> features[0, 0, 0] = [3.0, 4.0]
    >>> print(np.asarray(attention_map(features)))
    [[1. 0. 0. 0.]]

    Args:
      features: `[batch, h, w, channels]`.

    Returns:
      `[batch, h * w]` float32, each row of unit norm (an all-zero map stays zero).
    """
    features = ops.cast(features, "float32")
    energy = ops.mean(ops.square(features), axis=-1)
    energy = ops.reshape(energy, (ops.shape(energy)[0], -1))
    norm = ops.sqrt(ops.sum(ops.square(energy), axis=-1, keepdims=True))
    return energy / ops.maximum(norm, _NORM_EPSILON)


def attention_loss(target_features, learner_features):
    """Attention transfer (p = 2): mean over positions of the squared map difference.

    Channel counts may differ (the map averages over channels). When the spatial sizes
    differ, both feature maps are first brought to the smaller size per axis by adaptive
    average pooling (`resize_features`), then mapped. Target gradient-stopped.

    Example (2x2x1 maps): target all ones, `a_t = [.5, .5, .5, .5]`; learner with its
    top row ones and bottom row zeros, `a_l = [1, 1, 0, 0] / sqrt(2)`;
    `||a_t - a_l||^2 = 2 - 2 cos(a_t, a_l) = 2 - sqrt(2)`, over 4 positions
    `(2 - sqrt(2)) / 4 = 0.1464466`:

    >>> import numpy as np
    >>> target = np.ones((1, 2, 2, 1))
    >>> learner = np.array([1.0, 1.0, 0.0, 0.0]).reshape(1, 2, 2, 1)
    >>> print(np.round(np.asarray(attention_loss(target, learner)), 7))
    [0.1464466]

    Args:
      target_features: `[batch, H, W, C_target]`.
      learner_features: `[batch, h, w, C_learner]`.

    Returns:
      `[batch]` float32.
    """
    target = ops.stop_gradient(ops.cast(target_features, "float32"))
    learner = ops.cast(learner_features, "float32")
    target_size, learner_size = _spatial_size(target), _spatial_size(learner)
    if target_size != learner_size:
        if None in target_size + learner_size:
            raise ValueError(
                f"attention_loss needs static spatial sizes to resize, got target "
                f"{target_size} and learner {learner_size}"
            )
        size = tuple(min(t, s) for t, s in zip(target_size, learner_size, strict=True))
        target = resize_features(target, size)
        learner = resize_features(learner, size)
    difference = attention_map(target) - attention_map(learner)
    return ops.mean(ops.square(difference), axis=-1)


FEATURE_LOSSES = {HINT: hint_loss, ATTENTION: attention_loss}


def paired_feature_loss(kind: str, target_features: Sequence, learner_features: Sequence):
    """One feature term: `FEATURE_LOSSES[kind]` summed over paired stages.

    The sum over stages is RepDistiller's `sum(criterion(g_s, g_t))`.

    Args:
      kind: "hint" or "at".
      target_features: one `[batch, H, W, C]` map per pair.
      learner_features: one `[batch, h, w, c]` map per pair, in the same order (for
        "hint": already regressed to the target's channels).

    Returns:
      `[batch]` float32.

    Raises:
      ValueError: unknown kind, or no pair / unequal numbers of maps.
    """
    if kind not in FEATURE_LOSSES:
        raise ValueError(f"feature kind must be one of {list(FEATURE_LOSSES)}, got {kind!r}")
    if not target_features or len(target_features) != len(learner_features):
        raise ValueError(
            f"need one learner map per target map (at least one), got "
            f"{len(target_features)} target and {len(learner_features)} learner maps"
        )
    loss = FEATURE_LOSSES[kind]
    total = loss(target_features[0], learner_features[0])
    for target, learner in zip(target_features[1:], learner_features[1:], strict=True):
        total = total + loss(target, learner)
    return total
