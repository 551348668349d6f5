"""init_from: the encoder must come from the folder; what is left unloaded is told by name or shape."""
import pytest
import torch

import mtl
from mtl.warm_start import init_from_folder


def test_a_folder_of_another_backbone_is_refused_even_when_the_neck_matches(tmp_path):
    """test_resnet's hps(16) neck matches test_vit's by name and shape: 17 tensors loaded, no encoder one."""
    folder = mtl.save_model(mtl.create_model(["depth"], backbone="test_resnet", decoder={"name": "hps", "channels": 16}),
                            tmp_path / "cnn")
    vit = mtl.create_model(["depth"], backbone="test_vit", decoder={"name": "hps", "channels": 16})
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    with pytest.raises(ValueError, match=rf"^init_from={folder} \(backbone 'test_resnet'\): none of this model's \d+ "
                                         r"encoder tensors \(backbone 'test_vit'\) matches the folder's by name and shape"):
        init_from_folder(vit, folder)
    assert all(torch.equal(v, before[k]) for k, v in vit.state_dict().items())  # nothing half-loaded


def test_the_warning_tells_absent_tensors_from_tensors_of_another_shape(tmp_path, caplog):
    folder = mtl.save_model(mtl.create_model(["depth"], backbone={"name": "test_resnet", "out_indices": [1, 2]},
                                             decoder={"name": "hps", "channels": 16}), tmp_path / "m")
    wider = mtl.create_model(["depth"], backbone={"name": "test_resnet", "out_indices": [1, 2, 3]},
                             decoder={"name": "hps", "channels": 32})
    with caplog.at_level("WARNING", logger="mtl.warm_start"):
        init_from_folder(wider, folder)
    assert "absent from the folder, e.g. backbone.body.layer3." in caplog.text
    assert "of another shape, e.g. decoder.neck.lateral.0.bias: (16,) in the folder, (32,) here" in caplog.text


def test_batchnorm_counters_alone_do_not_count_as_a_matching_encoder(tmp_path):
    """num_batches_tracked (0-d, one name at every width) matched between a half-width slim_resnet and a full one:
    the start was accepted with no encoder weight loaded and recorded as the run's init_from."""
    slim = {"name": "slim_resnet", "widths": None}
    folder = mtl.save_model(mtl.create_model(["depth"], backbone={**slim, "stem": 8, "channels": [8, 16, 32, 64]},
                                             decoder={"name": "hps", "channels": 16}), tmp_path / "half")
    full = mtl.create_model(["depth"], backbone={**slim, "stem": 16, "channels": [16, 32, 64, 128]},
                            decoder={"name": "hps", "channels": 16})
    with pytest.raises(ValueError, match=r"none of this model's \d+ encoder tensors .* matches the folder's"):
        init_from_folder(full, folder)


def test_a_folder_with_nan_weights_is_refused_naming_the_file_and_key(tmp_path):
    """load_model refused such a folder, init_from loaded it silently (the run then failed at step 0 on a NaN loss)."""
    from safetensors.torch import load_file, save_file

    model = mtl.create_model(["depth"], backbone="test_resnet", decoder={"name": "hps", "channels": 16})
    folder = mtl.save_model(model, tmp_path / "m")
    state = load_file(folder / "model.safetensors")  # plain safetensors: no digest to catch the edit
    key = next(k for k, v in state.items() if v.is_floating_point() and k.startswith("backbone."))
    state[key].view(-1)[0] = float("nan")
    save_file(state, folder / "model.safetensors")
    fresh = mtl.create_model(["depth"], backbone="test_resnet", decoder={"name": "hps", "channels": 16})
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(mtl.io.ModelFolderError, match=rf"model.safetensors: key '{key}' holds NaN or infinite values"):
        init_from_folder(fresh, folder)
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())


def test_slimmable_statistics_are_matched_by_width_under_another_width_set(tmp_path, caplog):
    """(k, C) and (k², C) statistics have one shape for any set of k widths: init_from copied the 0.5-width rows of a
    [0.5, 1.0] folder into a [0.25, 1.0] model's 0.25-width rows, and reported a complete load."""
    from mtl.models.slimmable.layers import SwitchableBatchNorm2d

    def model(widths):
        return mtl.create_model(["depth", "edges"], family="slimmable", decoder={"name": "slimmable", "channels": 8},
                                backbone={"name": "slim_resnet", "stem": 8, "channels": [8, 16, 16, 16],
                                          "depths": [1, 1, 1, 1], "out_indices": [1, 2, 3], "widths": widths})

    src = model([0.5, 1.0])
    with torch.no_grad():
        for b in src.buffers():
            if b.is_floating_point():
                b.copy_(torch.rand_like(b) + 2)  # no row equals an initial one (mean 0, var 1)
    folder = mtl.save_model(src, tmp_path / "f")
    dst = model([0.25, 1.0])
    init_from_folder(dst, folder)
    theirs, conds = dict(src.named_modules()), 0
    for name, m in dst.named_modules():
        if not isinstance(m, SwitchableBatchNorm2d):
            continue
        conds += bool(m.cond_key)
        for cond in (m.widths if m.cond_key else [None]):
            for w in m.widths:
                row = m.row(w, cond)
                for buf, initial in (("running_means", 0.0), ("running_vars", 1.0)):
                    got = getattr(m, buf)[row]
                    if 0.25 in (w, cond):
                        assert torch.all(got == initial), (name, buf, w, cond)
                    else:  # the folder's statistics of the same width (pair)
                        assert torch.equal(got, getattr(theirs[name], buf)[theirs[name].row(w, cond)])
    assert conds  # the heads' per-(encoder, head) width pair rows are covered too
    assert "lacks width(s) [0.25]" in caplog.text


@pytest.mark.parametrize("override", ["+backbone.checkpoint_path={file}", "+backbone.pretrained=true"])
def test_init_from_with_backbone_initial_weights_is_refused_before_the_run_folder(tmp_path, override):
    """The file was read, then silently replaced by the folder's weights, while config.yaml named it as the start."""
    import timm
    from safetensors.torch import save_file

    from mtl.train import run

    folder = mtl.save_model(mtl.create_model(["depth"], backbone="test_resnet", decoder={"name": "hps", "channels": 16}),
                            tmp_path / "m")
    file = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("test_resnet").state_dict().items()}, str(file))
    override = override.format(file=file)
    key, value = override.lstrip("+").split("=")
    with pytest.raises(ValueError) as e:
        run(["experiment=scenes_hps", "debug=smoke", "logger=none", "task=[depth]", f"init_from={folder}", override],
            run_dir=tmp_path / "r")
    assert str(e.value) == (f"init_from={folder} and {key}={value} both set the run's initial "
                            f"weights: the folder's would replace the backbone's, read for nothing; drop {key} (or "
                            "init_from, to start from the backbone's weights)")
    assert not (tmp_path / "r").exists()
