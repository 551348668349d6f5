"""A pruned multi-task model fine-tuned on a subset of its tasks (init_from): the per-task pool of a model
pruned once, which merges back under the one shared plan."""
import pytest
import torch

import merging
import mtl
from mtl.io import save_model
from mtl.models import create_model
from mtl.tasks import create_task
from mtl.warm_start import folder_architecture, init_from_folder
from pruning.job import run

DATA = {"name": "scenes", "size": 32, "n_train": 32, "n_val": 16, "n_test": 16, "batch_size": 8}


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    torch.manual_seed(0)
    m = create_model(["semseg", "depth"], backbone="test_resnet", decoder={"name": "hps", "channels": 8})
    root = tmp_path_factory.mktemp("pruned")
    save_model(m, root / "model", meta={"data": DATA})
    run(["prune=l1", f"model={root / 'model'}", "prune.ratio=0.5", "calib.batches=1", "eval.max_batches=1",
         "eval.latency_repeats=1"], run_dir=root / "run")
    return root / "run" / "model"


def test_a_subset_of_tasks_gets_the_pruned_shared_layers_and_its_own_pruned_head(pruned):
    parent = mtl.load_model(pruned)
    child = folder_architecture(pruned, [create_task("depth")])
    assert list(child.tasks) == ["depth"] and "decoder.heads.semseg.body.0.0" not in child.pruning_plan["modules"]
    init_from_folder(child, pruned)
    own = parent.state_dict()
    for k, v in child.state_dict().items():  # every tensor loads: same shapes as the parent's
        assert v.shape == own[k].shape and torch.equal(v, own[k]), k
    x = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(child.eval()(x)["depth"], parent.eval()(x, tasks=["depth"])["depth"])


def test_subset_fine_tunes_merge_back_with_the_pruned_parent(pruned, tmp_path):
    folders = []
    for t in ("semseg", "depth"):
        child = folder_architecture(pruned, [create_task(t)])
        init_from_folder(child, pruned)
        with torch.no_grad():
            for p in child.backbone.parameters():
                p.add_(0.01)
        folders.append(save_model(child, tmp_path / t))
    merged = merging.merge("task_arithmetic", pruned, folders, lam=1.0)
    theta0 = mtl.load_model(pruned).state_dict()
    for k, v in merged.items():
        if k.startswith("backbone.") and v.is_floating_point() and "running" not in k:
            assert torch.allclose(v, theta0[k] + 0.02, atol=1e-6), k
    # the model mtl-merge evaluates and saves: every member's pruned head at its pruned width (the first
    # member's plan alone rebuilt the other heads unpruned)
    from merging.pool import ModelPool

    model = ModelPool.from_folders(pruned, folders).merged_model(merged)
    for t, f in zip(("semseg", "depth"), folders):
        own = mtl.load_model(f).state_dict()
        for k, v in model.state_dict().items():
            if k.startswith(f"decoder.heads.{t}."):
                assert torch.equal(v, own[k]), k
    again = mtl.load_model(save_model(model, tmp_path / "merged"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in again.state_dict().items())


def test_a_task_the_pruned_model_lacks_is_refused(pruned):
    with pytest.raises(ValueError, match=r"pruned model for tasks \['depth', 'semseg'\]; fine-tune it on those "
                                         r"tasks or a subset of them \(\['normals'\] have no head"):
        folder_architecture(pruned, [create_task("depth"), create_task("normals")])
