"""Which architecture differences a pool accepts: head-only decoder options and omitted defaults, not the rest."""
import pytest

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
