"""mtl.callbacks: the zoo's fine-tuning recipe (BN statistics frozen, probe then fine-tune)."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mtl.callbacks import FreezeBatchNormStats, ProbeThenFinetune


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.decoder = nn.Module()
        self.decoder.heads = nn.ModuleDict({"a": nn.Linear(4, 2), "b": nn.Linear(4, 3)})


def _module():
    return SimpleNamespace(model=_Toy())


def test_freeze_bn_stats_keeps_running_statistics_but_trains_affine():
    pl = _module()
    pl.model.train()
    bn = pl.model.encoder[1]
    before = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    FreezeBatchNormStats().on_train_batch_start(None, pl.model, None, 0)
    out = pl.model.encoder(torch.randn(8, 3, 6, 6) * 3 + 1)
    out.square().mean().backward()
    assert not bn.training and pl.model.training  # only BN layers leave train mode
    for b, a in zip(before, (bn.running_mean, bn.running_var, bn.num_batches_tracked)):
        assert torch.equal(b, a)
    assert bn.weight.grad is not None and bn.weight.grad.abs().sum() > 0


def _trainer(epoch, lrs=(1e-3,)):
    opt = torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))], "lr": 0.0} for _ in lrs])
    sched = SimpleNamespace(get_last_lr=lambda: list(lrs))
    return SimpleNamespace(current_epoch=epoch, optimizers=[opt], lr_scheduler_configs=[SimpleNamespace(scheduler=sched)])


def _trainable(pl):
    heads = {id(p) for p in pl.model.decoder.heads.parameters()}
    return {("head" if id(p) in heads else "shared", p.requires_grad) for p in pl.model.parameters()}


def test_probe_phase_trains_only_heads_then_only_shared():
    cb, pl = ProbeThenFinetune(probe_epochs=2), _module()
    for epoch in (0, 1):
        cb.on_train_epoch_start(_trainer(epoch), pl)
        assert _trainable(pl) == {("head", True), ("shared", False)}
    cb.on_train_epoch_start(_trainer(2), pl)
    assert _trainable(pl) == {("head", False), ("shared", True)}
    cb.on_train_end(_trainer(2), pl)
    assert _trainable(pl) == {("head", True), ("shared", True)}


def test_unfrozen_heads_in_phase_two():
    cb, pl = ProbeThenFinetune(probe_epochs=1, freeze_heads=False), _module()
    cb.on_train_epoch_start(_trainer(1), pl)
    assert _trainable(pl) == {("head", True), ("shared", True)}


def test_probe_lr_scale_follows_the_schedule_without_compounding():
    cb = ProbeThenFinetune(probe_epochs=1, probe_lr_scale=6.0)
    tr = _trainer(0, lrs=(1e-3, 2e-3))
    for _ in range(3):  # applied each step from the scheduler's value, never to its own output
        cb.on_train_batch_start(tr, None, None, 0)
    assert [g["lr"] for g in tr.optimizers[0].param_groups] == pytest.approx([6e-3, 12e-3])
    tr.current_epoch = 1
    cb.on_train_batch_start(tr, None, None, 0)
    assert [g["lr"] for g in tr.optimizers[0].param_groups] == pytest.approx([1e-3, 2e-3])


@pytest.mark.parametrize("max_epochs, probe_epochs, refused", [(3, 3, True), (1, 3, True), (4, 3, False), (1, 0, False)])
def test_a_run_that_ends_within_the_probe_is_refused_at_fit_start(max_epochs, probe_epochs, refused):
    """It would save θ0's shared weights with a new head: a zero task vector, in a zoo without a word."""
    cb = ProbeThenFinetune(probe_epochs=probe_epochs)
    trainer = SimpleNamespace(max_epochs=max_epochs)
    if refused:
        with pytest.raises(ValueError, match=rf"trainer.max_epochs={max_epochs} ends within the probe .*probe_epochs="
                                             rf"{probe_epochs}\): only the heads would train"):
            cb.on_fit_start(trainer, None)
    else:
        cb.on_fit_start(trainer, None)


@pytest.mark.parametrize("kwargs", [{"probe_epochs": -1}, {"probe_lr_scale": 0.0}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        ProbeThenFinetune(**kwargs)


@pytest.mark.parametrize("experiment", ["scenes_hps", "nyuv2", "cityscapes", "zoo_cnn_finetune"])
def test_every_training_run_records_expert_usage_when_its_model_has_experts(tmp_path, experiment):
    """A default callback, not one of two experiments: `decoder=moe` on any experiment gets its
    expert_usage.png (models without experts are left alone, tests/models/test_moe_cli.py)."""
    from mtl.cli.in_process import compose_in_process

    cfg, _ = compose_in_process("mtl.configs", "train", [f"experiment={experiment}", "decoder=moe"], tmp_path / "r")
    assert cfg.callbacks.expert_usage._target_ == "mtl.expert_usage.ExpertUsageCallback"


@pytest.mark.slow
def test_a_longer_resume_with_a_probe_lr_scale_follows_the_uninterrupted_runs_learning_rates(tmp_path):
    """The resume moved the optimiser's lr onto the longer schedule's curve but not the scheduler's get_last_lr(),
    which ProbeThenFinetune(probe_lr_scale != 1) copies into the optimiser before every step: the first resumed step
    ran at the 2-epoch curve's last lr (0) instead of the 4-epoch curve's."""
    import lightning as L
    from torch.utils.data import DataLoader

    from mtl.models import create_model
    from mtl.module import MultiTaskModule

    class LrUsed(L.Callback):  # the lr each AdamW step runs at
        def __init__(self):
            self.lrs = []

        def on_train_start(self, trainer, pl_module):
            trainer.optimizers[0].register_step_pre_hook(lambda opt, a, k: self.lrs.append(opt.param_groups[0]["lr"]))

    def fit(epochs, ckpt=None):
        torch.manual_seed(0)
        model = create_model([{"kind": "depth"}], backbone={"name": "test_resnet", "out_indices": [1, 2, 3]},
                             decoder={"name": "hps", "channels": 8})
        samples = [{"image": torch.randn(3, 32, 32), "depth": torch.rand(1, 32, 32) + 0.5} for _ in range(4)]
        used = LrUsed()
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                            max_epochs=epochs, limit_val_batches=0, default_root_dir=tmp_path,
                            callbacks=[ProbeThenFinetune(probe_epochs=1, probe_lr_scale=2.0), used])
        trainer.fit(MultiTaskModule(model, log_weights_every=0, warmup_ratio=0.0), DataLoader(samples, batch_size=2),
                    ckpt_path=ckpt)
        return trainer, used.lrs

    first, _ = fit(2)
    first.save_checkpoint(tmp_path / "two.ckpt")
    _, resumed = fit(4, tmp_path / "two.ckpt")
    _, uninterrupted = fit(4)
    assert len(uninterrupted) == 8 and uninterrupted[4] > 0
    assert resumed == pytest.approx(uninterrupted[4:], rel=1e-6)
