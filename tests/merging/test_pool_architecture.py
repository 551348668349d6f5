"""Which architecture differences a pool accepts: head-only decoder options and omitted defaults, not the rest."""
import pytest
import torch

import mtl
from merging.pool import ModelPool
from mtl.models import create_model


def _folder(tmp_path, name, task, decoder):
    m = create_model([{"kind": "classification", "name": task, "num_classes": 3}], backbone="test_resnet",
                     decoder=decoder)
    return mtl.save_model(m, tmp_path / name)


def test_pretrained_may_predate_head_options_members_must_agree(tmp_path):
    pre = _folder(tmp_path, "pre", "base", {"name": "hps", "channels": 8})  # as written before `head` existed
    cos = {"name": "hps", "channels": 8, "norm": "batch", "head": "cosine", "cosine_scale": 16.0}
    a, b = _folder(tmp_path, "a", "ta", cos), _folder(tmp_path, "b", "tb", cos)
    pool = ModelPool.from_folders(pre, [a, b])
    assert len(pool.members) == 2
    mixed = _folder(tmp_path, "c", "tc", {"name": "hps", "channels": 8, "head": "mlp"})
    with pytest.raises(ValueError, match="builds task heads unlike"):
        ModelPool.from_folders(pre, [a, mixed])
    ModelPool.from_folders(pre, [mixed])  # alone it is fine: mlp is the default the pretrained one omits


@pytest.mark.parametrize("decoder", [{"name": "hps", "channels": 8, "norm": "layer"}, {"name": "hps", "channels": 16}])
def test_shared_decoder_options_must_match(tmp_path, decoder):
    pre = _folder(tmp_path, "pre", "base", {"name": "hps", "channels": 8})
    other = _folder(tmp_path, "a", "ta", decoder)
    with pytest.raises(ValueError, match="models must share an architecture"):
        ModelPool.from_folders(pre, [other])


def test_models_pruned_by_different_plans_are_refused(tmp_path):
    """Equal shapes do not mean equal channels: θ_t − θ0 of different kept channels is meaningless."""
    import pruning
    from merging.pool import check_same_pruning

    x = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    torch.manual_seed(0)
    base = mtl.create_model(["depth"], backbone="test_resnet", decoder={"name": "hps", "channels": 8})
    other = mtl.create_model(["depth"], backbone="test_resnet", decoder={"name": "hps", "channels": 8})
    folders = {}
    for name, m in (("a", base), ("b", other), ("a2", base)):
        pruned, _ = pruning.prune(m, "l1", example=x, ratio=0.5)
        folders[name] = mtl.save_model(pruned, tmp_path / name)
    folders["plain"] = mtl.save_model(base, tmp_path / "plain")
    check_same_pruning(folders["a"], [folders["a2"]])  # one plan: fine
    with pytest.raises(ValueError, match=r"was pruned differently from .*kept other channels"):
        check_same_pruning(folders["a"], [folders["b"]])
    with pytest.raises(ValueError, match=r"is pruned and .* is not"):
        check_same_pruning(folders["plain"], [folders["a"]])


@pytest.mark.parametrize("extra, said", [
    # evaluated: the pool's config.json check, which ran in ModelPool.from_folders after the run folder
    ((), r"/b: its decoder \{.*\} differs from the pretrained model's \{.*\} \(.*/pre\); models must share"),
    # eval=none: the tensors' shapes, which merge_to_file found after the run folder; now from the headers
    (("eval=none", "merge.lam=0.3"), r"models do not match: 'decoder\..*' has shape"),
])
def test_a_pool_of_another_architecture_leaves_no_run_folder(tmp_path, console, capfd, extra, said):
    """Was an error line, then a run_dir: line and a FAILED run folder: now one error line and no folder."""
    import re

    from tests.test_early_config_checks import _refused_without_folder

    pre = _folder(tmp_path, "pre", "base", {"name": "hps", "channels": 8})
    a = _folder(tmp_path, "a", "ta", {"name": "hps", "channels": 8})
    b = _folder(tmp_path, "b", "tb", {"name": "hps", "channels": 16})
    message = _refused_without_folder(console, capfd, "merging.cli", "merge=task_arithmetic", f"pretrained={pre}",
                                      f"models=[{a},{b}]", *extra)
    assert re.search(said, message), message


def test_an_evaluated_pool_with_a_pruned_member_leaves_no_run_folder(tmp_path, console, capfd):
    """Pruning was checked only in ModelPool.from_folders, after the run folder: an error line, then a run_dir: line
    and a FAILED folder (eval=none refused it early). Now one error line and no folder, evaluated or not."""
    import pruning
    from tests.test_early_config_checks import _refused_without_folder

    pre = _folder(tmp_path, "pre", "base", {"name": "hps", "channels": 8})
    torch.manual_seed(0)
    ta = create_model([{"kind": "classification", "name": "ta", "num_classes": 3}], backbone="test_resnet",
                      decoder={"name": "hps", "channels": 8})
    pruned, _ = pruning.prune(ta, "l1", example=torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8), ratio=0.5)
    a = mtl.save_model(pruned, tmp_path / "a")
    b = _folder(tmp_path, "b", "tb", {"name": "hps", "channels": 8})
    for extra in ((), ("eval=none",)):
        message = _refused_without_folder(console, capfd, "merging.cli", "merge=task_arithmetic", f"pretrained={pre}",
                                          f"models=[{a},{b}]", *extra)
        assert message.startswith(f"{a} is pruned and {pre} is not"), message
