"""The official optimisation recipe: PyTorch-style SGD, per-role rates, coupled L2.

The authors train with `torch.optim.SGD(momentum=0.9, weight_decay=5e-4)` over two
parameter groups (peer, student) and an epoch-wise step schedule. Three details differ
from Keras' defaults and are reproduced here:

1. **Momentum form.** PyTorch keeps `b = momentum * b + g` and steps `w -= lr * b`;
   Keras' SGD folds the rate into the buffer (`m = momentum * m - lr * g`). They agree
   while the rate is constant and differ for a few dozen steps after each decay;
   `PyTorchSGD` uses PyTorch's form.
2. **Coupled L2.** `wd * w` is added to the gradient before momentum, on every trained
   variable (BN gamma/beta and biases included). Keras' `weight_decay=` is decoupled.
3. **Per-role learning rates.** With momentum SGD, scaling a role's gradient (L2 term
   included) by `lr_role / lr_base` is exactly a per-role learning rate, so one optimizer
   with one schedule serves all roles (and checkpoints as one object).

Points 2 and 3 act on gradients, before `apply_gradients`, in `apply_role_gradients`;
the optimizer carries their hyperparameters so the distillers need no extra arguments.

Reference: docs/METHOD.md, "Optimisation".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import keras
import tensorflow as tf
from keras import ops

from sokd_tf.config import TrainConfig
from sokd_tf.errors import ConfigError


@keras.saving.register_keras_serializable(package="sokd_tf")
class EpochStepDecay(keras.optimizers.schedules.LearningRateSchedule):
    """`initial_learning_rate * decay_factor ** (number of decay epochs <= epoch)`.

    The epoch of optimizer step `s` (0-based, the value of `optimizer.iterations` when the
    step runs) is `s // steps_per_epoch`; the first step of epoch `e` in `decay_epochs`
    already uses the decayed rate (PyTorch `MultiStepLR` stepped once per epoch).

    Args:
      initial_learning_rate: rate of epoch 0.
      steps_per_epoch: optimizer steps per epoch.
      decay_epochs: 0-based epochs at which the rate is multiplied by `decay_factor`.
      decay_factor: multiplier per decay.
    """

    def __init__(self, initial_learning_rate: float, steps_per_epoch: int,
                 decay_epochs: Sequence[int] = (), decay_factor: float = 0.1):
        if steps_per_epoch < 1:
            raise ConfigError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.initial_learning_rate = float(initial_learning_rate)
        self.steps_per_epoch = int(steps_per_epoch)
        self.decay_epochs = tuple(int(e) for e in decay_epochs)
        self.decay_factor = float(decay_factor)

    def __call__(self, step):
        epoch = ops.floor_divide(ops.cast(step, "int64"), self.steps_per_epoch)
        decays = ops.zeros((), "float32")
        for decay_epoch in self.decay_epochs:
            decays = decays + ops.cast(ops.greater_equal(epoch, decay_epoch), "float32")
        return self.initial_learning_rate * ops.power(self.decay_factor, decays)

    def get_config(self):
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "steps_per_epoch": self.steps_per_epoch,
            "decay_epochs": list(self.decay_epochs),
            "decay_factor": self.decay_factor,
        }


@keras.saving.register_keras_serializable(package="sokd_tf")
class PyTorchSGD(keras.optimizers.SGD):
    """SGD with PyTorch's momentum form, carrying the recipe's L2 and per-role rates.

    Update per variable: `b = momentum * b + g`; `w -= lr * b` (Nesterov:
    `w -= lr * (g + momentum * b)`), with `g` the gradient handed to
    `apply_gradients`. `coupled_weight_decay` and `role_learning_rate_scales` are read by
    `apply_role_gradients`, which folds them into `g` (so a plain `apply_gradients` call
    behaves exactly like `torch.optim.SGD(weight_decay=0)`).

    Args:
      learning_rate: base rate or schedule (the rate of the role with scale 1).
      momentum: momentum factor.
      nesterov: Nesterov momentum.
      coupled_weight_decay: L2 factor wd; `wd * w` joins each gradient before momentum.
      role_learning_rate_scales: role -> lr_role / lr_base; absent roles use 1.
      **kwargs: other `keras.optimizers.SGD` arguments (not `weight_decay`, which is
        decoupled in Keras).
    """

    def __init__(self, learning_rate=0.01, momentum=0.0, nesterov=False, *,
                 coupled_weight_decay: float = 0.0,
                 role_learning_rate_scales: Mapping[str, float] | None = None, **kwargs):
        if kwargs.get("weight_decay"):
            raise ConfigError("PyTorchSGD takes coupled_weight_decay, not weight_decay")
        kwargs.setdefault("name", "pytorch_sgd")
        super().__init__(learning_rate=learning_rate, momentum=float(momentum),
                         nesterov=nesterov, **kwargs)
        self.coupled_weight_decay = float(coupled_weight_decay)
        self.role_learning_rate_scales = {
            str(role): float(scale) for role, scale in (role_learning_rate_scales or {}).items()
        }

    def update_step(self, gradient, variable, learning_rate):
        learning_rate = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(gradient, variable.dtype)
        if self.momentum == 0:
            self.assign_sub(variable, ops.multiply(gradient, learning_rate))
            return
        buffer = self.momentums[self._get_variable_index(variable)]
        momentum = ops.cast(self.momentum, variable.dtype)
        self.assign(buffer, ops.add(ops.multiply(buffer, momentum), gradient))
        step = buffer
        if self.nesterov:
            step = ops.add(gradient, ops.multiply(buffer, momentum))
        self.assign_sub(variable, ops.multiply(step, learning_rate))

    def get_config(self):
        config = super().get_config()
        config["coupled_weight_decay"] = self.coupled_weight_decay
        config["role_learning_rate_scales"] = dict(self.role_learning_rate_scales)
        return config


def make_optimizer(
    train_config: TrainConfig,
    steps_per_epoch: int,
    *,
    base_learning_rate: float | None = None,
    role_learning_rates: Mapping[str, float] | None = None,
) -> PyTorchSGD:
    """The recipe's optimizer for a distiller (or a vanilla trainer).

    Args:
      train_config: momentum, Nesterov, weight decay, schedule and per-role rates.
      steps_per_epoch: optimizer steps per epoch (decay boundaries = epoch * this).
      base_learning_rate: the schedule's rate, reported as `optimizer.learning_rate`;
        default the student's rate (pass `teacher_learning_rate` to train a teacher).
      role_learning_rates: role -> initial rate; default the config's student, peer and
        teacher rates.

    Returns:
      A `PyTorchSGD` whose schedule steps at `train_config.lr_decay_epochs`.
    """
    base = float(base_learning_rate or train_config.student_learning_rate)
    if base <= 0:
        raise ConfigError(f"base learning rate must be > 0, got {base}")
    if role_learning_rates is None:
        role_learning_rates = {
            "student": train_config.student_learning_rate,
            "peer": train_config.peer_learning_rate,
            "teacher": train_config.teacher_learning_rate,
        }
    schedule = EpochStepDecay(
        base, steps_per_epoch, train_config.lr_decay_epochs, train_config.lr_decay_factor
    )
    return PyTorchSGD(
        learning_rate=schedule,
        momentum=train_config.momentum,
        nesterov=train_config.nesterov,
        coupled_weight_decay=train_config.weight_decay,
        role_learning_rate_scales={
            role: float(rate) / base for role, rate in role_learning_rates.items()
        },
    )


def recipe_optimizer(optimizer) -> PyTorchSGD | None:
    """The `PyTorchSGD` inside `optimizer` (unwrapping a loss-scale optimizer), or None."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return inner if isinstance(inner, PyTorchSGD) else None


