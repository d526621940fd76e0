"""Exceptions the harness and users can catch by type."""

from __future__ import annotations

__all__ = ["NonFiniteGradientError", "NonFiniteHyperparameterError"]


class NonFiniteHyperparameterError(FloatingPointError):
    """A learned hyperparameter became NaN or infinite; the step was not applied, so the weights are intact."""

    def __init__(self, level: int, name: str, value: float, step: int) -> None:
        self.level, self.name, self.value, self.step = level, name, value, step
        super().__init__(
            f"hyperparameter {name!r} of level {level} became {value} at step {step}; "
            "the weights were left unchanged (lower the hyper-step size of the level above)"
        )


class NonFiniteGradientError(FloatingPointError):
    """A gradient handed to ``step()`` holds NaN or infinity; the step was not applied, so the weights are intact."""

    def __init__(self, index: int, shape: tuple[int, ...], step: int) -> None:
        self.index, self.shape, self.step = index, shape, step
        super().__init__(
            f"the gradient of parameter {index} (shape {shape}) is not finite at step {step}; the weights were left "
            "unchanged (the loss or the model produced NaN or infinity: check the data and the step size; "
            "torch.amp.GradScaler skips such steps by itself)"
        )
