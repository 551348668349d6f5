"""The public result and registry objects print as one short line saying what they hold (a dataclass
repr of a learned merge printed every tensor: ~114,000 characters)."""
import re

import torch

import merging
import pruning
from mtl.models import create_model

SHORT = 300


def _short(obj) -> str:
    text = repr(obj)
    assert len(text) < SHORT and "\n" not in text and " at 0x" not in text, text
    return text


def test_registries_name_their_kind_and_entries():
    text = _short(merging.METHODS)
    assert "merge method" in text and all(n in text for n in merging.METHODS.names())
    text = _short(pruning.METHODS)
    assert "pruning method" in text and all(n in text for n in ("l1", "l1_global", "taylor", "pagcp"))


def test_a_merge_method_shows_its_name_and_hyperparameters():
    text = _short(merging.create_method("ties", k=0.1))
    assert "'ties'" in text and "k=0.1" in text and "lam=" in text
    text = _short(merging.create_method("ties", convention="mergekit", density=0.5))
    assert "'ties'" in text and "mergekit" in text and "density=0.5" in text


def _toys(T=2):
    g = torch.Generator().manual_seed(0)
    pre = {f"w{i}": torch.randn(64, 64, generator=g) for i in range(6)}
    return pre, [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(T)]


def test_tall_masks_and_store_show_tasks_and_sizes(tmp_path):
    pre, fts = _toys()
    tall = merging.tall_masks(pre, fts, lam=0.4)
    text = _short(tall)
    assert "6 tensors" in text and "0.4" in text and "'sum'" in text
    merging.write_tall_store(pre, fts, tmp_path / "store", tasks=["a", "b"])
    with merging.open_store(tmp_path / "store") as store:
        text = _short(store)
    assert "['a', 'b']" in text and "6 merged tensors" in text


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(5, 6)
        self.heads = torch.nn.ModuleDict({t: torch.nn.Linear(6, 3) for t in ("t0", "t1")})

    def forward(self, x, tasks):
        return {t: self.heads[t](torch.tanh(self.body(x))) for t in tasks}


def test_a_learned_merge_shows_method_coefficients_and_steps():
    torch.manual_seed(0)
    model = _Toy()
    pre = {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("body.")}
    fts = [{k: v + 0.3 * torch.randn_like(v) for k, v in pre.items()} for _ in range(2)]
    data = {t: [torch.randn(8, 5)] for t in ("t0", "t1")}
    res = merging.learn("adamerging", pre, fts, unlabeled=data, steps=2, model=model, tasks=["t0", "t1"],
                        progress=False)
    text = _short(res)
    assert "'adamerging'" in text and str(tuple(res.coefficients.shape)) in text and "2 steps" in text
    assert re.search(r"objective \S+ → \S+", text), text


def test_a_layer_graph_counts_its_layers():
    torch.manual_seed(0)
    model = create_model(["semseg", "depth"], backbone="test_resnet").eval()
    graph = pruning.LayerGraph(model, torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8))
    text = _short(graph)
    assert f"{len(graph.layers)} prunable layers" in text
