"""Multi-task loss balancing and gradient aggregation. See `base.py` for the interface."""
from mtl.balancers.base import BALANCERS, Balancer, StepContext, create_balancer
from mtl.balancers import loss_level  # noqa: F401  (registers the loss-level methods)

__all__ = ["BALANCERS", "Balancer", "StepContext", "create_balancer"]
