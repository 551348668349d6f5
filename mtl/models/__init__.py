from mtl.models.backbones import BACKBONES, TimmBackbone, create_backbone
from mtl.models.decoders import DECODERS, create_decoder
from mtl.models.families import MODELS, model_from_config
from mtl.models.multitask import MultiTaskModel, create_model
from mtl.models import task_moe_vit  # noqa: F401,E402  (registers the "task_moe_vit" family)
from mtl.models import slimmable  # noqa: F401,E402  (registers slim_resnet, decoder=slimmable, family=slimmable)
from mtl.models.linearized import LinearizedModel, linearize  # noqa: E402  (registers family=linearized)

__all__ = ["BACKBONES", "TimmBackbone", "create_backbone", "DECODERS", "create_decoder", "MultiTaskModel", "create_model",
           "MODELS", "model_from_config", "LinearizedModel", "linearize"]
