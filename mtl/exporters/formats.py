"""The built-in export formats (importing registers them in ``mtl.export.EXPORTERS``)."""
from mtl.exporters import folder, onnx_export, timm_weights  # noqa: F401
