"""format=folder tasks=[...] for every family that can drop tasks: the subset folder reloads and its
outputs equal the full model's for the kept tasks (pruned, task-MoE and extracted slimmable models
once failed with misleading errors)."""
import pytest
import torch

import mtl
import pruning
from mtl.exporters import ExportError
from mtl.exporters.folder import keep_tasks
from mtl.models import create_model

TASKS = ["semseg", "depth", "classification"]
X = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
SLIM_BB = {"name": "slim_resnet", "stem": 8, "channels": [8, 16], "depths": [1, 1], "out_indices": [1, 2]}
VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}


def _pruned():
    torch.manual_seed(0)
    model = create_model(TASKS, backbone={"name": "test_resnet", "out_indices": [1, 2, 3]},
                         decoder={"name": "hps", "channels": 16}).eval()
    return pruning.prune(model, "l1", example=X, ratio=0.5)[0].eval()


def _task_moe():
    torch.manual_seed(0)
    return create_model(TASKS, backbone=VIT, decoder={"num_experts": 4, "top_k": 2}, family="task_moe_vit").eval()


def _slim(widths=None):
    torch.manual_seed(0)
    model = create_model(TASKS, backbone=SLIM_BB, decoder={"name": "slimmable", "channels": 8}, family="slimmable")
    if widths:
        model.set_config(widths)
    return model.eval()


def _extracted_slim():
    return _slim().extract_subnetwork({"encoder": 0.5, "decoders": {"semseg": 1.0, "depth": 0.25,
                                                                    "classification": 0.5}}).eval()


@pytest.mark.parametrize("make", [_pruned, _task_moe, _extracted_slim,
                                  lambda: _slim({"encoder": 0.5, "decoders": {"semseg": 0.25, "depth": 0.5,
                                                                              "classification": 1.0}})],
                         ids=["pruned", "task_moe_vit", "extracted_slimmable", "slimmable_at_widths"])
def test_folder_subset_reloads_with_the_kept_tasks_outputs(tmp_path, make):
    model = make()
    out = mtl.export(model, "folder", tmp_path / "depth", tasks=["depth", "classification"])
    sub = mtl.load_model(out)
    assert list(sub.tasks) == ["depth", "classification"]
    with torch.no_grad():
        full, got = model(X), sub(X)
    for t in ("depth", "classification"):
        assert torch.equal(got[t], full[t]), t
    assert sum(p.numel() for p in sub.parameters()) < sum(p.numel() for p in model.parameters())


def test_a_model_that_cannot_drop_tasks_names_the_first_key(tmp_path):
    model = _pruned()
    model.pruning_plan = dict(model.pruning_plan, modules={})  # the plan no longer describes the weights
    with pytest.raises(ExportError, match=r"format=folder: the 'multitask' family cannot drop tasks \['semseg'\]: "
                                          r"key '[\w.]+' does not fit the model without them"):
        keep_tasks(model, ["depth", "classification"])


def test_format_timm_names_the_backbone_it_cannot_write(tmp_path):
    with pytest.raises(ExportError, match=r"format=timm needs a timm backbone .*; backbone 'slim_resnet' is not a "
                                          r"timm model: export it with format=onnx or format=folder"):
        mtl.export(_extracted_slim(), "timm", tmp_path / "t")
    assert not (tmp_path / "t").exists()


def test_a_slimmable_folder_at_chosen_widths_does_not_claim_its_runs_full_width_metrics(tmp_path):
    run_metrics = {"semseg": {"miou": 0.7}, "depth": {"rmse": 0.5}, "classification": {"accuracy": 0.9}}
    full = mtl.save_model(_slim(), tmp_path / "full", meta={"test": run_metrics})
    model = mtl.load_model(full)
    out = mtl.export(full, "folder", tmp_path / "as_is")
    assert mtl.io.read_model_config(out)["meta"]["test"] == run_metrics  # full widths: the run's numbers hold
    model.set_config({"encoder": 0.5, "decoders": {t: 0.25 for t in TASKS}})
    out = mtl.export(model, "folder", tmp_path / "slim", tasks=["depth"])
    assert "test" not in mtl.io.read_model_config(out)["meta"]


def test_a_subset_export_records_and_shows_only_the_kept_tasks_widths(tmp_path):
    """export.json["widths"] and the card listed the dropped tasks' decoder widths too."""
    from mtl.exporters import read_report

    model = _slim({"encoder": 0.5, "decoders": {"semseg": 0.25, "depth": 0.5, "classification": 1.0}})
    out = mtl.export(model, "folder", tmp_path / "sub", tasks=["depth", "semseg"])
    want = {"encoder": 0.5, "decoders": {"semseg": 0.25, "depth": 0.5}}
    assert read_report(out)["widths"] == want
    assert mtl.io.read_model_config(out)["model"]["active_widths"] == want
    card = (out / "README.md").read_text()
    assert "classification" not in card and '"depth": 0.5' in card
