"""Hydra launchers that ship with mtlkit (``launcher=ray``); see docs/scaleout.md."""
from mtl.launchers.ray_launcher import HYDRA_TARGET, RayLauncher, register

__all__ = ["HYDRA_TARGET", "RayLauncher", "register"]
