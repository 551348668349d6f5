from mtl.models.decoders.base import DECODERS, create_decoder
from mtl.models.decoders import hps  # noqa: F401  (registers "hps")

__all__ = ["DECODERS", "create_decoder"]
