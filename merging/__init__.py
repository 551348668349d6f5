"""Model merging over `{name: tensor}` state dicts.

    merging.task_vector(pretrained, finetuned)
    merging.merge(method, pretrained, finetuned, **hparams) -> dict[str, Tensor]
    merging.merge_to_file(method, pretrained, finetuned, out, overwrite=False, **hparams)
    merging.tall_masks(pretrained, finetuned, lam=0.4, mtv="sum") -> TallMasks
    merging.write_tall_store(...) / merging.load_task_model(store, task) / merging.store_report(store)
    merging.learn("adamerging" | "atlas" | "concrete_ta" | "concrete_adamerging", pretrained, finetuned,
                  unlabeled={task: batches}, **hparams) -> LearnedMerge (learned at test time)
    merging.recompute_bn(model, batches)  # BatchNorm statistics of a merged model re-estimated on data
    merging.weight_disentanglement(pool, alphas=(0.3, 1.0)) -> Disentanglement (how much task vectors interfere)
    merging.merge_mergekit_yaml(config_yml, out)  # a mergekit YAML recipe (linear, task_arithmetic, ties, dare_*)

Inputs are state dicts, `nn.Module`s, model folders (`model.safetensors` inside), `.safetensors` files
or torch checkpoints; they are never modified. See docs/merging.md.
"""
from __future__ import annotations

from .api import merge
from .bn import bn_statistics, recompute_bn
from .keys import KeyPlan, plan_keys
from .learned import LEARNED_METHODS, LearnedMerge, learn
from . import consensus as _consensus  # noqa: F401  (registers "consensus")
from .dare import dare, dare_mask
from .mergekit_yaml import MergekitPlan, merge_mergekit_yaml, read_mergekit_yaml
from .methods import METHODS, create_method
from .selection import keep_count, radix_thresholds
from .sources import MergeInputError, StateSource, load_state_dict, open_source
from .storage import write_tall_store
from .store_reader import TallStore, load_task_model, open_store, store_report
from .streaming import merge_to_file
from .tall import TallMasks, mask_overlap, tall_masks
from .task_vectors import apply_task_vector, compose, task_vector

_PLOTS = {"plot_task_accuracy", "plot_mask_overlap", "plot_disentanglement"}


_LAZY = {"Disentanglement": "disentanglement", "weight_disentanglement": "disentanglement"}


def __getattr__(name):  # matplotlib (plots) and the model world (disentanglement) load only when asked for
    if name in _PLOTS:
        from . import plots

        return getattr(plots, name)
    if name in _LAZY:  # keeps `import merging` light: an LLM merge never needs timm or torchvision
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    from mtl.lazy import submodule

    return submodule(__name__, name)  # merging.job, merging.hf, ... without importing them first


def __dir__():
    from mtl.lazy import names

    return names(globals(), _LAZY.keys() | _PLOTS)


def method_names() -> list[str]:
    """Names accepted by `merge` and `merge_to_file`."""
    return METHODS.names()


__all__ = [
    "merge", "merge_to_file", "method_names", "task_vector", "apply_task_vector", "compose", "dare", "dare_mask",
    "tall_masks", "TallMasks", "mask_overlap", "write_tall_store", "load_task_model", "store_report",
    "open_store", "TallStore", "open_source", "load_state_dict", "StateSource", "MergeInputError",
    "plan_keys", "KeyPlan", "create_method", "METHODS", "keep_count", "radix_thresholds",
    "plot_task_accuracy", "plot_mask_overlap", "learn", "LearnedMerge", "LEARNED_METHODS",
    "recompute_bn", "bn_statistics", "weight_disentanglement", "Disentanglement",
    "read_mergekit_yaml", "merge_mergekit_yaml", "MergekitPlan",
]
