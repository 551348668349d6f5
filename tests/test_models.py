import pytest
import torch

import mtl

from mtl.models import create_model
from mtl.registry import UnknownNameError

ALL = ["semseg", "depth", "normals", "edges", "classification", "regression"]


def test_forward_shapes_all_tasks(tiny_model):
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    out = tiny_model(x)
    assert set(out) == set(ALL)
    assert out["semseg"].shape == (2, 5, 32, 32)
    assert out["normals"].shape == (2, 3, 32, 32)
    assert out["classification"].shape == (2, 3)
    assert out["regression"].shape == (2, 1)


def test_task_subset_runs_only_requested_heads(tiny_model):
    calls = []
    for name, head in tiny_model.decoder.heads.items():
        head.register_forward_hook(lambda m, i, o, name=name: calls.append(name))
    out = tiny_model(torch.randn(2, 3, 32, 32), tasks=["depth", "edges"])
    assert set(out) == {"depth", "edges"}
    assert sorted(calls) == ["depth", "edges"]


def test_subset_equals_full_forward(tiny_model):
    tiny_model.eval()
    x = torch.randn(2, 3, 32, 32)
    full = tiny_model(x)
    part = tiny_model(x, tasks="normals")
    assert torch.equal(full["normals"], part["normals"])


def test_unknown_task_in_forward(tiny_model):
    with pytest.raises(KeyError, match="this model has"):
        tiny_model(torch.randn(1, 3, 32, 32), tasks=["sky"])


def test_uint8_input_is_normalised(tiny_model):
    tiny_model.eval()
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    xf = (x.float() / 255 - tiny_model.mean) / tiny_model.std
    assert torch.allclose(tiny_model(x)["depth"], tiny_model(xf)["depth"], atol=1e-6)


def test_parameter_groups_partition_the_model(tiny_model):
    shared = {id(p) for p in tiny_model.shared_parameters()}
    heads = [{id(p) for p in tiny_model.task_parameters(t)} for t in ALL]
    assert all(shared.isdisjoint(h) for h in heads)
    assert len(shared) + sum(len(h) for h in heads) == len(list(tiny_model.parameters()))


def test_vit_backbone_token_grid():
    m = create_model(["semseg", "classification"], backbone={"name": "test_vit", "img_size": 32, "patch_size": 4},
                     decoder={"name": "hps", "channels": 16})
    out = m(torch.randn(2, 3, 32, 32))
    assert out["semseg"].shape == (2, 5, 32, 32)


