"""The small multi-task model and scenes-like batches the pruning tests share."""
import torch
from torch import nn

from mtl.models import create_model

TASKS = ["semseg", "depth", "classification"]


def toy_model(backbone="test_resnet", seed=0, varied_bn=True):
    """test_resnet (or `backbone`) + an 8-channel HPS decoder for TASKS, in eval mode. `varied_bn`:
    non-trivial BN statistics and affine parameters, so a wrong channel mapping shows."""
    torch.manual_seed(seed)
    m = create_model(TASKS, backbone=backbone, decoder={"name": "hps", "channels": 8}).eval()
    if varied_bn:
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.data.uniform_(0.5, 1.5)
                mod.bias.data.uniform_(-0.2, 0.2)
    return m


def toy_batches(n=2, size=32, seed=0):
    """n batches of 4 images with every task's target (5 scenes classes, depth in [0, 5), 3 classes)."""
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8, generator=g),
             "semseg": torch.randint(0, 5, (4, size, size), generator=g),
             "depth": torch.rand(4, 1, size, size, generator=g) * 5,
             "classification": torch.randint(0, 3, (4,), generator=g)} for _ in range(n)]


def controlled_losses(layer: str, slopes: dict):
    """A stand-in for `pruning.pagcp.task_losses`: task t's loss is 1 + slopes[t]·f (1 for a task not
    in `slopes`), f being the fraction of `layer`'s filters zeroed — only that layer matters."""

    def losses(m, _batches):
        w = m.get_submodule(layer).weight
        f = float((w.flatten(1).abs().sum(1) == 0).float().mean())
        return {t: 1 + slopes[t] * f if t in slopes else 1.0 for t in TASKS}

    return losses


class TinyMultiTask(nn.Module):
    """A hand-made model with what the pruner needs of a multitask one: a config naming the family and
    decoder, ``decoder.heads`` (whose last conv/linear is protected), ``tasks`` and a dict output."""

    config = {"family": "multitask", "decoder": {"name": "hps"}}

    def __init__(self, body: nn.Module, heads: dict, tasks: dict | None = None):
        super().__init__()
        self.body = body
        self.decoder = nn.Module()
        self.decoder.heads = nn.ModuleDict(heads)
        self.tasks = tasks or {}

    def forward(self, x, tasks=None):
        y = self.body(x.float())
        return {t: h(y) for t, h in self.decoder.heads.items() if tasks is None or t in tasks}


class Ghost(nn.Module):
    """GhostNet's module: a primary 1x1 conv and a cheap depthwise conv of its output, concatenated."""

    def __init__(self, c):
        super().__init__()
        h = c // 2
        self.primary = nn.Sequential(nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU())
        self.cheap = nn.Sequential(nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU())

    def forward(self, x):
        a = self.primary(x)
        return torch.cat([a, self.cheap(a)], 1)


class GhostResidual(nn.Module):
    """stem (3x3 conv, 6 channels) -> x + Ghost(x) -> 3x3 depthwise conv, as in GhostNet, where the next
    block's depthwise shortcut leads the group: its channels j and j + 3 both come from index j of the
    Ghost module's primary conv, through the concatenation and the residual."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU())
        self.ghost = Ghost(6)
        self.dw = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False), nn.BatchNorm2d(6))

    def forward(self, x):
        y = self.stem(x)
        return self.dw(y + self.ghost(y))
