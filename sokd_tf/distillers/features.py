"""Feature terms of a distiller: stage layers, the pairing rule, hint regressors, taps.

A feature term `{learner}/{kind}_from_{target}` (kind "hint" = FitNet, "at" = attention
transfer; see `sokd_tf.losses.feature`) compares the learner role's stage features with
the target role's. Everything here is resolved at construction, outside the step:

- **Stage layers** per role: by default the role model's named groups `group1 .. groupN`
  (`default_feature_layers`); a distiller's `feature_layers` argument overrides them per
  role with any layer names of that model whose outputs are `[batch, h, w, c]` maps.
- **Pairing rule** (`pair_stages`): the deepest stages are paired, in order: with
  `n_learner` and `n_target` stage layers, the last `k = min(n_learner, n_target)` of each
  (or the last `max_pairs`, when smaller) pair up one to one. For WRN-16-2 -> WRN-10-1
  (3 groups each) that is group1-group1 .. group3-group3; a 4-stage teacher and a 3-stage
  student pair teacher stages 2..4 with student stages 1..3; a SOKD peer (only the
  teacher's last group) pairs with the student's last group.
- **Hint regressors**: for each hint pair whose channel counts differ, a 1x1 convolution
  (with bias) maps the learner's channels to the target's, as FitNet's regressor; equal
  channels need none. A regressor belongs to the learner's role: it is stepped with that
  role's learning rate and coupled L2 (`FeatureTerms.add_role_variables`), it is saved
  with the trainer (resume), and it is not part of any exported model.
- **Taps** (`tap_model`): a role's model with extra outputs at its stage layers, sharing
  its layers, so one forward pass gives logits and stage features.

A term is on when its weight is > 0; a term with weight 0 is neither computed nor logged.

Reference: Romero et al., "FitNets" (ICLR 2015); Zagoruyko & Komodakis, "Paying More
Attention to Attention" (ICLR 2017); Liu, Liu & Huang, "Semi-Online Knowledge
Distillation" (BMVC 2021), which extends SOKD to feature-based distillation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import keras

from sokd_tf import losses, models
from sokd_tf.errors import ConfigError
from sokd_tf.losses import feature as feature_losses


def default_feature_layers(model: keras.Model) -> list[str]:
    """The model's named stage groups `group1 .. groupN`, in forward order."""
    return [name for name in models.stage_names(model) if name.startswith("group")]


def pair_stages(learner_layers: Sequence[str], target_layers: Sequence[str],
                max_pairs: int | None = None) -> list[tuple[str, str]]:
    """Pairs the deepest stages one to one: `[(learner_layer, target_layer), ...]`.

    Args:
      learner_layers: the learner's stage layers, in forward order.
      target_layers: the target's stage layers, in forward order.
      max_pairs: use at most this many (the deepest); None = as many as possible.

    Returns:
      The last `k = min(len(learner_layers), len(target_layers), max_pairs)` of each list,
      zipped, shallowest pair first.
    """
    count = min(len(learner_layers), len(target_layers))
    if max_pairs is not None:
        count = min(count, int(max_pairs))
    if count <= 0:
        return []
    return list(zip(learner_layers[-count:], target_layers[-count:], strict=True))


def _map_shape(model: keras.Model, layer: str, role: str) -> tuple[int, int, int]:
    try:
        output = model.get_layer(layer).output
    except ValueError as error:
        raise ConfigError(
            f"feature layer {layer!r} is not a layer of the {role} model {model.name!r}"
        ) from error
    shape = tuple(output.shape)
    if len(shape) != 4 or None in shape[1:]:
        raise ConfigError(
            f"feature layer {layer!r} of the {role} model {model.name!r} must output a "
            f"[batch, height, width, channels] map of static size, got {shape}"
        )
    return shape[1:]


def tap_model(model: keras.Model, layers: Sequence[str], *, outputs=None,
              name: str | None = None) -> keras.Model:
    """`model` with its stage features as extra outputs (same layers, no extra compute).

    Args:
      model: functional model.
      layers: layer names whose outputs to expose.
      outputs: the model's own outputs to keep (default `model.output`); e.g. a teacher
        trunk's `[penultimate features, logits]`.
      name: model name.

    Returns:
      A functional model `inputs -> (outputs, {layer: [batch, h, w, c]})`; the dict is
      empty when `layers` is.
    """
    kept = model.output if outputs is None else outputs
    stages = {layer: model.get_layer(layer).output for layer in layers}
    return keras.Model(model.inputs[0], (kept, stages), name=name)


def _regressor(name: str, input_shape, channels: int) -> keras.layers.Conv2D:
    # PyTorch's default Conv2d weight init (uniform +-1/sqrt(fan_in)), as RepDistiller's
    # regressor uses; zero bias.
    layer = keras.layers.Conv2D(
        channels,
        1,
        kernel_initializer=keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform"),
        name=name,
    )
    layer.build((None, *input_shape))
    return layer


@dataclasses.dataclass(frozen=True)
class FeatureTerm:
    """One active feature term.

    Attributes:
      name: `{learner}/{kind}_from_{target}`.
      learner, kind, target: the parsed name.
      pairs: `(learner layer, target layer)` per paired stage, shallowest first.
      regressors: per pair, the hint's 1x1 regressor or None (AT, or equal channels).
    """

    name: str
    learner: str
    kind: str
    target: str
    pairs: tuple[tuple[str, str], ...]
    regressors: tuple[keras.layers.Layer | None, ...]


