"""The cosine classification head of the hps decoder: its formula, scale invariance, model folders."""
import math

import pytest
import torch

import mtl
from mtl.models import create_model
from mtl.models.decoders.hps import CosineImageHead, ImageHead


def test_logits_are_scale_times_cosine_by_hand():
    head = CosineImageHead(2, 2, scale=10.0, hidden=2)
    with torch.no_grad():
        head.body[0].weight.copy_(torch.eye(2))
        head.body[0].bias.zero_()
        head.classifier.weight.copy_(torch.tensor([[3.0, 0.0], [1.0, 1.0]]))
    z = torch.tensor([1.0, 1.0]).view(1, 2, 1, 1)  # pooled features (1, 1): the hidden ReLU keeps them
    out = head(z, (1, 1))
    # cos((1,1), (3,0)) = 1/√2, cos((1,1), (1,1)) = 1
    torch.testing.assert_close(out, torch.tensor([[10 / math.sqrt(2), 10.0]]))


def test_logits_do_not_grow_with_the_feature_norm():
    torch.manual_seed(0)
    z = torch.randn(4, 8, 3, 3)
    cos, mlp = CosineImageHead(8, 5), ImageHead(8, 5)
    assert (cos(100 * z, (3, 3)).abs().max() <= 16.0 + 1e-4) and cos(z, (3, 3)).abs().max() <= 16.0 + 1e-5  # |logit| ≤ scale
    with torch.no_grad():
        cos.body[0].bias.zero_()  # then the hidden features scale with z, and the logits do not move
    torch.testing.assert_close(cos(3 * z, (3, 3)), cos(z, (3, 3)))
    assert not torch.allclose(mlp(3 * z, (3, 3)), mlp(z, (3, 3)))


def test_cosine_applies_to_classification_heads_and_round_trips(tmp_path):
    m = create_model(["classification", "regression", "depth"], backbone="test_resnet",
                     decoder={"name": "hps", "head": "cosine", "cosine_scale": 8.0})
    heads = m.decoder.heads
    assert isinstance(heads["classification"], CosineImageHead) and heads["classification"].scale == 8.0
    assert isinstance(heads["regression"], ImageHead) and not isinstance(heads["depth"], CosineImageHead)
    m.eval()
    x = torch.randn(2, 3, 32, 32)
    mtl.save_model(m, tmp_path / "m")
    back = mtl.load_model(tmp_path / "m")
    assert isinstance(back.decoder.heads["classification"], CosineImageHead)
    for k, v in m(x).items():
        assert torch.equal(back(x)[k], v)


@pytest.mark.parametrize("decoder,match", [({"name": "hps", "head": "linear"}, "decoder.head must be one of"),
                                           ({"name": "hps", "head": "cosine", "cosine_scale": 0}, "cosine_scale")])
def test_bad_head_options_are_named(decoder, match):
    with pytest.raises(ValueError, match=match):
        create_model(["classification"], backbone="test_resnet", decoder=decoder)


def test_cosine_head_prunes_structurally_and_exports(tmp_path):
    from mtl.exporters.api import export
    from pruning.api import prune

    m = create_model([{"kind": "classification", "name": "c", "num_classes": 4}, "depth"], backbone="test_resnet",
                     decoder={"name": "hps", "head": "cosine"}).eval()
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    pruned, _ = prune(m, "l1", example=x, ratio=0.3)
    head = pruned.decoder.heads["c"]
    assert isinstance(head, CosineImageHead) and head.classifier.in_features == head.body[0].out_features < 64
    assert pruned(x)["c"].abs().max() <= 16.0 + 1e-4
    mtl.save_model(pruned, tmp_path / "pruned")
    back = mtl.load_model(tmp_path / "pruned").eval()
    assert torch.equal(back(x)["c"], pruned.eval()(x)["c"])
    out = export(tmp_path / "pruned", "onnx", tmp_path / "onnx", tasks=["c"], input_size=32)
    assert any(out.glob("*.onnx"))
