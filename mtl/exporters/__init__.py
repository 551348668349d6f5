"""Export a model folder to other stacks: ONNX (verified in ONNX Runtime), timm backbone weights,
or a Hugging Face-style folder with a model card.

    mtl.export("runs/x/model", format="onnx", out="exported/x", tasks=["depth"])

Every format writes one output folder atomically (nothing half-written), holding its artefacts, a
``README.md`` model card and ``export.json`` (what was exported, how it was checked). Formats live in
the ``EXPORTERS`` registry; a new one is a function ``fn(source, out_dir, tasks, **options) -> report``.
"""
from __future__ import annotations

from mtl.exporters.api import EXPORTERS, ExportError, Source, export, load_source, read_report, resolve_tasks
from mtl.exporters import formats  # noqa: E402,F401  (registers onnx, timm, folder)

__all__ = ["EXPORTERS", "ExportError", "Source", "export", "load_source", "read_report", "resolve_tasks"]


from mtl.lazy import attributes as _lazy  # noqa: E402

__getattr__, __dir__ = _lazy(globals())  # submodules (the job runners) load on first use
