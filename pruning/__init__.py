"""Multi-task channel pruning: importance -> plan -> physical removal (Torch-Pruning) -> report.

    pruned, report = pruning.prune(model, "pagcp", calib=batches, flops_target=0.4)
    mtl.io.save_model(pruned, "pruned")      # config.json stores the plan; mtl.load_model rebuilds it

Methods: ``l1`` (same ratio per layer), ``l1_global``, ``taylor`` (multi-task, sum or max over tasks),
``pagcp`` (Ye et al., TPAMI 2023). See docs/pruning.md.
"""
from pruning.api import prune
from pruning.graph import LayerGraph, PruningError
from pruning.methods import METHODS
from pruning import pagcp as _pagcp  # noqa: F401  (registers "pagcp")

__all__ = ["prune", "METHODS", "LayerGraph", "PruningError"]

from mtl.lazy import attributes as _lazy  # noqa: E402

__getattr__, __dir__ = _lazy(globals())  # pruning.job, ... load on first use
