"""A training run's model and balancer settings judged before its run folder is written: a misspelt
``+decoder.<key>``, a wrong type in ``backbone.<key>`` or an out-of-range ``balancer.<key>`` was named only once the
data module existed, after ``config.yaml`` and a ``FAILED`` marker had been written."""
from __future__ import annotations

from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from mtl.balancers import check_level, create_balancer
from mtl.models import create_model
from mtl.models.backbone_weights import check_initial_weights
from mtl.models.families import build_on_meta
from mtl.warm_start import INITIAL_WEIGHTS

__all__ = ["check_model_settings"]


def check_model_settings(cfg: DictConfig, tasks: list[Any]) -> None:
    """Build the run's model on the meta device (no memory; its initial weights neither read nor asked of a Hub) and
    its balancer for ``tasks``, and judge the two together (`check_level`); each refusal is the one the real build
    gives. A model from ``init_from`` or a resume's checkpoint takes its architecture from there, and is judged when
    it is built."""
    model = None
    if not cfg.get("init_from") and not cfg.get("ckpt_path"):
        backbone = OmegaConf.to_container(cfg.backbone, resolve=True)
        check_initial_weights(backbone.get("pretrained", False), backbone.get("checkpoint_path"))
        # built as if unset (no file read, no Hub asked); kept as keys, so a backbone that takes neither refuses them
        unset = {"checkpoint_path": None, "pretrained": False}
        backbone.update({k: unset[k] for k in INITIAL_WEIGHTS if k in backbone})
        decoder = OmegaConf.to_container(cfg.decoder, resolve=True)
        family = cfg.get("family") or "multitask"
        model = _build(lambda: create_model(tasks, backbone=backbone, decoder=decoder, family=family))
    balancer = OmegaConf.to_container(cfg.balancer, resolve=True) if cfg.get("balancer") else {"name": "ew"}
    with torch.random.fork_rng(devices=[]):
        built = create_balancer(balancer.pop("name"), [t.name for t in tasks], **balancer)
    if model is not None:
        check_level(built, model, family)


def _build(build: Callable[[], Any]) -> Any:
    model = build_on_meta(build)
    if model is None:
        with torch.random.fork_rng(devices=[]):  # the random init is thrown away: not the run's stream
            model = build()
    return model
