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


def test_a_features_only_state_dict_is_refused_and_a_plain_one_loads_tensor_for_tensor(tmp_path):
    """The coverage check read every '_' as '.' in both the file's keys and the model's, so a features_only state
    dict (``stem_0.weight``) passed it, while timm loads by exact name (strict=False) and loaded none of it: the
    backbone trained from random weights. Only the model side is a features wrapper's; the file's keys must be the
    plain model's, exactly."""
    import timm

    from mtl.models.backbones import TimmBackbone

    torch.manual_seed(0)
    feat = tmp_path / "feat.pth"
    torch.save(timm.create_model("convnext_atto", features_only=True).state_dict(), feat)
    with pytest.raises(ValueError, match=rf"^backbone.checkpoint_path={feat}: the file lacks 124 of the 124 tensors "
                                         r"timm's 'convnext_atto' features need \(first: stem.0.weight; .*its keys look "
                                         r"like a features-only state dict \('stem_0.weight' where timm's 'convnext_atto' "
                                         r"has 'stem.0.weight'"):
        TimmBackbone("convnext_atto", checkpoint_path=str(feat))
    plain = {k: torch.randn_like(v) if v.is_floating_point() else v
             for k, v in timm.create_model("convnext_atto").state_dict().items()}
    torch.save(plain, tmp_path / "plain.pth")
    body = TimmBackbone("convnext_atto", checkpoint_path=str(tmp_path / "plain.pth")).body.state_dict()
    as_plain = {k: k.replace("stem_", "stem.", 1).replace("stages_", "stages.", 1) for k in body}  # timm's flattening
    assert len(body) == 124 and all(torch.equal(body[k], plain[as_plain[k]]) for k in body)


def test_a_checkpoint_file_pickling_more_than_tensors_is_refused_naming_the_key_file_and_global(tmp_path):
    """A research checkpoint holding a datetime beside its weights gave timm's raw 'weights_only=True blocked ...
    retry with weights_only=False', naming neither the setting nor the file and advising what runs the file's code."""
    import datetime

    import timm

    from mtl.models.backbones import TimmBackbone

    path = tmp_path / "ckpt.pth"
    torch.save({"model": timm.create_model("test_resnet").state_dict(), "saved": datetime.datetime(2024, 1, 1)}, path)
    with pytest.raises(ValueError) as e:
        TimmBackbone("test_resnet", checkpoint_path=str(path))
    assert str(e.value) == (f"backbone.checkpoint_path={path}: refused, it needs unpickling beyond tensors and plain data "
                            "(unsupported GLOBAL datetime.datetime; a weights-only torch.load blocks it); re-save the "
                            "state dict alone (torch.save(state_dict, file)) or as .safetensors (safetensors.torch.save_file)")


def test_a_text_file_as_checkpoint_is_no_checkpoint_not_a_blocked_pickle(tmp_path):
    """A text file was 'refused, it needs unpickling beyond tensors ... (Unsupported operand 110)', told to re-save."""
    from mtl.models.backbones import TimmBackbone

    path = tmp_path / "ckpt.pth"
    path.write_text("not a ckpt\n")
    with pytest.raises(ValueError) as e:
        TimmBackbone("test_resnet", checkpoint_path=str(path))
    assert str(e.value) == f"backbone.checkpoint_path={path}: not a PyTorch/Lightning checkpoint (Unsupported operand 110)"


@pytest.mark.parametrize("prefix, fix", [
    ("backbone.body.", "an mtlkit model folder's weights: start from the folder with init_from=<folder>"),
    ("backbone.", "strip it: re-save the state dict with the keys less 'backbone.'"),  # mmpretrain, a DINO teacher
])
def test_a_prefixed_file_is_told_to_start_from_a_folder_only_for_mtlkits_own_prefix(tmp_path, prefix, fix):
    """Any 'backbone.'-prefixed file was called an mtlkit model folder's weights, advising init_from=<folder>."""
    import timm

    from mtl.models.backbones import TimmBackbone

    path = tmp_path / "w.pth"
    torch.save({"state_dict": {prefix + k: v for k, v in timm.create_model("test_resnet").state_dict().items()}}, path)
    with pytest.raises(ValueError) as e:
        TimmBackbone("test_resnet", checkpoint_path=str(path))
    assert str(e.value).endswith(f"; the file names it '{prefix}conv1.0.weight': its keys carry the prefix "
                                 f"'{prefix}' ({fix})")
