"""User metrics of `Distiller.compile(metrics=...)`, one copy per trained role.

A trainer updates several networks at once (SOKD and DML: peer and student), so a metric
given to `compile` is tracked once per trained role, on that role's logits, and named
`{role}/{metric name}` like the built-in `{role}/top1`.

Reference: docs/DESIGN.md, "Distillers".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import keras

from sokd_tf.errors import ConfigError

# Keras resolves these strings by the label format; our labels are integer class ids
# and every model outputs logits.
_SPARSE_STRINGS = {
    "accuracy": lambda name: keras.metrics.SparseCategoricalAccuracy(name=name),
    "acc": lambda name: keras.metrics.SparseCategoricalAccuracy(name=name),
    "crossentropy": lambda name: keras.metrics.SparseCategoricalCrossentropy(
        name=name, from_logits=True),
}


def _metric_for_role(spec, role: str, argument: str) -> keras.metrics.Metric:
    """A fresh metric named `{role}/{name}` built from a user's metric spec."""
    if isinstance(spec, str):
        if spec in _SPARSE_STRINGS:
            return _SPARSE_STRINGS[spec](f"{role}/{spec}")
        try:
            spec = keras.metrics.get(spec)
        except ValueError as err:
            raise ConfigError(f"compile({argument}=...): unknown metric {spec!r}") from err
    if isinstance(spec, keras.metrics.Metric):
        config = dict(spec.get_config(), name=f"{role}/{spec.name}")
        try:
            return type(spec).from_config(config)
        except Exception as err:  # a custom metric whose config does not rebuild it
            raise ConfigError(
                f"compile({argument}=...): metric {spec.name!r} ({type(spec).__name__}) "
                "cannot be copied once per role from its get_config(); give it a "
                "get_config/from_config pair that rebuilds it"
            ) from err
    if callable(spec):
        name = getattr(spec, "__name__", type(spec).__name__)
        return keras.metrics.MeanMetricWrapper(spec, name=f"{role}/{name}")
    raise ConfigError(
        f"compile({argument}=...): expected metric objects, metric names or functions "
        f"(labels, logits) -> values; got {spec!r}"
    )


def role_metrics(specs, roles: Sequence[str], argument: str = "metrics") -> dict:
    """Per-role metric objects for the `metrics=`/`weighted_metrics=` of `compile`.

    Args:
      specs: None; a list of metrics (each tracked for every role in `roles`); or a dict
        `{role: metric or list of metrics}` for chosen roles. A metric is a
        `keras.metrics.Metric` (used as a template: each role gets its own copy), a
        Keras metric name (`"accuracy"` means `SparseCategoricalAccuracy`), or a
        function `(labels [batch], logits [batch, num_classes]) -> [batch]`.
      roles: the trainer's trained roles.
      argument: the `compile` argument, for error messages.

    Returns:
      `{role: [keras.metrics.Metric, ...]}` for every role in `roles` (possibly empty).

    Raises:
      ConfigError: a role that is not trained, or a value that is not a metric.
    """
    chosen = {role: [] for role in roles}
    if specs is None:
        return chosen
    if isinstance(specs, Mapping):
        unknown = sorted(set(specs) - set(roles))
        if unknown:
            raise ConfigError(
                f"compile({argument}=...): no trained role {unknown}; this trainer trains "
                f"{list(roles)}"
            )
        by_role = {role: specs.get(role, ()) for role in roles}
    elif isinstance(specs, (list, tuple)):
        by_role = {role: specs for role in roles}
    else:
        raise ConfigError(
            f"compile({argument}=...) takes a list of metrics or a dict role -> metrics, "
            f"got {type(specs).__name__}"
        )
    for role, role_specs in by_role.items():
        if not isinstance(role_specs, (list, tuple)):
            role_specs = [role_specs]
        chosen[role] = [_metric_for_role(spec, role, argument) for spec in role_specs]
    return chosen
