from mtl.models.backbones import TimmBackbone, create_backbone
from mtl.models.decoders import DECODERS, create_decoder
from mtl.models.families import MODELS, model_from_config
from mtl.models.multitask import MultiTaskModel, create_model

__all__ = ["TimmBackbone", "create_backbone", "DECODERS", "create_decoder", "MultiTaskModel", "create_model", "MODELS", "model_from_config"]
