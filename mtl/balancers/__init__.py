"""Multi-task loss balancing and gradient aggregation. See `base.py` for the interface and
docs/balancers.md for every method, its hyper-parameters and the scale convention."""
from mtl.balancers.base import (
    BALANCERS,
    Balancer,
    NonFiniteGradientError,
    NonFiniteLossError,
    StepContext,
    check_finite,
    check_level,
    check_finite_gradients,
    create_balancer,
    freeze_norm_stats,
)
from mtl.balancers import loss_level, own_optimizer, gradient, graddrop, nash, flat  # noqa: F401,E402  (register the methods)
from mtl.balancers.gradient import JACOBIAN_METHODS  # noqa: E402
from mtl.balancers.monitor import BalancerMonitor  # noqa: E402

LOSS_LEVEL_METHODS = ("ew", "uw", "dwa", "rlw", "gradnorm", "famo")

__all__ = [
    "BALANCERS",
    "Balancer",
    "BalancerMonitor",
    "JACOBIAN_METHODS",
    "LOSS_LEVEL_METHODS",
    "NonFiniteGradientError",
    "NonFiniteLossError",
    "StepContext",
    "check_finite",
    "check_level",
    "check_finite_gradients",
    "create_balancer",
    "freeze_norm_stats",
]
