"""MultiTaskModule's model and balancer arguments: the forms docs/training.md shows, and one-line refusals."""
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
