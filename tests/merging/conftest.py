"""`tests/` is on sys.path (rootless conftest), so this folder would shadow the `merging` package as a
namespace package: the editable install's finder runs after the path scan. Put the repo root first."""
import sys
from pathlib import Path

import pytest

_ROOT = str(Path(__file__).resolve().parents[2])
if sys.path[:1] != [_ROOT]:
    sys.path.insert(0, _ROOT)
_m = sys.modules.get("merging")
if _m is not None and getattr(_m, "__file__", None) is None:  # a namespace package picked up earlier
    del sys.modules["merging"]


@pytest.fixture
def one_thread():
    """Tiny tensors: torch's intra-op threads only add stalls (opt in with ``usefixtures``)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def smoke_pool(tmp_path_factory):
    """A seconds-long real pool (tiny base + 2 fine-tunes), built once for every CLI test of this folder."""
    from merging.job import build_smoke_pool

    return build_smoke_pool(tmp_path_factory.mktemp("smoke_pool"))


@pytest.fixture
def guard_labels(monkeypatch):
    """`guard_labels(what, (owner, name), ...)` wraps those functions so that while any of them runs, the
    values of every in-memory dataset column but 'image' raise "... read while {what}", by whatever path
    (`[]`, `.get`, `.values()`, `.items()`, `dict(...)`, `**`); column names stay readable (`in`, iteration).
    Returns the guard's state: `on` (set it to test that the guard bites), `calls` (how often a wrapped
    function ran) and `image_reads` (image columns read while guarded: the data was built in its scope)."""
    import inspect
    from collections.abc import Mapping

    from mtl.data import memory as dm_module

    state = {"on": False, "calls": 0, "image_reads": 0, "what": ""}

    class Guarded(Mapping):
        # a Mapping, not a dict subclass: every mixin (get, values, items, ==) goes through __getitem__
        def __init__(self, columns):
            self._columns = dict(columns)

        def __getitem__(self, key):
            if state["on"]:
                if key != "image":
                    raise AssertionError(f"label column {key!r} read while {state['what']}")
                state["image_reads"] += 1
            return self._columns[key]

        def __contains__(self, key):
            return key in self._columns

        def __iter__(self):
            return iter(self._columns)

        def __len__(self):
            return len(self._columns)

    orig_init = dm_module.TensorDictDataset.__init__

    def guarded_init(self, *a, **k):
        orig_init(self, *a, **k)
        self.tensors = Guarded(self.tensors)

    def guarded(fn):
        def wrapper(*a, **k):
            state["on"], state["calls"] = True, state["calls"] + 1
            try:
                out = fn(*a, **k)
                return list(out) if inspect.isgenerator(out) else out  # drawn while guarded
            finally:
                state["on"] = False
        return wrapper

    def arm(what, *targets):
        state["what"] = what
        monkeypatch.setattr(dm_module.TensorDictDataset, "__init__", guarded_init)
        for owner, name in targets:
            monkeypatch.setattr(owner, name, guarded(getattr(owner, name)))
        return state

    return arm


@pytest.fixture
def model_calls(monkeypatch):
    """Every `torch.func.functional_call` made while the test runs, as (inputs, tasks asked for): which
    passes a learned merge ran, with which tasks and in which memory format."""
    import torch

    calls = []
    real = torch.func.functional_call

    def spy(module, params, args, kwargs=None, **k):
        calls.append((args[0], list((kwargs or {}).get("tasks", []))))
        return real(module, params, args, kwargs, **k)

    monkeypatch.setattr(torch.func, "functional_call", spy)
    return calls
