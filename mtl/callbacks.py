"""Lightning callbacks of mtlkit (add them through the `callbacks` config group)."""
from __future__ import annotations

import lightning as L
from torch import nn


class FreezeBatchNormStats(L.Callback):
    """Train with every BatchNorm layer in eval mode: it normalises with its running statistics and never
    updates them, while its affine weights still train.

    The zoo fine-tunes this way so every fine-tuned model keeps the pretrained model's BN statistics:
    weight merging cannot produce statistics that match merged weights, but with shared ones the merged
    model's statistics are exactly those every fine-tuned model was trained and tested with.
    """

    @staticmethod
    def _freeze(module: nn.Module) -> None:
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
                m.eval()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # Lightning puts the module back in train mode after every validation run
        self._freeze(pl_module)
