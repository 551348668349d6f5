"""mtl.export: ONNX == PyTorch (CNN, ViT, a task subset), timm reload, model cards, bad input."""
import json

import numpy as np
import pytest
import torch
from torch import nn

import mtl
from mtl.exporters import ExportError, read_report
from mtl.io import ModelFolderError, save_model
from mtl.models import MultiTaskModel, create_model
from mtl.registry import UnknownNameError

ort = pytest.importorskip("onnxruntime")

TASKS = ["semseg", "depth", "classification"]
BACKBONES = {
    "test_resnet": {"name": "test_resnet", "out_indices": [1, 2, 3]},
    "test_vit": {"name": "test_vit", "img_size": 32, "patch_size": 4},
    "test_convnext": {"name": "test_convnext", "out_indices": [1, 2, 3]},  # features_only names stages.0 stages_0
}


def _folder(tmp_path, backbone="test_resnet", seed=0):
    torch.manual_seed(seed)
    model = create_model(TASKS, backbone=BACKBONES[backbone], decoder={"name": "hps", "channels": 16})
    with torch.no_grad():  # non-trivial BN statistics, so eval-vs-train mistakes show
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return save_model(model, tmp_path / f"model_{backbone}", meta={"data": {"name": "scenes", "size": 32}})


def _ort_outputs(path, x):
    session = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"image": x.numpy()})))


@pytest.mark.parametrize("backbone", ["test_resnet", pytest.param("test_vit", marks=pytest.mark.slow)])
def test_onnx_equals_pytorch_within_the_printed_tolerance(tmp_path, backbone, capsys):
    folder = _folder(tmp_path, backbone)
    out = mtl.export(folder, "onnx", tmp_path / "onnx", exporter="torchscript")
    printed = capsys.readouterr().out
    report = read_report(out)
    assert "atol=0.0001" in printed and report["verification"]["passed"]
    assert report["input"]["dtype"] == "uint8" and report["input"]["shape"][0] == "batch"
    # our own check, on a batch size the export never saw: uint8 in, normalisation inside the graph
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(7))
    model = mtl.load_model(folder)
    with torch.no_grad():
        ref = model(x)
    got = _ort_outputs(out, x)
    assert list(got) == TASKS
    for t in TASKS:
        r = ref[t].numpy()
        assert got[t].shape == r.shape
        assert np.all(np.abs(got[t] - r) <= 1e-4 + 1e-3 * np.abs(r)), t
    # a model whose BN ran in train mode would differ by O(1): make sure the check can tell
    assert np.abs(got["semseg"] - model.train()(x)["semseg"].detach().numpy()).max() > 1e-3
    # the file declares every output's shape: batch dynamic, the rest numbers (H and W are fixed)
    import onnxruntime as ort

    declared = {o.name: o.shape for o in ort.InferenceSession(str(out / "model.onnx")).get_outputs()}
    for t in TASKS:
        assert declared[t][0] == "batch" and declared[t][1:] == list(ref[t].shape[1:]), (t, declared[t])


@pytest.mark.slow  # the CLI test exports (and verifies) a subset in the fast suite
def test_onnx_task_subset_holds_only_those_outputs(tmp_path):
    folder = _folder(tmp_path)
    out = mtl.export(folder, "onnx", tmp_path / "depth", tasks=["depth"], exporter="torchscript")
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    got = _ort_outputs(out, x)
    assert list(got) == ["depth"]
    with torch.no_grad():
        ref = mtl.load_model(folder)(x, tasks=["depth"])["depth"].numpy()
    assert np.allclose(got["depth"], ref, atol=1e-4, rtol=1e-3)
    assert read_report(out)["tasks"] == ["depth"]


@pytest.mark.slow
def test_onnx_default_dynamo_exporter(tmp_path):
    folder = _folder(tmp_path)
    out = mtl.export(folder, "onnx", tmp_path / "onnx")
    report = read_report(out)
    assert report["exporter"] == "dynamo" and report["opset"] == 18
    x = torch.randint(0, 256, (7, 3, 32, 32), dtype=torch.uint8)
    got = _ort_outputs(out, x)
    with torch.no_grad():
        ref = mtl.load_model(folder)(x)
    for t in TASKS:
        assert np.allclose(got[t], ref[t].numpy(), atol=1e-4, rtol=1e-3)


def test_opsets_outside_the_exporters_range_are_refused_before_tracing(tmp_path):
    folder = _folder(tmp_path)
    # dynamo does not write opsets below 18: asking for 17 is an error before tracing, not a file labelled 17;
    # nor does any exporter write an opset beyond torch's newest
    for opset, exporter, why in [(17, "dynamo", r"the dynamo exporter writes opsets 18–\d+ \(format.exporter=torchscript: 11–"),
                                 (99, "dynamo", r"the dynamo exporter writes opsets 18–"),
                                 (99, "torchscript", r"the torchscript exporter writes opsets 11–\d+ \(format.exporter=dynamo: 18–"),
                                 # below 11 the hps model's files disagreed with PyTorch (0.004 on classification)
                                 (10, "torchscript", r"the torchscript exporter writes opsets 11–")]:
        with pytest.raises(ValueError, match=rf"^format.opset={opset}: {why}"):
            mtl.export(folder, "onnx", tmp_path / "o17", opset=opset, exporter=exporter)
        assert not (tmp_path / "o17").exists()


