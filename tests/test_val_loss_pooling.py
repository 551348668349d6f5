"""What `val/<task>/loss` is (docs/training.md): a batch-size-weighted mean of per-batch losses, unlike the
metrics, which pool the valid elements of the whole split."""
import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from mtl.models import create_model
from mtl.module import MultiTaskModule


def test_val_loss_weighs_batches_by_size_while_metrics_pool_elements():
    torch.manual_seed(0)
    model = create_model([{"kind": "depth", "metrics": ["abs_err"]}], backbone={"name": "test_resnet", "out_indices": [1, 2, 3]},
                         decoder={"name": "hps", "channels": 8})
    module = MultiTaskModule(model, log_weights_every=0)
    image = torch.randn(4, 3, 32, 32)
    depth = torch.rand(4, 1, 32, 32) + 0.5
    depth[0, :, :16] = 0  # image 0: half of its pixels without depth
    depth[2:] = 0  # the second batch has no valid pixel at all: loss 0, weight 2
    samples = [{"image": image[i], "depth": depth[i]} for i in range(4)]
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    logged = trainer.validate(module, dataloaders=DataLoader(samples, batch_size=2), verbose=False)[0]

    model.eval()
    with torch.no_grad():
        pred = model(image)["depth"]
    err, valid = (pred - depth).abs(), depth > 0
    batch1 = err[:2][valid[:2]].mean().item()  # the loss of the first batch: its valid pixels
    pooled = err[valid].sum().item() / valid.sum().item()  # per element over the split: the same pixels
    assert logged["val/depth/abs_err"] == pytest.approx(pooled, rel=1e-5)
    assert logged["val/depth/loss"] == pytest.approx((2 * batch1 + 2 * 0.0) / 4, rel=1e-5)  # half the metric
    assert logged["val/loss"] == pytest.approx(logged["val/depth/loss"])
