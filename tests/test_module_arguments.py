"""MultiTaskModule's model and balancer arguments: the forms docs/training.md shows, and one-line refusals."""
import decimal
import fractions

import numpy as np
import pytest

from mtl.module import MultiTaskModule


def test_a_balancer_name_is_taken_as_its_config(tiny_model):
    module = MultiTaskModule(tiny_model, balancer="uw", log_weights_every=0)
    assert type(module.balancer).__name__ == "UncertaintyWeighting" and module.hparams.balancer == {"name": "uw"}
    assert MultiTaskModule(tiny_model.config, balancer={"name": "ew"}, lr=2e-3).hparams.balancer == {"name": "ew"}


@pytest.mark.parametrize("balancer", [3, {"lr": 1.0}])
def test_a_balancer_without_a_name_is_refused(tiny_model, balancer):
    with pytest.raises(TypeError, match=r"^balancer must be a name or a dict with its 'name' and settings "
                                        r"\(e.g. \{'name': 'uw'\}\), got "):
        MultiTaskModule(tiny_model, balancer=balancer)


def test_a_folder_path_for_the_model_points_at_load_model(tmp_path):
    with pytest.raises(TypeError, match=r"^MultiTaskModule takes a model \(nn.Module\) or a model config dict, got str; "
                                        r"load a model folder with mtl.load_model\(path\) first$"):
        MultiTaskModule(str(tmp_path), balancer={"name": "ew"})



@pytest.mark.parametrize("setting", ["log_weights_every", "strategy.num_random", "lr"])
def test_a_numpy_int_setting_leaves_a_checkpoint_that_loads_with_weights_only(tmp_path, setting):
    """check_int takes np.int64 since e2802d8, but the module recorded it as given in its hyperparameters, so
    every checkpoint held a numpy scalar that torch.load(weights_only=True) (mtl-train's resume) refuses."""
    import lightning as L
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from mtl.models import create_model

    slim = setting.startswith("strategy")
    model = create_model([{"kind": "depth"}], family="slimmable" if slim else None,
                         backbone={"name": "slim_resnet", "stem": 8, "channels": [8, 16, 16], "depths": [1, 2, 1],
                                   "out_indices": [1, 2, 3]} if slim else {"name": "test_resnet", "out_indices": [1, 2, 3]},
                         decoder={"name": "slimmable" if slim else "hps", "channels": 8})
    kwargs = ({"strategy": {"name": "sandwich", "num_random": np.int64(1)}, "log_weights_every": 0} if slim else
              {"log_weights_every": np.int64(0)} if setting == "log_weights_every" else
              {"log_weights_every": 0, "lr": np.linspace(0.01, 0.1, 3)[0]})  # np.float64: a float, pickled as numpy's
    samples = [{"image": torch.randn(3, 32, 32), "depth": torch.rand(1, 32, 32) + 0.5} for _ in range(2)]
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, max_steps=1, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(MultiTaskModule(model, **kwargs), DataLoader(samples, batch_size=2))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    hp = torch.load(tmp_path / "last.ckpt", weights_only=True)["hyper_parameters"]
    if setting == "lr":
        assert hp["lr"] == 0.01 and type(hp["lr"]) is float
        return
    value = hp["strategy"]["num_random"] if slim else hp["log_weights_every"]
    assert value == (1 if slim else 0) and type(value) is int


def test_numpy_settings_nested_in_the_balancer_and_model_config_reach_checkpoints_as_plain_values(tmp_path):
    """The balancer's dict and the model's config were recorded as given: np.float64 (a float subclass) passed every
    check and pickled into the checkpoint as a numpy scalar, which torch.load(weights_only=True) refuses."""
    import lightning as L
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from mtl.models import create_model

    model = create_model([{"kind": "depth"}], backbone={"name": "test_resnet", "out_indices": [1, 2, 3],
                                                        "drop_path_rate": np.float64(0.0)},
                         decoder={"name": "hps", "channels": 8})
    samples = [{"image": torch.randn(3, 32, 32), "depth": torch.rand(1, 32, 32) + 0.5} for _ in range(2)]
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, max_steps=1, limit_val_batches=0, default_root_dir=tmp_path)
    module = MultiTaskModule(model, balancer={"name": "dwa", "temperature": np.float64(2.0)}, log_weights_every=0)
    trainer.fit(module, DataLoader(samples, batch_size=2))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    hp = torch.load(tmp_path / "last.ckpt", weights_only=True)["hyper_parameters"]
    assert hp["balancer"] == {"name": "dwa", "temperature": 2.0} and type(hp["balancer"]["temperature"]) is float
    assert type(hp["model"]["backbone"]["drop_path_rate"]) is float
    assert type(model.config["backbone"]["drop_path_rate"]) is float  # config.json's source too