def test_the_recorded_opset_is_the_one_in_the_file(tmp_path):
    import onnx

    out = mtl.export(_folder(tmp_path), "onnx", tmp_path / "onnx", exporter="torchscript", opset=17)
    versions = {o.domain: o.version for o in onnx.load(str(out / "model.onnx")).opset_import}
    assert versions[""] == 17 == read_report(out)["opset"]


class Bessel(nn.Module):
    def forward(self, x):
        return torch.special.i0(x)


class UnexportableModel(MultiTaskModel):
    """A model using an operator ONNX has no translation for, inside a named module."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.post = Bessel()

    def forward(self, x, tasks=None):
        return {t: self.post(v) for t, v in super().forward(x, tasks).items()}


@pytest.mark.parametrize("exporter", ["torchscript", pytest.param("dynamo", marks=pytest.mark.slow)])
def test_unsupported_operator_names_operator_and_module(tmp_path, exporter, capfd):
    base = create_model(["depth"], backbone=BACKBONES["test_resnet"], decoder={"name": "hps", "channels": 8})
    model = UnexportableModel(list(base.tasks.values()), base.config["backbone"], base.config["decoder"])
    capfd.readouterr()
    with pytest.raises(ExportError, match=r"operator '.*i0'.*module post \(Bessel\)") as e:
        mtl.export(model, "onnx", tmp_path / "out", exporter=exporter, input_size=32)
    out, err = capfd.readouterr()  # torch's C++ side used to print the whole IR graph to fd 1
    assert "graph(" not in out + err and len((out + err).splitlines()) < 5, (out + err)[:500]
    assert ("format.exporter=dynamo" in str(e.value)) == (exporter == "torchscript")  # the other exporter's hint
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary left behind either


def test_a_vit_traced_off_its_img_size_is_told_why_the_resampling_operator_appears(tmp_path):
    folder = _folder(tmp_path, "test_vit")  # img_size 32
    with pytest.raises(ExportError, match=r"upsample.*format.input_size=24 while the backbone's img_size is 32 "
                                          r".*export at format.input_size=32"):
        mtl.export(folder, "onnx", tmp_path / "out", exporter="torchscript", input_size=24)
    assert not (tmp_path / "out").exists()


def test_a_vit_input_size_that_is_not_whole_patches_is_refused_before_tracing(tmp_path, monkeypatch):
    folder = _folder(tmp_path, "test_vit")  # patch_size 4: 34 = 8.5 patches, which timm's PatchEmbed asserts against

    def never(*args, **kwargs):
        raise AssertionError("traced")

    monkeypatch.setattr(torch.onnx, "export", never)
    for size, fits in [(34, "32 or 36"), ([32, 30], r"\[32, 28\] or 32")]:
        shown = str(size).replace("[", r"\[").replace("]", r"\]")
        with pytest.raises(ValueError, match=rf"^format.input_size={shown} \(input_size= in mtl.export\) is not a "
                                             rf"multiple of the patch size 4 of backbone.body.model.patch_embed "
                                             rf"\(PatchEmbed\); export at a multiple of it \(e.g. {fits}\)$"):
            mtl.export(folder, "onnx", tmp_path / "out", input_size=size)
        assert not (tmp_path / "out").exists()


def test_modules_with_an_int_patch_size_are_checked_or_passed_over_not_crashed_on():
    from mtl.exporters.onnx_export import _check_patch_size

    class Embed(nn.Module):  # as timm's xcit/nest/tnt store it: patch_size an int
        def __init__(self, patch_size, **pad):
            super().__init__()
            self.patch_size = patch_size
            self.__dict__.update(pad)

    model = nn.Sequential(Embed(16), Embed(None), Embed((4, 4), dynamic_img_pad=True))
    _check_patch_size(model, (30, 30))  # none of them asserts on partial patches
    with pytest.raises(ValueError, match=r"^format.input_size=30 .* patch size 16 of 0 \(Embed\); .*e.g. 16 or 32"):
        _check_patch_size(nn.Sequential(Embed(16, dynamic_img_pad=False)), (30, 30))


@pytest.mark.parametrize("backbone", ["test_resnet", "test_convnext", pytest.param("test_vit", marks=pytest.mark.slow)])
def test_timm_weights_reload_in_plain_timm(tmp_path, backbone):
    import timm

    folder = _folder(tmp_path, backbone)
    out = mtl.export(folder, "timm", tmp_path / "timm")
    report = read_report(out)
    file = out / "model.safetensors"
    # exactly what a user does; timm loads pretrained weights strictly, so a missing key raises
    plain = timm.create_model(report["timm_name"], pretrained=True, pretrained_cfg_overlay={"file": str(file)},
                              **report["model_args"]).eval()
    model = mtl.load_model(folder)
    x = torch.randn(2, 3, 32, 32)
    indices = model.backbone.body.feature_info.out_indices
    with torch.no_grad():
        ours = model.backbone(x)
        theirs = plain.forward_intermediates(x, indices=list(indices), intermediates_only=True)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-5)
    head = report["filled_keys"]["zeroed"]
    assert head and all(torch.count_nonzero(plain.state_dict()[k]) == 0 for k in head)
    # timm's own local-folder loading works from the same folder
    again = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(again.forward_intermediates(x, indices=list(indices), intermediates_only=True)[0], theirs[0])
    # timm's data pipeline gets the model's own recipe, not timm's ImageNet default for the name
    data = timm.data.resolve_data_config({}, model=again)
    assert data["mean"] == pytest.approx(model.config["mean"]) and data["std"] == pytest.approx(model.config["std"])
    assert tuple(data["input_size"]) == (3, 32, 32) and data["crop_pct"] == 1.0
    # and no ImageNet provenance: timm's hub id, tag and licence for the name are not these weights'
    cfg = json.loads((out / "config.json").read_text())["pretrained_cfg"]
    assert cfg["tag"] == "mtlkit" and not {"hf_hub_id", "license", "origin_url", "paper_ids", "paper_name"} & set(cfg)


@pytest.mark.parametrize("fmt", ["timm", "folder", "onnx"])
def test_every_exported_file_gets_the_usual_permissions(tmp_path, fmt):
    # timm's save_for_hf writes through safetensors' save_file, which creates its file 0600
    import os
    import stat

    folder = _folder(tmp_path, "test_resnet")
    old = os.umask(0o022)
    try:
        out = mtl.export(folder, fmt, tmp_path / fmt)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()}
    assert modes and all(m == 0o644 for m in modes.values()), modes


def test_timm_card_loads_the_trained_maps_and_never_recommends_untrained_stages(tmp_path):
    """out_indices [1, 2, 3] leave layer4 at timm's seeded init: forward_features then depends on format.seed
    alone, and features_only=True with timm's default indices returns that random map last."""
    import timm

    folder = _folder(tmp_path)
    outs = [mtl.export(folder, "timm", tmp_path / f"timm{s}", seed=s) for s in (0, 1)]
    report = read_report(outs[0])
    assert report["out_indices"] == [1, 2, 3] and report["untrained_modules"] == ["layer4"]
    assert "features_only=True, out_indices=[1, 2, 3]" in report["load"]
    x = torch.randn(2, 3, 32, 32)
    ours = mtl.load_model(folder).backbone
    with torch.no_grad():
        want = ours(x)
        for out in outs:  # the card's call gives exactly the backbone's maps, whatever the seed
            plain = timm.create_model(report["timm_name"], pretrained=True, features_only=True,
                                      out_indices=report["out_indices"],
                                      pretrained_cfg_overlay={"file": str(out / "model.safetensors")}).eval()
            assert all(torch.equal(a, b) for a, b in zip(plain(x), want)) and len(plain(x)) == len(want)
        seeded = [timm.create_model(f"local-dir:{out}", pretrained=True).eval().forward_features(x) for out in outs]
    assert (seeded[0] - seeded[1]).abs().max() > 0.1  # forward_features is the seed's, not the training's
    card = (outs[0] / "README.md").read_text()
    assert "out_indices=[1, 2, 3]" in card.split("## Loading")[1]
    assert "`forward_features` runs `layer4`, which the multi-task backbone never had: untrained" in card
    assert "(or `forward_features`)" not in card