def test_channels_last_timm_features_reach_the_decoder_as_nchw():
    """timm's MambaOut returns its stages as (B, H, W, C) (feature_info's output_fmt 'NHWC'): the decoder's
    1x1 projections read (B, C, H, W), so each map must be timm's own with its last axis moved to the front."""
    import timm

    x = torch.randn(2, 3, 64, 64)
    m = create_model(["depth", "classification"], backbone="test_mambaout", decoder={"name": "hps", "channels": 8}).eval()
    raw = timm.create_model("test_mambaout", features_only=True)
    raw.load_state_dict(m.backbone.body.state_dict())
    with torch.no_grad():
        ours, theirs = m.backbone(x), raw(x)
        out = m(x)
    for f, t, c, r in zip(ours, theirs, m.backbone.channels, m.backbone.reductions):
        assert t.shape == (2, 64 // r, 64 // r, c) and torch.equal(f, t.permute(0, 3, 1, 2))
    assert out["depth"].shape == (2, 1, 64, 64)


def test_a_fixed_size_timm_backbone_names_its_size_and_img_size_makes_it_run():
    """timm builds CoAtNet's windows and relative-position tables for one input size (img_size, default 160)."""
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    default = create_model(["depth"], backbone="test_coatnet", decoder={"name": "hps", "channels": 8}).eval()
    with pytest.raises(ValueError, match=r"^backbone test_coatnet is built for 160x160 inputs .* failed on 64x64 "
                                         r"\(.*\); build it with backbone.img_size=64 \(mtl-train: \+\+backbone.img_size=64\)$"):
        default(x)
    sized = create_model(["depth"], backbone={"name": "test_coatnet", "img_size": 64}, decoder={"name": "hps", "channels": 8})
    with torch.no_grad():
        assert sized.eval()(x)["depth"].shape == (2, 1, 64, 64)


@pytest.mark.parametrize("name", ["test_coatnet", "test_maxvit", "test_vit3", "test_vit_relpos"])
def test_timms_size_errors_are_told_as_a_wrong_img_size(name):
    from mtl.models.backbones import create_backbone

    with pytest.raises(ValueError, match=rf"^backbone {name} is built for 160x160 inputs .*backbone.img_size=64"):
        create_backbone(name).eval()(torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize("name", ["test_coatnet", "test_maxvit"])  # (a ViT checks the size before the channels)
def test_other_errors_at_another_size_are_timms_own(name):
    """Any error at another size was told as 'built for 160x160 ... backbone.img_size=64', a wrong channel count
    and a model built with dynamic_img_size=True (which takes any size) included."""
    from mtl.models.backbones import create_backbone

    with pytest.raises(RuntimeError, match=r"to have 3 channels, but got 1") as caught:
        create_backbone(name).eval()(torch.randn(1, 1, 64, 64))
    assert "built for" not in str(caught.value)


def test_a_dynamic_size_vit_reports_timms_own_error():
    from mtl.models.backbones import create_backbone

    backbone = create_backbone("test_vit3", dynamic_img_size=True).eval()
    assert len(backbone(torch.randn(1, 3, 64, 64))) > 0
    with pytest.raises(RuntimeError, match=r"to have 3 channels, but got 1") as caught:
        backbone(torch.randn(1, 1, 64, 64))
    assert "built for" not in str(caught.value)


def test_unknown_backbone_and_decoder_names():
    with pytest.raises(UnknownNameError, match="unknown timm backbone"):
        create_model(["depth"], backbone="resnet_does_not_exist")
    with pytest.raises(UnknownNameError, match="valid names: hps"):
        create_model(["depth"], backbone="test_resnet", decoder="nope")


def test_unknown_task_name_lists_valid():
    with pytest.raises(UnknownNameError, match="semseg"):
        create_model(["sky"], backbone="test_resnet")


def test_one_task_name_is_one_task_not_its_letters():
    from mtl.models import create_model

    assert list(create_model("depth", backbone="test_resnet").tasks) == ["depth"]


def test_a_folder_of_a_model_built_from_a_checkpoint_file_rebuilds_without_it(tmp_path):
    """backbone.checkpoint_path / pretrained say where the initial weights came from; the folder holds
    the weights, so its config must not send load_model back to that file (or the Hub)."""
    import timm
    from safetensors.torch import save_file

    import mtl

    ckpt = tmp_path / "init.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("test_resnet").state_dict().items()}, str(ckpt))
    model = create_model(["depth"], backbone={"name": "test_resnet", "checkpoint_path": str(ckpt)}).eval()
    folder = mtl.save_model(model, tmp_path / "model")
    ckpt.unlink()
    reloaded = mtl.load_model(folder)
    assert "checkpoint_path" not in reloaded.config["backbone"]
    x = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(model(x)["depth"], reloaded(x)["depth"])


def test_pretrained_weights_that_cannot_be_fetched_name_the_key_and_the_way_out(monkeypatch):
    import timm

    def offline(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise OSError("We couldn't connect to 'https://huggingface.co'.\nretrying ...")
        return real(*args, **kwargs)

    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(RuntimeError, match=r"backbone.pretrained=true: timm could not get the weights of 'resnet18' "
                                           r"\(We couldn't connect .*\); give a local file with backbone.checkpoint_path"):
        create_model(["depth"], backbone={"name": "resnet18", "pretrained": True})
    create_model(["depth"], backbone={"name": "test_resnet"})  # without pretrained nothing is fetched


@pytest.mark.parametrize("kwargs, message", [
    ({"backbone": {"name": "test_resnet", "out_indices": [9]}}, r"backbone.out_indices=\[9\]: test_resnet has 5 feature stages"),
    ({"decoder": {"name": "hps", "channels": 0}}, r"decoder.channels must be an int >= 1, got 0"),
    ({"mean": [0.5]}, r"model mean must be 3 finite numbers \(R, G, B\), got \[0.5\]"),
    ({"std": [0.2, 0.0, 0.2]}, r"model std must be 3 finite numbers \(R, G, B\), each > 0"),
    ({"decoder": {"name": "moe", "stages": [1, 1]}}, r"decoder.stages \[1, 1\] name a stage more than once"),
])
def test_bad_construction_values_are_named_not_torch_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_model(["depth"], **{"backbone": "test_resnet", **kwargs})


@pytest.mark.parametrize("name, family, indices", [
    ("test_resnet", None, [3, 1]),  # timm returns stage order: channels [192, 32] met maps of 32 then 192
    ("test_resnet", None, [2, 2]),  # declared [48, 48], one map returned
    ("test_resnet", None, [-1, 1]),  # -1 is stage 4: out of order once resolved
    ("test_resnet", None, []),
    ("test_resnet", None, 2),
    ("test_resnet", None, "1,2"),
    ("slim_resnet", "slimmable", [3, 1]),
])
def test_out_indices_must_be_distinct_increasing_stages(name, family, indices):
    with pytest.raises(ValueError, match=r"^backbone.out_indices must be a non-empty list of distinct increasing ints"):
        create_model(["depth"], backbone={"name": name, "out_indices": indices}, family=family,
                     decoder="slimmable" if family else None)


def test_out_indices_in_stage_order_match_the_maps_returned():
    model = create_model(["depth"], backbone={"name": "test_resnet", "out_indices": [1, -1]})
    maps = model.backbone(torch.randn(1, 3, 64, 64))
    assert [m.shape[1] for m in maps] == model.backbone.channels


def test_pretrained_must_be_a_bool_not_a_truthy_string(monkeypatch):
    """Hydra reads +backbone.pretrained=no as the string 'no', which is truthy: timm went to the Hub."""
    import timm

    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("timm was asked for a model"))
    with pytest.raises(ValueError, match=r"^backbone.pretrained must be true or false, got 'no'$"):
        create_model(["depth"], backbone={"name": "resnet18", "pretrained": "no"})


def test_prediction_pictures_give_each_class_one_colour_and_mask_unlabelled_pixels(tmp_path, monkeypatch):
    """Class ids were drawn on each pair's own min..max: with NYUv2's 255 the 13 classes shared the bottom 5 %
    of the colour map, and a class changed colour from row to row."""
    import numpy as np
    from matplotlib.axes import Axes

    from mtl.viz import save_predictions

    model = mtl.create_model([mtl.create_task("semseg", num_classes=13)], backbone="test_resnet")
    target = torch.randint(0, 13, (2, 16, 16))
    target[:, :4] = 255
    shown = []
    real = Axes.imshow
    monkeypatch.setattr(Axes, "imshow", lambda self, img, **kw: (shown.append((img, kw)), real(self, img, **kw))[1])
    save_predictions(model, {"image": torch.randint(0, 255, (2, 3, 16, 16), dtype=torch.uint8), "semseg": target},
                     tmp_path / "p.png", num_samples=2)
    maps = [(img, kw) for img, kw in shown if kw.get("cmap") is not None]
    assert len(maps) == 4  # prediction and target of two rows
    assert all(kw["vmin"] == -0.5 and kw["vmax"] == 12.5 for _, kw in maps)
    targets = [img for img, _ in maps[1::2]]
    assert all(np.ma.isMaskedArray(t) and t.mask[:4].all() and not t.mask[4:].any() for t in targets)


def test_prediction_pictures_name_image_level_classes(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    from mtl.viz import save_predictions

    model = mtl.create_model([mtl.create_task("classification", num_classes=3)], backbone="test_resnet")
    texts = []
    monkeypatch.setattr(Axes, "text", lambda self, x, y, s, **kw: texts.append(s))
    save_predictions(model, {"image": torch.randint(0, 255, (2, 3, 16, 16), dtype=torch.uint8),
                             "classification": torch.tensor([0, 2])}, tmp_path / "p.png", num_samples=2,
                     class_names={"classification": ["cube", "sphere", "cone"]})
    assert texts[1::2] == ["cube", "cone"] and set(texts[0::2]) <= {"cube", "sphere", "cone"}


def _every_family():
    from mtl.models import linearize

    hps = {"name": "test_resnet", "out_indices": [1, 2, 3]}
    return {
        "multitask": create_model(["depth"], backbone=hps, decoder={"name": "moe", "channels": 8, "num_experts": 2}),
        "slimmable": create_model(["depth"], backbone={"name": "slim_resnet", "stem": 8, "channels": [8, 16, 16],
                                                       "depths": [1, 1, 1], "out_indices": [1, 2, 3]},
                                  decoder={"name": "slimmable", "channels": 8}, family="slimmable"),
        "task_moe_vit": create_model(["depth"], backbone={"img_size": 32, "patch_size": 8, "embed_dim": 16, "depth": 2,
                                                          "num_heads": 2}, decoder={"num_experts": 4, "top_k": 2},
                                     family="task_moe_vit"),
        "linearized": linearize(create_model(["depth"], backbone=hps)),
    }


@pytest.mark.parametrize("family", ["multitask", "slimmable", "task_moe_vit", "linearized"])
def test_float_input_in_another_dtype_than_the_model_is_named_not_a_torch_error(family):
    """Float input is taken as already normalised (docs/training.md, Inputs), so it is not cast: a float64 or
    bf16 batch for a float32 model failed inside the first layer with "Input type (double) and bias type
    (float) should be the same". uint8, same-dtype float and autocast's own casting keep working."""
    model = _every_family()[family].eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        for dtype in (torch.float64, torch.bfloat16, torch.int64):
            with pytest.raises(TypeError, match=rf"^input images are {dtype} but the model's weights are "
                                                rf"torch.float32: pass uint8 images"):
                model(x.to(dtype))
        assert model(x)["depth"].dtype == torch.float32
        assert model((x * 255).to(torch.uint8))["depth"].dtype == torch.float32
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts float32 and bf16 input per op
            for dtype in (torch.float32, torch.bfloat16):
                assert model(x.to(dtype))["depth"].shape[0] == 2
            with pytest.raises(TypeError, match="input images are torch.float64"):  # autocast leaves float64 as is
                model(x.double())
        assert model.double()(x.double())["depth"].dtype == torch.float64


def test_config_with_other_arguments_is_refused_naming_them(tiny_model):
    with pytest.raises(ValueError, match=r"^create_model: config= describes the whole model; leave out tasks, "
                                         r"backbone, family \(or edit"):
        create_model(["normals"], backbone="resnet18", family="slimmable", config=tiny_model.config)
    with pytest.raises(ValueError, match=r"leave out decoder, channels "):
        create_model(decoder="moe", channels=8, config=tiny_model.config)
    assert type(create_model(config=tiny_model.config)) is type(tiny_model)


def test_a_config_missing_a_key_names_it():
    with pytest.raises(ValueError, match=r"^model config has no 'backbone' key \(family 'multitask' needs tasks, backbone\)"):
        create_model(config={"tasks": []})
    with pytest.raises(ValueError, match=r"^model config has no 'tasks' key \(family 'task_moe_vit'"):
        create_model(config={"family": "task_moe_vit"})
    with pytest.raises(TypeError, match=r"^a model config must be a dict \(a model's .config\), got list"):
        create_model(config=["depth"])


@pytest.mark.parametrize("kwargs, error, message", [
    ({"tasks": [{"name": "depth", "weight": 2.0}]}, ValueError,
     r"^task config \{'name': 'depth', 'weight': 2.0\} has no 'kind' key \(the task type, e.g. \{'kind': 'depth'"),
    ({"tasks": [3]}, TypeError, r"^a task must be a name, a Task or a task config \(a dict with 'kind'\), got 3$"),
    ({"tasks": 3}, TypeError, r"^create_model: tasks must be a list of task names, Tasks or task configs, got 3$"),
    ({"backbone": 3}, TypeError, r"^backbone must be a name or a dict of settings with its 'name' \(e.g. \{'name': 'resnet18'\}\), got 3$"),
    ({"backbone": {"out_indices": [1]}}, TypeError, r"^backbone must be a name or a dict of settings with its 'name'"),
    ({"decoder": ["hps"]}, TypeError, r"^decoder must be a name or a dict of settings with its 'name'"),
    ({"backbone": {"name": "test_resnet", "out_indice": [1]}}, TypeError,
     r"^unknown setting backbone.out_indice \(did you mean backbone.out_indices\?\); the settings here are: out_indices, "
     r"pretrained, checkpoint_path and the keyword arguments of timm's 'test_resnet' \(ResNet.__init__\(\) got an unexpected"),
    ({"backbone": {"name": "test_vit3", "drop_pth_rate": 0.1}}, TypeError,  # a keyword of timm's class
     r"^unknown setting backbone.drop_pth_rate \(did you mean backbone.drop_path_rate\?\); the settings here are"),
    ({"backbone": {"name": "slim_resnet", "widthz": [1.0]}, "decoder": "slimmable", "family": "slimmable"}, TypeError,
     r"^unknown setting backbone.widthz \(did you mean backbone.widths\?\); the settings here are: stem, channels, depths, "
     r"out_indices, widths$"),
    ({"decoder": {"name": "hps", "zzz": 1}}, TypeError,  # nothing close: no guess
     r"^unknown setting decoder.zzz; the settings here are: "),
])
def test_malformed_tasks_backbone_and_decoder_are_named(kwargs, error, message):
    with pytest.raises(error, match=message):
        create_model(**{"tasks": ["depth"], "backbone": "test_resnet", **kwargs})


def test_timm_keyword_arguments_still_pass_through_the_backbone_settings():
    m = create_model(["depth"], backbone={"name": "test_vit", "img_size": 64, "drop_path_rate": 0.1})
    assert m(torch.zeros(1, 3, 64, 64))["depth"].shape == (1, 1, 64, 64)
    assert create_model([{"kind": "depth", "name": "d2", "weight": 2.0}], backbone="test_resnet").tasks["d2"].weight == 2.0


@pytest.mark.parametrize("kwargs, message", [
    ({"channels": 3}, r"^create_model: channels=3 is no option of family multitask \(its options: mean, std\); it is a "
                      r"decoder setting: pass decoder=\{'name': 'hps', 'channels': 3\}$"),
    ({"out_indices": [1, 2]}, r"it is a backbone setting: pass backbone=\{'name': 'test_resnet', 'out_indices': \[1, 2\]\}"),
    ({"chanels": 3}, r"chanels=3 is no option of family multitask \(its options: mean, std\) \(did you mean decoder.channels\?\)"),
    ({"family": "linearized", "norm": "layer"}, r"no option of family linearized .* pass decoder=\{'name': 'hps', 'norm'"),
    ({"foo": 1}, r"foo=1 is no option of family multitask \(its options: mean, std\)$"),
])
def test_a_keyword_the_family_does_not_take_is_named_with_where_it_belongs(kwargs, message):
    """It reached the family class: "MultiTaskModel.__init__() got an unexpected keyword argument"."""
    with pytest.raises(TypeError, match=message):
        create_model(["depth"], backbone="test_resnet", **kwargs)


def test_an_unknown_decoder_norm_names_the_decoder_key():
    with pytest.raises(ValueError, match=r"^decoder.norm must be one of \('batch', 'layer'\), got 'group'$"):
        create_model(["depth"], backbone="test_resnet", decoder={"name": "hps", "norm": "group"})


@pytest.mark.parametrize("family, backbone, decoder", [
    ("slimmable", "slim_resnet", "slimmable"), ("linearized", "resnet18", "hps"), ("task_moe_vit", None, None)])
def test_a_left_out_backbone_and_decoder_are_the_familys_own_defaults(family, backbone, decoder):
    """The multitask defaults (resnet18, hps) went to every family: task_moe_vit and slimmable refused them."""
    from mtl.models.task_moe_vit import MOE_DEFAULTS, VIT_DEFAULTS

    cfg = create_model(["depth"], family=family).config
    assert cfg["family"] == family
    if family == "task_moe_vit":  # its settings' own defaults
        assert {k: cfg["backbone"][k] for k in VIT_DEFAULTS} == VIT_DEFAULTS
        assert cfg["decoder"]["num_experts"] == MOE_DEFAULTS["num_experts"]
    else:
        assert (cfg["backbone"]["name"], cfg["decoder"]["name"]) == (backbone, decoder)


def test_a_family_without_defaults_asks_for_backbone_and_decoder(monkeypatch):
    from mtl.models import MODELS

    class Bare(torch.nn.Module):
        def __init__(self, tasks, backbone, decoder):
            super().__init__()

    monkeypatch.setitem(MODELS._items, "bare", Bare)
    with pytest.raises(ValueError, match=r"^create_model: family bare has no default backbone or decoder; pass "
                                         r"backbone= and decoder=$"):
        create_model(["depth"], family="bare", backbone="test_resnet")