def test_numpy_numbers_are_taken_wherever_python_numbers_are_and_recorded_as_plain_ones(tiny_model):
    """np.float32 (from a grid) was refused as lr, grad_clip or a balancer's float setting while np.float64 (a float
    subclass) passed; np.int64 was refused as a decoder's int setting while check_int takes it elsewhere."""
    import numpy as np

    from mtl.models import create_model

    module = MultiTaskModule(tiny_model, lr=np.float32(0.5), grad_clip=np.float32(1.0), log_weights_every=0,
                             balancer={"name": "dwa", "temperature": np.float32(2.0)})
    assert (module.hparams.lr, module.hparams.grad_clip, module.hparams.balancer["temperature"]) == (0.5, 1.0, 2.0)
    assert all(type(v) is float for v in (module.hparams.lr, module.hparams.grad_clip,
                                          module.hparams.balancer["temperature"]))
    model = create_model([{"kind": "depth"}], backbone={"name": "test_resnet", "out_indices": [1, 2, 3]},
                         decoder={"name": "hps", "channels": np.int64(8)})
    assert model.config["decoder"]["channels"] == 8 and type(model.config["decoder"]["channels"]) is int


@pytest.mark.parametrize("setting", [{"lr": np.bool_(True)}, {"lr": True},
                                     {"balancer": {"name": "dwa", "temperature": np.bool_(True)}}])
def test_a_bool_is_still_no_number(tiny_model, setting):
    with pytest.raises(TypeError, match=r"(optim\.lr must be a finite number > 0|balancer\.temperature must be float), "
                                        r"got (np\.)?True_? \(bool\)$"):
        MultiTaskModule(tiny_model, log_weights_every=0, **setting)



NOT_PLAIN = [pytest.param(fractions.Fraction(1, 1000), id="Fraction"), pytest.param(decimal.Decimal("0.001"), id="Decimal"),
             pytest.param(np.longdouble(0.001), id="longdouble")]


@pytest.mark.parametrize("value", NOT_PLAIN)
def test_a_number_whose_value_is_no_python_number_is_refused_by_name(tiny_model, value):
    """Since c0ea1db any numbers.Real passed, and Fraction/np.longdouble were recorded as given: the checkpoint failed
    torch.load(weights_only=True) and save_model failed after training ("cannot store Fraction in JSON")."""
    from mtl.balancers import create_balancer
    from mtl.registry import check_int, check_number

    kind = rf"\({type(value).__name__}\)$"
    with pytest.raises(TypeError, match=r"^optim\.lr must be a finite number > 0, got .* " + kind):
        MultiTaskModule(tiny_model, lr=value, log_weights_every=0)
    with pytest.raises(TypeError, match=r"^balancer\.temperature must be float, got .* " + kind):
        create_balancer("dwa", ["a", "b"], temperature=value * 2000)
    with pytest.raises(TypeError, match=r"^balancer\.window must be str or int, got .* " + kind):
        create_balancer("dwa", ["a", "b"], window=value * 2000)
    with pytest.raises(ValueError, match=r"^x must be a finite number >= 0, got "):
        check_number("x", value)
    with pytest.raises(ValueError, match=r"^n must be an int >= 0, got "):
        check_int("n", value * 2000)


def test_a_fraction_or_longdouble_in_a_model_or_balancer_config_is_recorded_as_a_python_float(tmp_path, tiny_model):
    """Config dicts are made plain (mtl.io.as_plain) before their settings are checked: there such a number is taken as
    the float it holds, so checkpoints load with weights_only=True and config.json is written."""
    import torch

    import mtl
    from mtl.io import as_plain
    from mtl.models import create_model

    got = as_plain({"a": fractions.Fraction(1, 4), "b": np.longdouble(2), "c": [np.array([0.5], dtype=np.longdouble)],
                    "d": np.int16(3), "e": fractions.Fraction(4, 2)})
    assert got == {"a": 0.25, "b": 2.0, "c": [[0.5]], "d": 3, "e": 2.0}
    assert [type(v) for v in (got["a"], got["b"], got["c"][0][0], got["d"], got["e"])] == [float, float, float, int, float]
    model = create_model(["semseg"], backbone="test_resnet",
                         decoder={"name": "hps", "channels": 8, "head": "cosine", "cosine_scale": fractions.Fraction(16)})
    assert type(model.config["decoder"]["cosine_scale"]) is float
    mtl.save_model(model, tmp_path / "m")
    module = MultiTaskModule(tiny_model, log_weights_every=0, balancer={"name": "dwa", "temperature": np.longdouble(2)})
    torch.save(dict(module.hparams), tmp_path / "hp.pt")
    assert torch.load(tmp_path / "hp.pt", weights_only=True)["balancer"] == {"name": "dwa", "temperature": 2.0}