def test_timm_input_size_comes_from_a_merges_image_size_too(tmp_path):
    """A merge of members trained on other data records meta.image_size, not meta.data: timm's pipeline must
    still resize to the trained size, not timm's default for the name (160 px for test_resnet)."""
    model = mtl.load_model(_folder(tmp_path))
    merged = save_model(model, tmp_path / "merged", meta={"image_size": 24})
    report = read_report(mtl.export(merged, "timm", tmp_path / "timm"))
    assert tuple(report["preprocessing"]["input_size"]) == (3, 24, 24)


@pytest.mark.parametrize("size", [32, 96])
def test_timm_pool_size_is_the_final_map_at_the_recorded_input_size(tmp_path, size):
    """timm's pool_size (its test-time pooling kernel) is the last feature map's H, W at input_size: a stride-32
    ResNet gives ceil(size / 32), not timm's default (5, 5) for test_resnet's 160 px."""
    import math

    model = mtl.load_model(_folder(tmp_path))
    folder = save_model(model, tmp_path / f"m{size}", meta={"data": {"name": "scenes", "size": size}})
    cfg = json.loads((mtl.export(folder, "timm", tmp_path / "timm") / "config.json").read_text())["pretrained_cfg"]
    assert cfg["input_size"] == [3, size, size] and cfg["pool_size"] == [math.ceil(size / 32)] * 2


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from mtl.train import run

    run_dir = run(["experiment=scenes_hps", "debug=smoke", "viz.num_samples=0", "logger=none", "task=[semseg,depth]"],
                  run_dir=tmp_path_factory.mktemp("run") / "run")
    return run_dir


