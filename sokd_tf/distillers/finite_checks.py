"""The in-step divergence check: which named loss terms and gradient norms went non-finite.

A training step adds, for every check, 0 when its value is finite and the value itself
(nan or ±inf) when it is not, to one sticky float32 vector. The vector therefore stays
exactly 0 while training is healthy and names the offending check from the first bad
step on, without a host round trip inside the step; `stages.divergence.DivergenceCheck`
reads it after every batch. It is a Keras metric only for its variable handling (created
in the strategy's scope, `ON_READ` with SUM across replicas, so a read is the union over
every replica); it is not in the distiller's `metrics`, so it is never logged and never
reset by Keras between epochs or by evaluation.

Reference: docs/SCALING.md, "Divergence check".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import keras
from keras import ops


def gradient_norm_name(role: str) -> str:
    """The check name of a role's gradient norm, e.g. `student/gradient_norm`."""
    return f"{role}/gradient_norm"


class FiniteChecks(keras.metrics.Metric):
    """Sticky record of non-finite loss terms and gradient norms since the last reset.

    Args:
      term_names: the distiller's named per-example terms, in order.
      roles: the trained roles; each gets a `{role}/gradient_norm` check after the terms.
      name: metric name.
    """

    def __init__(self, term_names: Sequence[str], roles: Sequence[str], name="finite_checks"):
        super().__init__(name=name, dtype="float32")
        self.term_names = tuple(term_names)
        self.roles = tuple(roles)
        self.names = (*self.term_names, *(gradient_norm_name(role) for role in self.roles))
        self.values = self.add_variable(
            shape=(len(self.names),), initializer="zeros", dtype="float32", name="values"
        )

    def update_state(self, terms: Mapping, gradient_norms: Mapping | None = None):
        """Records one step.

        Args:
          terms: name -> per-example values `[batch]`; checked through their batch mean.
          gradient_norms: role -> scalar global norm of the role's applied gradient;
            roles left out (all of them under loss scaling) count as finite.
        """
        gradient_norms = gradient_norms or {}
        checked = [ops.mean(ops.cast(terms[name], "float32")) for name in self.term_names]
        for role in self.roles:
            norm = gradient_norms.get(role)
            checked.append(ops.zeros((), "float32") if norm is None else ops.cast(norm, "float32"))
        vector = ops.stack(checked)
        self.values.assign_add(ops.where(ops.isfinite(vector), ops.zeros_like(vector), vector))

    def result(self):
        return ops.convert_to_tensor(self.values)