def apply_role_gradients(optimizer, tape: tf.GradientTape, scaled_loss,
                         role_variables: Mapping[str, Sequence]) -> dict:
    """One optimizer step on every role's variables from one (loss-scaled) loss.

    Each role's gradient becomes `scale_role * (g + wd * w)`, with `wd` and the scales
    taken from a `PyTorchSGD` (any other optimizer: scale 1, no L2 here). Under a
    loss-scale optimizer the L2 term is scaled like the loss; under a distribution
    strategy it is divided by the replica count because replica gradients are summed.
    All roles are updated simultaneously from the same pre-step parameters.

    Args:
      optimizer: the distiller's (possibly loss-scale wrapped) optimizer.
      tape: the tape that recorded `scaled_loss`.
      scaled_loss: `optimizer.scale_loss(loss)`, computed inside `tape`.
      role_variables: role -> trainable variables of that role.

    Returns:
      Role -> scalar global norm of the gradient applied to it (L2 and scale included),
      for the divergence check. Empty under a loss-scale optimizer: its scaled gradients
      overflow legitimately (it then skips the step and lowers the scale), so only the
      unscaled loss terms can tell a diverged float16 run.
    """
    recipe = recipe_optimizer(optimizer)
    weight_decay = recipe.coupled_weight_decay if recipe is not None else 0.0
    scales = recipe.role_learning_rate_scales if recipe is not None else {}
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    variables = [v for role_vars in role_variables.values() for v in role_vars]
    gradients = iter(tape.gradient(scaled_loss, variables))
    check_norms = not isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    adjusted = []
    norms = {}
    for role, role_vars in role_variables.items():
        scale = scales.get(role, 1.0)
        role_gradients = []
        for variable in role_vars:
            gradient = next(gradients)
            if gradient is not None and weight_decay:
                gradient = gradient + optimizer.scale_loss(
                    ops.multiply(variable, weight_decay / replicas)
                )
            if gradient is not None and scale != 1.0:
                gradient = gradient * scale
            adjusted.append(gradient)
            if gradient is not None:
                role_gradients.append(gradient)
        if check_norms and role_gradients:
            norms[role] = tf.linalg.global_norm(role_gradients)
    optimizer.apply_gradients(zip(adjusted, variables, strict=True))
    return norms
