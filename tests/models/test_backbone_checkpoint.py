"""backbone.checkpoint_path: every tensor the features need comes from the file, or the build is refused."""
import pytest
import torch
from safetensors.torch import save_file

from mtl.models import create_model


@pytest.fixture(scope="module")
def resnet_weights():
    import timm

    return {k: v.contiguous() for k, v in timm.create_model("test_resnet").state_dict().items()}


def build(path, **backbone):
    return create_model(["depth"], backbone={"name": "test_resnet", "checkpoint_path": str(path), **backbone})


@pytest.mark.parametrize("keep, lacks, first", [
    (lambda k: not k.startswith("layer4"), 15, "layer4.0.conv1.weight"),  # part of the backbone
    (lambda k: False, 75, "conv1.0.weight"),  # keys that match nothing
])
def test_a_file_lacking_tensors_the_features_need_is_refused(tmp_path, resnet_weights, keep, lacks, first):
    path = tmp_path / "w.safetensors"
    save_file({k: v for k, v in resnet_weights.items() if keep(k)} or {"foo": torch.zeros(1)}, str(path))
    with pytest.raises(ValueError, match=rf"^backbone.checkpoint_path={path}: the file lacks {lacks} of the 75 tensors "
                                         rf"timm's 'test_resnet' features need \(first: {first}; "):
        build(path)


def test_an_mtlkit_folders_prefixed_keys_are_refused_naming_the_prefix(tmp_path, resnet_weights):
    path = tmp_path / "w.safetensors"
    save_file({"backbone.body." + k: v for k, v in resnet_weights.items()}, str(path))
    with pytest.raises(ValueError, match=r"lacks 75 of the 75 .* its keys carry the prefix 'backbone.body.' "
                                         r"\(an mtlkit model folder's weights: start from the folder with init_from"):
        build(path)


def test_a_shape_mismatch_is_one_line_naming_the_key_and_both_shapes(tmp_path, resnet_weights):
    path = tmp_path / "w.safetensors"
    save_file({**resnet_weights, "layer1.0.conv1.weight": torch.zeros(3, 3, 3, 3)}, str(path))
    with pytest.raises(ValueError, match=rf"^backbone.checkpoint_path={path}: layer1.0.conv1.weight has shape "
                                         r"\(3, 3, 3, 3\) in the file, \(32, 32, 3, 3\) in timm's 'test_resnet' as "
                                         r"built \(1 tensor\(s\) differ") as info:
        build(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name, save", [
    ("w.safetensors", lambda sd, p: save_file({k: v for k, v in sd.items() if not k.startswith("fc.")}, p)),  # no head
    ("w.safetensors", lambda sd, p: save_file({"module." + k: v for k, v in sd.items()}, p)),  # DDP prefix
    ("w.pth", lambda sd, p: torch.save({"state_dict": sd}, p)),
])
def test_files_timm_reads_whole_load_their_weights(tmp_path, resnet_weights, name, save):
    path = tmp_path / name
    save(resnet_weights, str(path))
    loaded = build(path).backbone.body.state_dict()
    assert all(torch.equal(v, resnet_weights[k]) for k, v in loaded.items())


def test_only_the_stages_out_indices_use_are_needed(tmp_path, resnet_weights):
    path = tmp_path / "w.safetensors"
    save_file({k: v for k, v in resnet_weights.items() if not k.startswith("layer4")}, str(path))
    build(path, out_indices=[1, 2, 3])


def test_a_layout_timm_converts_and_an_exported_backbone_load(tmp_path):
    """An OpenCLIP-style 'visual.trunk.' ViT is converted by timm's own filter; format=timm writes plain names."""
    import timm

    import mtl

    vit = {k: v.contiguous() for k, v in timm.create_model("test_vit").state_dict().items()}
    save_file({"visual.trunk." + k: v for k, v in vit.items()}, str(tmp_path / "clip.safetensors"))
    model = create_model(["depth"], backbone={"name": "test_vit", "checkpoint_path": str(tmp_path / "clip.safetensors")})
    assert torch.equal(model.backbone.body.model.blocks[0].attn.qkv.weight, vit["blocks.0.attn.qkv.weight"])
    out = mtl.export(mtl.save_model(model, tmp_path / "m"), "timm", tmp_path / "t")
    again = create_model(["depth"], backbone={"name": "test_vit", "checkpoint_path": str(out / "model.safetensors")})
    assert all(torch.equal(v, model.backbone.body.state_dict()[k]) for k, v in again.backbone.body.state_dict().items())