class FeatureTerms:
    """The active feature terms of one distiller, their layers and regressors.

    Args:
      weights: term name -> weight >= 0 (names from `allowed_terms`); terms with weight 0
        are dropped.
      role_models: role -> model, for every role a term names.
      allowed_terms: the feature term names this distiller supports.
      feature_layers: role -> stage layer names, forward order; roles absent use
        `default_feature_layers`.
      max_pairs: the deepest stage pairs each term uses; None = all (`pair_stages`).

    Raises:
      ConfigError: unknown term name, negative weight, unknown or non-map layer, no stage
        to pair, or a non-positive `max_pairs`.

    The regressors are Keras layers held in `regressors`; the owning `keras.Model` must
    keep that list as an attribute so Keras tracks (saves, restores) them.
    """

    def __init__(self, weights: Mapping[str, float], role_models: Mapping[str, keras.Model],
                 allowed_terms: Sequence[str],
                 feature_layers: Mapping[str, Sequence[str]] | None = None,
                 max_pairs: int | None = None):
        weights = {str(name): float(value) for name, value in dict(weights or {}).items()}
        unknown = sorted(set(weights) - set(allowed_terms))
        if unknown:
            raise ConfigError(
                f"unknown feature terms {unknown}; this method takes {list(allowed_terms)}"
            )
        negative = sorted(name for name, value in weights.items() if value < 0)
        if negative:
            raise ConfigError(f"feature weights must be >= 0, got negative weights for {negative}")
        if max_pairs is not None and int(max_pairs) < 1:
            raise ConfigError(f"feature_pairs must be >= 1 or None, got {max_pairs}")
        feature_layers = dict(feature_layers or {})
        unknown_roles = sorted(set(feature_layers) - set(role_models))
        if unknown_roles:
            raise ConfigError(
                f"feature_layers names roles {unknown_roles}; roles are {sorted(role_models)}"
            )
        self.feature_layers = (
            {role: list(layers) for role, layers in feature_layers.items()} or None
        )
        self.max_pairs = None if max_pairs is None else int(max_pairs)
        self.weights = {name: weights[name] for name in allowed_terms if weights.get(name, 0) > 0}
        self.stage_layers = {
            role: list(feature_layers.get(role) or default_feature_layers(model))
            for role, model in role_models.items()
        }
        self.terms = tuple(
            self._resolve(name, role_models, self.max_pairs) for name in self.weights
        )
        self.regressors = [r for term in self.terms for r in term.regressors if r is not None]

    def _resolve(self, name, role_models, max_pairs) -> FeatureTerm:
        learner, kind, target = losses.parse_feature_term(name)
        pairs = pair_stages(self.stage_layers[learner], self.stage_layers[target], max_pairs)
        if not pairs:
            raise ConfigError(
                f"feature term {name!r} has no stages to pair: {learner} layers "
                f"{self.stage_layers[learner]}, {target} layers {self.stage_layers[target]}"
            )
        regressors = []
        for learner_layer, target_layer in pairs:
            learner_shape = _map_shape(role_models[learner], learner_layer, learner)
            target_shape = _map_shape(role_models[target], target_layer, target)
            needs_regressor = kind == feature_losses.HINT and learner_shape[-1] != target_shape[-1]
            regressors.append(
                _regressor(
                    f"{learner}_{kind}_from_{target}_{learner_layer}_regressor",
                    learner_shape,
                    target_shape[-1],
                )
                if needs_regressor
                else None
            )
        return FeatureTerm(name, learner, kind, target, tuple(pairs), tuple(regressors))

    @property
    def names(self) -> tuple[str, ...]:
        """Names of the active terms."""
        return tuple(term.name for term in self.terms)

    def layers(self, role: str) -> list[str]:
        """The stage layers `role`'s tap model must expose (empty when no term uses it)."""
        needed = []
        for term in self.terms:
            for learner_layer, target_layer in term.pairs:
                if term.learner == role:
                    needed.append(learner_layer)
                if term.target == role:
                    needed.append(target_layer)
        return list(dict.fromkeys(needed))

    def add_role_variables(self, role_variables: Mapping[str, Sequence]) -> dict[str, list]:
        """`role_variables` with each regressor's variables added to its learner's role."""
        out = {role: list(variables) for role, variables in role_variables.items()}
        for term in self.terms:
            for regressor in term.regressors:
                if regressor is not None:
                    out[term.learner].extend(regressor.trainable_variables)
        return out

    def __call__(self, stages_by_role: Mapping[str, Mapping]) -> dict:
        """Per-example terms from the roles' stage features.

        Args:
          stages_by_role: role -> {layer name: `[batch, h, w, c]`}, as the tap models give.

        Returns:
          `{term name: [batch] float32}` for every active term (empty when none is on).
        """
        terms = {}
        for term in self.terms:
            targets, learners = [], []
            for (learner_layer, target_layer), regressor in zip(
                term.pairs, term.regressors, strict=True
            ):
                learner_features = stages_by_role[term.learner][learner_layer]
                if regressor is not None:
                    learner_features = regressor(learner_features)
                learners.append(learner_features)
                targets.append(stages_by_role[term.target][target_layer])
            terms[term.name] = losses.paired_feature_loss(term.kind, targets, learners)
        return terms

    def config(self) -> dict:
        """The distiller constructor arguments that rebuild these terms (JSON-able)."""
        return {
            "feature_weights": dict(self.weights),
            "feature_layers": self.feature_layers,
            "feature_pairs": self.max_pairs,
        }
