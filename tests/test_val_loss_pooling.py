"""What `val/<task>/loss` is (docs/training.md): a batch-size-weighted mean of per-batch losses, unlike the
metrics, which pool the valid elements of the whole split."""
import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from mtl.distributed import pooled_means
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


def _depth_model_and_split():
    """A depth-only model and a validation split of 33 images (some pixels without depth), the same in every process."""
    torch.manual_seed(0)
    model = create_model([{"kind": "depth", "metrics": ["abs_err"]}], backbone={"name": "test_resnet", "out_indices": [1, 2, 3]},
                         decoder={"name": "hps", "channels": 8})
    gen = torch.Generator().manual_seed(1)
    image = torch.randn(33, 3, 32, 32, generator=gen)
    depth = torch.rand(33, 1, 32, 32, generator=gen) + 0.5
    depth[::3, :, :8] = 0
    return model, image, depth


def _validate_on_rank(rank):
    """Lightning DDP validation on this rank of an existing 2-process gloo group, each rank holding its unrepeated share
    of the split, as mtlkit's data modules give it: rank 0 images 0, 2, ..., 32 (batches of 16 and 1), rank 1 16 images."""
    import os

    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), NODE_RANK="0", WORLD_SIZE="2")  # launched: no new processes
    model, image, depth = _depth_model_and_split()
    samples = [{"image": image[i], "depth": depth[i]} for i in range(len(image))]
    loader = DataLoader(samples, batch_size=16, sampler=UnrepeatedDistributedSampler(samples, shuffle=False))
    module = MultiTaskModule(model, log_weights_every=0)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", use_distributed_sampler=False, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logged = trainer.validate(module, dataloaders=loader, verbose=False)[0]
    advice = [str(w.message) for w in caught if "sync_dist=True" in str(w.message)]
    return {"logged": logged, "history": module.val_loss_history[0], "scored": module.scored["val"], "advice": advice}


def test_pooled_means_divides_the_summed_losses_by_all_images():
    """Two processes, one with batches of 16 and 1 images, the other with one of 16: Σ_b n_b·L_b / Σ_b n_b over the
    33 images, whatever their shares (reduce: the sum over the processes, here of this one and the other's)."""
    batches = {0: [(16, 1.5), (1, 0.25)], 1: [(16, 2.0)]}  # rank -> (n_b, L_b)

    def local(rank):
        return {"val/loss": torch.tensor(sum(n * loss for n, loss in batches[rank]))}, sum(n for n, _ in batches[rank])

    sums1, count1 = local(1)
    other = iter([torch.stack(list(sums1.values())), torch.tensor(count1)])
    means, count = pooled_means(*local(0), reduce=lambda t: t + next(other))
    assert count == 33 and means["val/loss"].item() == pytest.approx((16 * 1.5 + 1 * 0.25 + 16 * 2.0) / 33, rel=1e-7)
    means, count = pooled_means(*local(0))  # one process
    assert count == 17 and means["val/loss"].item() == pytest.approx((16 * 1.5 + 0.25) / 17, rel=1e-7)
    assert pooled_means({"val/loss": torch.tensor(0.0)}, 0) == ({}, 0)  # no image: nothing to log


@pytest.mark.slow
def test_ddp_val_loss_divides_by_all_images_of_all_ranks(tmp_path):
    """Ranks holding 17 and 16 images: Σ_b n_b·L_b / Σ_b n_b over the 33 (Lightning's sync_dist averaged the image
    count as an integer, 33 -> 2·16, and logged Σ/32)."""
    from balancers.balancer_toys import on_two_gloo_ranks

    ranks = on_two_gloo_ranks(_validate_on_rank, tmp_path)
    model, image, depth = _depth_model_and_split()
    model.eval()
    with torch.no_grad():
        pred = model(image)["depth"]
    err, valid = (pred - depth).abs(), depth > 0
    batches = [list(range(0, 32, 2)), [32], list(range(1, 33, 2))]  # each rank's batches
    want = sum(len(b) * err[b][valid[b]].mean().item() for b in batches) / 33
    for got in ranks:
        assert got["scored"] == 33
        assert got["logged"]["val/depth/loss"] == pytest.approx(want, rel=1e-5)
        assert got["logged"]["val/loss"] == pytest.approx(want, rel=1e-5)
        assert got["history"]["val/depth/loss"] == pytest.approx(want, rel=1e-5)  # metrics.json's val_losses
        # values already pooled over the ranks: no "use sync_dist=True" advice from Lightning
        assert got["advice"] == []
