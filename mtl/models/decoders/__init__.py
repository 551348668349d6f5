from mtl.models.decoders.base import DECODERS, create_decoder
from mtl.models.decoders import hps, moe  # noqa: F401  (register "hps", "moe")

__all__ = ["DECODERS", "create_decoder"]