def test_folder_card_names_the_runs_real_metrics(trained, tmp_path):
    out = mtl.export(trained / "model", "folder", tmp_path / "hf")
    metrics = json.loads((trained / "metrics.json").read_text())["test"]
    card = (out / "README.md").read_text()
    assert str(trained / "metrics.json") in card
    for task, values in metrics.items():
        for metric, value in values.items():
            assert f"| {task} | {metric} | {value:.4f} |" in card
    assert "test_resnet" in card and "hps" in card and "mtl.load_model" in card
    reloaded, original = mtl.load_model(out), mtl.load_model(trained / "model")
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        assert all(torch.equal(reloaded(x)[t], original(x)[t]) for t in original.tasks)


def test_card_of_a_derived_model_shows_its_own_metrics_not_its_parents(trained, tmp_path):
    """A pruned folder's meta once pointed at its parent's run: the card showed the parent's numbers."""
    parent = json.loads((trained / "metrics.json").read_text())["test"]
    own = {t: {m: v + 1.0 for m, v in values.items()} for t, values in parent.items()}
    derived = save_model(mtl.load_model(trained / "model"), tmp_path / "elsewhere" / "derived",
                         meta={"run_dir": str(trained), "test": own})
    card = (mtl.export(derived, "folder", tmp_path / "hf") / "README.md").read_text()
    assert str(trained / "metrics.json") not in card and "meta.test" in card
    task, metric = next((t, m) for t, values in own.items() for m in values)
    assert f"| {task} | {metric} | {own[task][metric]:.4f} |" in card


def test_card_of_a_tall_masks_folder_shows_no_run_metrics(trained, tmp_path):
    """mtl-merge merge=tall_masks scores the per-task TALL models; its folder (θ0 + τ_MTL) says so in
    meta.tested and must not show those scores as its own."""
    parent = json.loads((trained / "metrics.json").read_text())["test"]
    folder = save_model(mtl.load_model(trained / "model"), tmp_path / "tall" / "model",
                        meta={"run_dir": str(trained), "tested": "the per-task TALL models, not this folder"})
    (tmp_path / "tall" / "metrics.json").write_text((trained / "metrics.json").read_text())
    card = (mtl.export(folder, "folder", tmp_path / "hf") / "README.md").read_text()
    task, metric = next((t, m) for t, values in parent.items() for m in values)
    assert f"| {task} | {metric} | {parent[task][metric]:.4f} |" not in card


def test_folder_task_subset_and_merge_provenance(tmp_path):
    model = mtl.load_model(_folder(tmp_path))
    folder = save_model(model, tmp_path / "merged", meta={"merge": {"method": "ties", "lam": 0.4, "k": 0.2}})
    out = mtl.export(folder, "folder", tmp_path / "hf", tasks=["depth"])
    sub = mtl.load_model(out)
    assert list(sub.tasks) == ["depth"]
    card = (out / "README.md").read_text()
    assert "method `ties`" in card and "lam=0.4" in card


