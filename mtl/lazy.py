"""Lazy attributes of a package: submodules load on first use (`mtl.train`, `merging.job`), so
`import mtl` stays cheap and a notebook can still write `mtl.train.run(...)` without importing it."""
from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from typing import Any, Iterable


def submodule(package: str, name: str) -> Any:
    """``package.name`` imported, or the AttributeError Python would raise."""
    if not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}") is not None:
        return importlib.import_module(f"{package}.{name}")
    raise AttributeError(f"module {package!r} has no attribute {name!r}")


def names(namespace: dict[str, Any], extra: Iterable[str] = ()) -> list[str]:
    """``dir()`` of a package: what it holds, its lazy attributes and its public submodules."""
    found = {m.name for m in pkgutil.iter_modules(namespace["__path__"]) if not m.name.startswith("_")}
    return sorted(set(namespace) | set(extra) | found)


def attributes(namespace: dict[str, Any], extra: Iterable[str] = ()):
    """``(__getattr__, __dir__)`` for a package with no lazy names of its own beyond its submodules:
    ``__getattr__, __dir__ = lazy.attributes(globals())``."""
    package = namespace["__name__"]
    return (lambda name: submodule(package, name)), (lambda: names(namespace, extra))
