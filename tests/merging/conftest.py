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