def test_missing_or_corrupt_file_is_named(tmp_path):
    folder = _folder(tmp_path)
    (folder / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ModelFolderError, match=r"model\.safetensors: corrupt"):
        mtl.export(folder, "folder", tmp_path / "a")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelFolderError, match=r"model\.safetensors: file not found"):
        mtl.export(folder, "folder", tmp_path / "a")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelFolderError, match=r"config\.json: not valid JSON"):
        mtl.export(folder, "folder", tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_bad_requests_are_refused_before_anything_is_written(tmp_path):
    folder = _folder(tmp_path)
    with pytest.raises(UnknownNameError, match="unknown export format 'tflite'; valid names: folder, onnx, timm"):
        mtl.export(folder, "tflite", tmp_path / "a")
    with pytest.raises(KeyError, match=r"unknown task\(s\) \['normals'\].*semseg, depth, classification"):
        mtl.export(folder, "folder", tmp_path / "a", tasks=["normals"])
    with pytest.raises(TypeError, match="format=onnx has no option"):
        mtl.export(folder, "onnx", tmp_path / "a", opsett=17)
    with pytest.raises(ValueError, match="format.input_size must be a positive int .* got -5"):
        mtl.export(folder, "onnx", tmp_path / "a", input_size=-5)
    for batches in ([], [0], [2, -1], 3, [True]):  # an empty or zero batch list once recorded a check that never ran
        with pytest.raises(ValueError, match=r"format.verify_batches must be a non-empty list of positive ints"):
            mtl.export(folder, "onnx", tmp_path / "a", verify_batches=batches, exporter="torchscript")
    with pytest.raises(ValueError, match=r"format=timm exports the shared backbone only.*tasks=\['depth'\] does not apply"):
        mtl.export(folder, "timm", tmp_path / "a", tasks=["depth"])
    with pytest.raises(TypeError, match=r"^export: model must be a model folder \(a path\) or a loaded mtlkit model, got int$"):
        mtl.export(123, "onnx", out=tmp_path / "a")
    with pytest.raises(TypeError, match=r"^export: out must be the output folder's path, got int$"):
        mtl.export(folder, "onnx", out=123)
    from mtl.exporters import EXPORTERS

    assert "mtl.exporters.EXPORTERS" in mtl.export.__doc__ and "onnx" in EXPORTERS
    with pytest.raises(ValueError, match=r"tasks=\[\] selects no task"):
        mtl.export(folder, "folder", tmp_path / "a", tasks=[])
    with pytest.raises(ValueError, match=r"tasks names \['depth'\] more than once"):
        mtl.export(folder, "folder", tmp_path / "a", tasks=["depth", "depth"])
    for name in ("atol", "rtol"):
        with pytest.raises(ValueError, match=rf"format.{name} must be a finite number ≥ 0, got -1"):
            mtl.export(folder, "onnx", tmp_path / "a", exporter="torchscript", **{name: -1})
    assert not (tmp_path / "a").exists()
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        mtl.export(folder, "folder", existing)
    assert (existing / "keep.txt").read_text() == "mine"
    with pytest.raises(FileExistsError, match="is not an earlier export"):  # overwrite replaces exports only
        mtl.export(folder, "folder", existing, overwrite=True)
    assert (existing / "keep.txt").read_text() == "mine"
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(FileExistsError, match=r"afile exists and is a file, not an earlier export"):
        mtl.export(folder, "folder", afile, overwrite=True)
    assert afile.read_text() == "x"
    with pytest.raises(TypeError, match=r"^format.opset must be"):  # the CLI key
        mtl.export(folder, "onnx", tmp_path / "o", opset="abc")
    done = mtl.export(folder, "folder", tmp_path / "done")
    mtl.export(folder, "onnx", done, overwrite=True)
    assert (done / "model.onnx").is_file() and not (done / "model.safetensors").exists()
    # a folder holding the model (its run folder) is never replaced: that would delete the model
    with pytest.raises(ValueError, match="holds the input model folder"):
        mtl.export(folder, "folder", folder.parent, overwrite=True)
    assert (folder / "model.safetensors").is_file()
    # nor is anything written into the model folder: an input is never altered
    before = sorted(p.name for p in folder.iterdir())
    for out in (folder, folder / "onnx"):
        with pytest.raises(ValueError, match="(is|lies inside) the input model folder"):
            mtl.export(folder, "onnx", out, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == before


def test_an_exporter_failure_is_told_by_its_root_cause_without_colour_codes():
    from mtl.exporters.onnx_export import _first_line

    wrapper = RuntimeError("\x1b[96mThis is step 1/3\x1b[0m of exporting; pages of advice")
    wrapper.__cause__ = ValueError("tasks repeated\nmore detail")  # `raise ... from` sets this
    assert _first_line(wrapper) == "ValueError: tasks repeated"
    assert _first_line(RuntimeError("\x1b[1mplain\x1b[0m text")) == "plain text"


def test_verification_fails_when_runtime_and_pytorch_differ(tmp_path):
    from mtl.exporters.onnx_export import TaskGraph, verify

    folder = _folder(tmp_path)
    out = mtl.export(folder, "onnx", tmp_path / "onnx", exporter="torchscript")
    model = mtl.load_model(folder)
    with torch.no_grad():
        model.decoder.heads["depth"].body[-1].bias.add_(0.01)  # PyTorch now differs from the file by 0.01
    with pytest.raises(ExportError, match="'depth' differs from PyTorch by up to 0.01"):
        verify(TaskGraph(model, TASKS), out / "model.onnx", 32, [1], atol=1e-4, rtol=1e-3, seed=0)


def test_verification_fails_on_a_nan_output_and_on_outputs_in_another_order(tmp_path):
    """|NaN − r| > tol is False: a NaN from ONNX Runtime once passed, recorded as max |diff| 0."""
    from mtl.exporters.onnx_export import TaskGraph, verify

    folder = _folder(tmp_path)
    out = mtl.export(folder, "onnx", tmp_path / "onnx", exporter="torchscript")
    model = mtl.load_model(folder)
    with torch.no_grad():
        model.decoder.heads["depth"].body[-1].bias.fill_(float("nan"))  # PyTorch NaN: nothing to verify against
    with pytest.raises(ExportError, match="PyTorch's own output 'depth' holds NaN or Inf"):
        verify(TaskGraph(model, TASKS), out / "model.onnx", 32, [1], atol=1e-4, rtol=1e-3, seed=0)
    import onnx

    # the ONNX side NaN: depth -> log(depth - 1e6) inside the file, PyTorch unchanged
    proto = onnx.load(str(out / "model.onnx"))
    depth = proto.graph.output[1].name
    node = onnx.helper.make_node("Log", [depth + "_in"], [depth])
    for n in proto.graph.node:
        n.output[:] = [o + "_raw" if o == depth else o for o in n.output]
    shift = onnx.helper.make_tensor("big", onnx.TensorProto.FLOAT, [], [1e6])
    proto.graph.initializer.append(shift)
    proto.graph.node.extend([onnx.helper.make_node("Sub", [depth + "_raw", "big"], [depth + "_in"]), node])
    onnx.save(proto, str(tmp_path / "nan.onnx"))
    with pytest.raises(ExportError, match="ONNX Runtime output 'depth' holds NaN or Inf where PyTorch's is finite"):
        verify(TaskGraph(mtl.load_model(folder), TASKS), tmp_path / "nan.onnx", 32, [1], atol=1e-4, rtol=1e-3, seed=0)
    with pytest.raises(ExportError, match=r"outputs are \['semseg', 'depth', 'classification'\], expected"):
        verify(TaskGraph(mtl.load_model(folder), TASKS[::-1]), out / "model.onnx", 32, [1], atol=1e-4, rtol=1e-3, seed=0)


def test_card_of_a_pruned_model_never_shows_the_unpruned_runs_metrics(trained, tmp_path):
    """pruning.prune once copied the parent's meta (its run_dir and test metrics) onto the pruned model."""
    import shutil

    import pruning

    model = mtl.load_model(trained / "model")
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    pruned, _ = pruning.prune(model, "l1", example=x, ratio=0.5)
    assert "test" not in pruned.meta and "run_dir" not in pruned.meta
    assert pruned.meta["pruned_from"] == str(trained) and pruned.meta["data"] == model.meta["data"]
    parent = json.loads((trained / "metrics.json").read_text())["test"]
    task, metric = next((t, m) for t, values in parent.items() for m in values)
    for src in (pruned, save_model(pruned, tmp_path / "run" / "model", meta=pruned.meta)):
        if not isinstance(src, nn.Module):  # a pruned folder beside a training run's metrics.json
            shutil.copy(trained / "metrics.json", tmp_path / "run" / "metrics.json")
        card = (mtl.export(src, "folder", tmp_path / "hf", overwrite=True) / "README.md").read_text()
        assert "No metrics were found" in card and f"| {task} | {metric} |" not in card
        assert "Pruned with `l1` (ratio=0.5" in card and f"from `{trained}`" in card
        assert "Made by" not in card and "Training data `scenes` (image size 32)" in card
    # timm cannot rebuild a pruned backbone: the key is named with both shapes (it was "no counterpart")
    with pytest.raises(mtl.exporters.ExportError, match=r"format=timm: backbone key '.*' has shape \(\d+, .*\), "
                                                        r"timm's '.*resnet' \(\d+, "):
        mtl.export(pruned, "timm", tmp_path / "timm")


def test_card_names_the_tool_that_made_the_folder(tmp_path):
    model = mtl.load_model(_folder(tmp_path))
    folder = save_model(model, tmp_path / "p", meta={"run_dir": "/runs/prune/1", "prune": {"method": "l1"},
                                                      "data": {"name": "scenes", "size": 32}, "seed": 3})
    card = (mtl.export(folder, "folder", tmp_path / "hf") / "README.md").read_text()
    assert "Made by `mtl-prune` in `/runs/prune/1`. Training data `scenes` (image size 32), seed 3." in card
    assert "mtl-train" not in card


def test_card_of_a_merge_of_pruned_models_names_mtl_merge(tmp_path):
    """The merge inherits its θ0's pruned architecture (config.pruning); the card said it was made by mtl-prune."""
    import pruning

    pruned = pruning.prune(mtl.load_model(_folder(tmp_path)), "l1", ratio=0.3,
                           example=torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8))[0]
    folder = save_model(pruned, tmp_path / "m", meta={"run_dir": "/runs/merge/1", "merge": {"method": "ties"},
                                                       "data": {"name": "scenes", "size": 32}})
    assert json.loads((folder / "config.json").read_text())["model"].get("pruning")  # the inherited plan
    card = (mtl.export(folder, "folder", tmp_path / "hf") / "README.md").read_text()
    assert "Made by `mtl-merge` in `/runs/merge/1`." in card and "mtl-prune" not in card


@pytest.mark.parametrize("fmt", ["onnx", "timm"])
def test_a_linearized_model_is_refused_by_formats_that_would_change_its_function(tmp_path, fmt):
    from mtl.models import linearize

    lin = linearize(create_model(["depth"], backbone="test_resnet", decoder={"name": "hps", "channels": 8}))
    folder = mtl.save_model(lin, tmp_path / "lin")
    with pytest.raises(ValueError, match=rf"format={fmt} cannot export a linearized model"):
        mtl.export(folder, fmt, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    out = mtl.export(folder, "folder", tmp_path / "copy")  # the folder copy still works
    assert mtl.load_model(out).config["family"] == "linearized"


def test_card_of_a_fine_tune_names_its_start_and_its_own_run(tmp_path):
    model = mtl.load_model(_folder(tmp_path))
    folder = save_model(model, tmp_path / "ft", meta={"run_dir": "/runs/ft/1", "init_from": "/zoo/pruned",
                                                       "data": {"name": "scenes", "size": 32}, "seed": 5})
    card = (mtl.export(folder, "folder", tmp_path / "hf") / "README.md").read_text()
    assert "Made by `mtl-train` in `/runs/ft/1`. Training data `scenes` (image size 32), seed 5." in card
    assert "Fine-tuned by `mtl-train` from the model folder `/zoo/pruned`." in card


def test_card_of_a_merge_lists_its_inputs_and_omits_an_unknown_seed(tmp_path):
    model = mtl.load_model(_folder(tmp_path))
    folder = save_model(model, tmp_path / "m", meta={
        "merge": {"method": "ties"}, "run_dir": "/runs/merge/1", "data": {"name": "scenes"},
        "merged_from": {"pretrained": "/zoo/pre", "models": ["/zoo/a", "/zoo/b"]}})
    card = (mtl.export(folder, "folder", tmp_path / "hf") / "README.md").read_text()
    assert "Made by `mtl-merge` in `/runs/merge/1`. Training data `scenes`." in card
    assert "Merge inputs: pretrained `/zoo/pre`; fine-tuned `/zoo/a`, `/zoo/b`." in card


def test_onnx_of_a_model_trained_on_non_square_images_exports_at_their_h_w(tmp_path):
    """meta.data.size=[H, W] (nyuv2/cityscapes) is the default input; format.input_size takes [H, W] too."""
    import onnxruntime as ort

    model = mtl.load_model(_folder(tmp_path))
    folder = save_model(model, tmp_path / "hw", meta={"data": {"name": "nyuv2", "size": [24, 40]}})
    for size, want in ((None, [24, 40]), ([16, 32], [16, 32])):
        out = mtl.export(folder, "onnx", tmp_path / f"o{want[0]}", input_size=size, exporter="torchscript")
        report = json.loads((out / "export.json").read_text())
        assert report["input"]["shape"] == ["batch", 3, *want]
        assert f"np.zeros((4, 3, {want[0]}, {want[1]})" in (out / "README.md").read_text()
        sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        assert [d for d in sess.get_inputs()[0].shape[2:]] == want
    with pytest.raises(ValueError, match=r"format.input_size must be .* \[H, W\] of positive ints, or null, got \[16, 0\]"):
        mtl.export(folder, "onnx", tmp_path / "bad", input_size=[16, 0])


def test_an_input_below_the_backbone_stride_is_exported_with_a_warning(tmp_path, caplog):
    """test_resnet's deepest stage has stride 16: [8, 32] leaves it one pixel high; 16 does not warn."""
    folder = _folder(tmp_path)
    with caplog.at_level("WARNING", logger="mtl.exporters.onnx_export"):
        mtl.export(folder, "onnx", tmp_path / "ok", input_size=16, exporter="torchscript")
        assert "output stride" not in caplog.text
        out = mtl.export(folder, "onnx", tmp_path / "small", input_size=[8, 32], exporter="torchscript")
    assert "format.input_size=[8, 32] is below the backbone's output stride 16" in caplog.text
    assert (out / "model.onnx").is_file()


def test_a_subset_card_says_its_delta_m_is_the_whole_models():
    from mtl.exporters.api import Source
    from mtl.exporters.card import _metric_rows

    src = Source(nn.Identity(), None, {}, metrics={"depth": {"rmse": 1.0}, "semseg": {"miou": 0.5}},
                 run_metrics={"delta_m": {"value": -3.25, "variant": "test", "baselines": "b.json"}})
    whole = "\n".join(_metric_rows(src, ["semseg", "depth"]))
    subset = "\n".join(_metric_rows(src, ["depth"]))
    assert "Δm = -3.25% (test metrics)" in whole and "whole model" not in whole
    assert "Δm = -3.25% of the whole model it was taken from (tasks depth, semseg; not of this subset)" in subset
    assert "| semseg |" not in subset


def test_a_composite_operator_is_located_in_its_module():
    """scaled_dot_product_attention runs as `_scaled_dot_product_flash_attention_for_cpu`: the operator is found
    by the Python-level call, not only by kernel names."""
    from mtl.exporters.onnx_export import locate_operator

    class Attn(nn.Module):
        def forward(self, x):
            return nn.functional.scaled_dot_product_attention(x, x, x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Sequential(nn.Identity(), Attn())

        def forward(self, x, tasks=None):
            return {"t": self.inner(x)}

    where = locate_operator(Net(), torch.randn(1, 2, 4, 8), ["t"], "aten::scaled_dot_product_attention")
    assert where == "inner.1 (Attn)"


def test_an_operator_called_from_a_method_other_than_forward_is_located_in_that_module(tmp_path):
    """The MoE decoder's experts run through ``decoder.shared()`` -> ``experts.dense()``, never a forward():
    the error must name them, not the whole model (einsum needs opset 12, so torchscript at 11 refuses)."""
    model = create_model(["depth"], backbone=BACKBONES["test_resnet"],
                         decoder={"name": "moe", "channels": 8, "num_experts": 2})
    with pytest.raises(ExportError, match=r"operator 'aten::einsum' used in module decoder\.experts\.\d+ "
                                          r"\(StackedExperts\)"):
        mtl.export(model, "onnx", tmp_path / "out", exporter="torchscript", opset=11, input_size=32)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt", ["onnx", "timm", "folder", "read-only"])
def test_a_full_disk_or_read_only_place_is_one_line_naming_the_output(tmp_path, monkeypatch, fmt):
    """Whatever layer meets the storage error (the ONNX exporter, timm's safetensors writer, a nested
    save_model, the temporary folder itself), the error names `out` and the OS's reason, once."""
    import errno
    import os
    import re

    import mtl.atomic
    import mtl.io
    import safetensors.torch
    from safetensors import SafetensorError

    folder = _folder(tmp_path)
    out = tmp_path / "exports" / "out"
    code = errno.EROFS if fmt == "read-only" else errno.ENOSPC

    def full(*args, **kwargs):
        if fmt == "onnx":  # a partial file first: it must not be left behind either
            with open(args[2], "wb") as f:
                f.write(b"partial")
            raise OSError(code, os.strerror(code))
        raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")

    real_mkdtemp = mtl.atomic.tempfile.mkdtemp

    def read_only(*args, dir=None, **kwargs):
        if dir is not None and str(dir) == str(out.parent):
            raise OSError(code, os.strerror(code), os.path.join(dir, kwargs.get("prefix", "") + "x1y2"))
        return real_mkdtemp(*args, dir=dir, **kwargs)

    if fmt == "onnx":
        monkeypatch.setattr(torch.onnx, "export", full)
    elif fmt == "timm":
        monkeypatch.setattr(safetensors.torch, "save_file", full)  # what timm's save_for_hf calls
    elif fmt == "folder":
        monkeypatch.setattr(mtl.io, "save_file", full)
    else:
        monkeypatch.setattr(mtl.atomic.tempfile, "mkdtemp", read_only)
    with pytest.raises(OSError) as e:
        if fmt in ("timm", "folder"):
            mtl.export(folder, fmt, out)
        else:
            mtl.export(folder, "onnx", out, exporter="torchscript")
    assert str(e.value) == f"[Errno {code}] {out}: cannot write this output ({os.strerror(code)})"
    assert e.value.errno == code and not re.search(r"\.tmp-", str(e.value))
    assert not (tmp_path / "exports").exists()  # nor the parent folder made for it


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_a_model_that_is_not_float32_is_refused_before_export(tmp_path, dtype):
    model = mtl.load_model(_folder(tmp_path)).to(dtype)
    with pytest.raises(ValueError, match=rf"export: key '.*' is {dtype}; export float32 models \(call model.float"):
        mtl.export(model, "onnx", tmp_path / "out")
    assert not (tmp_path / "out").exists() and next(model.parameters()).dtype == dtype


def test_a_folder_export_records_the_task_order_it_holds(tmp_path):
    folder = _folder(tmp_path)
    order = list(reversed(mtl.load_model(folder).tasks))[:2]
    out = mtl.export(folder, "folder", tmp_path / "f", tasks=order)
    held = list(mtl.load_model(out).tasks)
    assert sorted(held) == sorted(order) and read_report(out)["tasks"] == held


def test_the_card_of_a_model_its_run_did_not_test_says_whose_metrics_those_were():
    from mtl.exporters.api import Source
    from mtl.exporters.card import _metric_rows

    src = Source(nn.Identity(), None, {}, meta={"tested": "each task's TALL model θ0 + m_t ∘ τ_MTL, rebuilt from s"})
    (row,) = _metric_rows(src, ["depth"])
    assert row.startswith("Not tested itself: its run's test metrics describe other models — each task's TALL model")
    assert "No metrics were found" not in row


def test_a_null_delta_m_in_the_runs_metrics_is_said_not_formatted():
    from mtl.exporters.api import Source
    from mtl.exporters.card import _metric_rows

    src = Source(nn.Identity(), None, {}, metrics={"depth": {"rmse": 1.0}},
                 run_metrics={"delta_m": {"value": None, "variant": "test", "baselines": "b.json"}})
    assert "Δm vs the single-task baselines is not defined for this run" in "\n".join(_metric_rows(src, ["depth"]))


def test_loading_and_timm_export_leave_the_callers_random_stream_alone(tmp_path):
    folder = _folder(tmp_path, "test_resnet")
    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    mtl.load_model(folder)
    mtl.export(folder, "timm", tmp_path / "timm")
    assert torch.equal(torch.rand(3), want)


def test_timm_takes_every_task_in_any_order(tmp_path):
    """The whole task list is the whole backbone whatever its order; it was refused unless in the model's order."""
    folder = _folder(tmp_path)
    tasks = list(mtl.load_model(folder).tasks)
    out = mtl.export(folder, "timm", tmp_path / "t", tasks=tasks[::-1])
    assert (out / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="does not apply"):
        mtl.export(folder, "timm", tmp_path / "u", tasks=tasks[1:])


def test_export_expands_a_leading_tilde(tmp_path, monkeypatch, home_and_cwd):
    """export(..., "~/e1") wrote ./~/e1 in the working directory and returned '~/e1'; readers take ~ as $HOME."""
    home, cwd = home_and_cwd
    m = create_model(tasks=[{"name": "classification", "kind": "classification", "num_classes": 3}],
                     backbone="test_resnet")
    out = mtl.export(m, "folder", "~/e1")
    assert out == home / "e1" and set(mtl.load_model("~/e1").tasks) == {"classification"}
    assert list(cwd.iterdir()) == []
