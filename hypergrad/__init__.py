"""hypergrad: "Gradient Descent: The Ultimate Optimizer" (Chandra et al., NeurIPS 2022) for PyTorch.

An optimizer's hyperparameters (step size, momentum, Adam's betas, RMSProp's smoothing) are learned online from
hypergradients that autograd computes, and the optimizer of those hyperparameters can itself be hyperoptimized::

    opt = hypergrad.tower("adam/sgd(1e-5)", model.parameters())
    loss.backward(); opt.step(); opt.zero_grad()

The contract is stated at the top of :mod:`hypergrad.core` (the tower as ``init``/``update`` over explicit state);
one level's update rule is a :class:`hypergrad.rules.Rule`.
"""

from hypergrad import rules  # the module (the registry is hypergrad.rules.rules())
from hypergrad.errors import NonFiniteGradientError, NonFiniteHyperparameterError
from hypergrad.optim import SGD, AdaGrad, Adam, AdamW, HyperOptimizer, RMSProp, tower
from hypergrad.rules import Rule, register
from hypergrad.spec import Level, Tower, format_spec, parse_spec

__all__ = [
    "SGD",
    "AdaGrad",
    "Adam",
    "AdamW",
    "HyperOptimizer",
    "Level",
    "NonFiniteGradientError",
    "NonFiniteHyperparameterError",
    "RMSProp",
    "Rule",
    "Tower",
    "format_spec",
    "parse_spec",
    "register",
    "rules",
    "tower",
]
