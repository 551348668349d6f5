"""mtlkit's model world: data, tasks, models, balancers, training and model folders."""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "create_task": "mtl.tasks",
    "create_model": "mtl.models",
    "MultiTaskModel": "mtl.models",
    "load_model": "mtl.io",
    "save_model": "mtl.io",
    "create_balancer": "mtl.balancers",
    "create_datamodule": "mtl.data",
    "extract": "mtl.extraction",
    "export": "mtl.exporters",
    "count_flops": "mtl.flops",
    "model_stats": "mtl.flops",
}


def __getattr__(name):  # lazy, so `import mtl` stays cheap and free of import cycles
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    from mtl.lazy import submodule

    return submodule(__name__, name)  # mtl.train, mtl.io, ... without importing them first


def __dir__():
    from mtl.lazy import names

    return names(globals(), _LAZY)


__all__ = list(_LAZY)
