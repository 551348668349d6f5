"""Slimmable multi-task models (ECMT): slimmable layers, the ``slim_resnet`` encoder, the ``slimmable``
decoder, the ``slimmable`` model family, sandwich training and the width controller."""
from mtl.models.slimmable.layers import (DEFAULT_WIDTHS, SlimConv2d, SlimLinear, SwitchableBatchNorm2d, apply_widths,
                                         channels_at)
from mtl.models.slimmable.resnet import SlimResNet
from mtl.models.slimmable.decoder import SlimmableDecoder
from mtl.models.slimmable.family import SlimmableMultiTaskModel
from mtl.models.slimmable import sandwich  # noqa: F401,E402  (registers strategy=sandwich)

__all__ = ["DEFAULT_WIDTHS", "SlimConv2d", "SlimLinear", "SwitchableBatchNorm2d", "apply_widths", "channels_at",
           "SlimResNet", "SlimmableDecoder", "SlimmableMultiTaskModel"]
