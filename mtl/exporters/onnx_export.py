"""``format=onnx``: a graph with the uint8 -> normalised preprocessing inside, a dynamic batch axis
and one output per task, checked in ONNX Runtime against PyTorch before it is kept."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from mtl.exporters.api import EXPORTERS, ExportError, Source, image_hw, trained_image_size

ONNX_FILE = "model.onnx"
INPUT_NAME = "image"
DEFAULT_OPSET = 18
TORCHSCRIPT_MIN_OPSET = 11  # see opset_range

log = logging.getLogger(__name__)


class TaskGraph(nn.Module):
    """The exported function: uint8 image batch -> one tensor per selected task (ONNX has no dicts)."""

    def __init__(self, model: nn.Module, tasks: Sequence[str]):
        super().__init__()
        self.model = model
        self.task_names = list(tasks)
        self.eval()

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(image, tasks=self.task_names)
        return tuple(out[t] for t in self.task_names)


def _missing_package(name: str) -> ImportError:
    return ImportError(f"format=onnx needs the '{name}' package: pip install 'mtlkit[export]'")


def input_size_of(src: Source, size: Any) -> tuple[int, int]:
    """Input (H, W) used to trace and verify: given (an int: a square side, or [H, W]), else the training
    data's, else the backbone's ``img_size``; never a guess (the graph's size is fixed, a wrong one is unusable)."""
    if size is not None:
        return _given_size(size)
    recorded = trained_image_size(src)
    if recorded is not None:
        return recorded
    if src.config.get("backbone", {}).get("img_size"):
        return image_hw(int(src.config["backbone"]["img_size"]))
    where = f"{src.folder / 'config.json'}" if src.folder else "the model's meta"
    raise ValueError(f"format.input_size: {where} records no training image size (meta.data.size) and the "
                     "backbone has no img_size; pass input_size=<pixels> (mtl.export) or format.input_size=<pixels> (mtl-export): "
                     "the graph's H and W are fixed")


def _given_size(size: Any) -> tuple[int, int]:
    hw = image_hw(size)
    if hw is None:
        raise ValueError(f"format.input_size must be a positive int (pixels: the side of a square input), [H, W] "
                         f"of positive ints, or null, got {size!r}")
    return hw


def _warn_below_stride(model: nn.Module, size: tuple[int, int]) -> None:
    """A graph traced below the backbone's output stride runs, but its deepest features are a single
    (mostly padded) pixel: legal and almost surely a typo, so say it rather than refuse."""
    reductions = getattr(getattr(model, "backbone", None), "reductions", None)
    if not reductions or min(size) >= max(reductions):
        return
    shown = size[0] if size[0] == size[1] else list(size)
    log.warning("format.input_size=%s is below the backbone's output stride %d: its deepest feature map is 1×1; "
                "the graph is exported, but predictions at this size are rarely useful", shown, max(reductions))


def _check_patch_size(model: nn.Module, size: tuple[int, int]) -> None:
    """A timm patch embedding takes only whole patches (unless built with ``dynamic_img_pad``): say so
    before tracing, naming the option, rather than as the tracer's AssertionError."""
    for name, module in model.named_modules():
        if not hasattr(module, "dynamic_img_pad") or module.dynamic_img_pad:  # other modules' patch_size: any type
            continue
        patch = image_hw(getattr(module, "patch_size", None))  # a (h, w) tuple in timm's PatchEmbed, or an int
        if patch is None:
            continue
        if size[0] % patch[0] or size[1] % patch[1]:
            side = lambda hw: hw[0] if hw[0] == hw[1] else list(hw)  # noqa: E731  (as format.input_size is written)
            down = [n // p * p or p for n, p in zip(size, patch)]
            up = [-(-n // p) * p for n, p in zip(size, patch)]
            raise ValueError(f"format.input_size={side(size)} (input_size= in mtl.export) is not a multiple of the "
                             f"patch size {side(patch)} of {name} ({type(module).__name__}); export at a multiple "
                             f"of it (e.g. {side(down)} or {side(up)})")


@EXPORTERS.register("onnx")
def export_onnx(source: Source, out: Path, tasks: list[str], opset: int = DEFAULT_OPSET,
                exporter: str = "dynamo", input_size: Any = None, atol: float = 1e-4,
                rtol: float = 1e-3, verify_batches: Sequence[int] = (1, 3), seed: int = 0) -> dict[str, Any]:
    """Trace with ``torch.onnx.export`` (``exporter`` = ``dynamo``, torch's default, or the older
    ``torchscript``), then run the file in ONNX Runtime on random uint8 batches of each size in
    ``verify_batches`` and compare every output with PyTorch: ``|ort - torch| <= atol + rtol*|torch|``."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise _missing_package(e.name or "onnxruntime") from None
    verify_batches = check_onnx_options(opset, exporter, input_size, atol, rtol, verify_batches)
    size = input_size_of(source, input_size)
    _check_patch_size(source.model, size)
    _warn_below_stride(source.model, size)
    graph = TaskGraph(source.model, tasks)
    sample = torch.randint(0, 256, (2, 3, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    path = out / ONNX_FILE
    _trace(graph, sample, path, opset, exporter)
    if exporter == "torchscript":
        _fix_output_dims(path, graph, sample)
    written = _file_opset(path)
    if written != opset:  # the dynamo exporter ignores opsets below its own; never record one we did not write
        raise ExportError(f"format.opset={opset} was asked for but the {exporter} exporter wrote opset {written}"
                          + ("; for opsets below 18 use format.exporter=torchscript" if exporter == "dynamo" else ""))
    checks = verify(graph, path, size, verify_batches, atol, rtol, seed)
    return {
        "file": ONNX_FILE,
        "opset": opset,
        "exporter": exporter,
        "input": {"name": INPUT_NAME, "dtype": "uint8", "shape": ["batch", 3, *size], "layout": "NCHW, RGB, 0-255"},
        "outputs": {t: {"shape": ["batch", *shape[1:]]} for t, shape in zip(tasks, checks["shapes"])},
        "preprocessing": "inside the graph: x/255, then (x - mean)/std with mean "
                         f"{[round(v, 4) for v in source.config.get('mean', [])]} and std "
                         f"{[round(v, 4) for v in source.config.get('std', [])]}",
        "verification": {k: v for k, v in checks.items() if k != "shapes"},
    }


def _fix_output_dims(path: Path, graph: TaskGraph, sample: torch.Tensor) -> None:
    """The torchscript exporter leaves an upsampled output's C, H and W symbolic (``Resizedepth_dim_2``);
    they are fixed (the input's H and W are), so write them as the numbers PyTorch gives. Batch stays dynamic."""
    import onnx

    with torch.no_grad():
        outs = graph(sample)
    proto = onnx.load(str(path))
    changed = False
    for out, t in zip(proto.graph.output, outs):
        dims = out.type.tensor_type.shape.dim
        if len(dims) != t.dim():
            continue
        for j in range(1, t.dim()):
            if not dims[j].HasField("dim_value"):
                dims[j].dim_value = int(t.shape[j])  # a oneof: clears the symbolic name
                changed = True
    if changed:
        onnx.save(proto, str(path))


def check_onnx_options(opset: Any, exporter: Any, input_size: Any, atol: Any, rtol: Any, verify_batches: Any,
                       **_: Any) -> list[int]:
    """The option values the settings alone decide (the model aside), so that mtl-export refuses them before its
    run folder exists (`mtl.exporters.api.check_format_options`); returns the verification batch sizes as a list."""
    if exporter not in ("dynamo", "torchscript"):
        raise ValueError(f"format=onnx: exporter must be 'dynamo' or 'torchscript', got {exporter!r}")
    _check_opset(opset, exporter)
    for name, tol in (("atol", atol), ("rtol", rtol)):  # a negative tolerance fails every check, after the export
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < float("inf"):
            raise ValueError(f"format.{name} must be a finite number ≥ 0, got {tol!r}")
    if input_size is not None:
        _given_size(input_size)
    return _check_batches(verify_batches)


export_onnx.check_options = check_onnx_options  # type: ignore[attr-defined]  # read by check_format_options


def _check_batches(batches: Any) -> list[int]:
    """Verification batch sizes: a non-empty list of positive ints (an empty one would record a check
    that never ran as passed)."""
    ok = isinstance(batches, (list, tuple)) and len(batches) > 0 and all(
        isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in batches)
    if not ok:
        raise ValueError(f"format.verify_batches must be a non-empty list of positive ints (batch sizes run in "
                         f"ONNX Runtime to check the file), got {batches!r}")
    return list(batches)


def opset_range(exporter: str) -> tuple[int, int]:
    """The opsets ``exporter`` writes: torchscript from 11, dynamo from 18 (it writes 18 for anything
    lower), both up to torch's newest. The tracer itself goes down to 7, but below 11 every family we
    ship traced to a file ONNX Runtime disagreed with (up to 0.05 on dense heads, 0.004 on
    classification), so asking for one is refused before a trace that could only fail verification."""
    from torch.onnx import _constants as c

    if exporter == "torchscript":
        return max(TORCHSCRIPT_MIN_OPSET, getattr(c, "ONNX_MIN_OPSET", 7)), getattr(c, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20)
    return 18, max(18, getattr(c, "ONNX_MAX_OPSET", 18))


def _check_opset(opset: Any, exporter: str) -> None:
    low, high = opset_range(exporter)
    if isinstance(opset, bool) or not isinstance(opset, int) or not low <= opset <= high:
        other = "dynamo" if exporter == "torchscript" else "torchscript"
        o_low, o_high = opset_range(other)
        raise ValueError(f"format.opset={opset!r}: the {exporter} exporter writes opsets {low}–{high} "
                         f"(format.exporter={other}: {o_low}–{o_high})")


def _trace(graph: TaskGraph, sample: torch.Tensor, path: Path, opset: int, exporter: str) -> None:
    kwargs: dict[str, Any] = {"input_names": [INPUT_NAME], "output_names": graph.task_names, "opset_version": opset}
    if exporter == "dynamo":
        kwargs.update(dynamo=True, dynamic_shapes={"image": {0: torch.export.Dim("batch", min=1, max=4096)}},
                      external_data=False)
    else:
        kwargs.update(dynamo=False, dynamic_axes={INPUT_NAME: {0: "batch"}, **{t: {0: "batch"} for t in graph.task_names}})
    noise = io.StringIO()
    try:
        # both streams: on failure the dynamo exporter prints whole FX graphs, and torch's C++ side the
        # TorchScript IR ("Torch IR graph at exception"); the error says what matters
        with warnings.catch_warnings(), contextlib.redirect_stdout(noise), contextlib.redirect_stderr(noise), \
                _quiet_fds(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, (sample,), str(path), **kwargs)
    except Exception as e:
        op = unsupported_operator(e)
        if op is None:
            raise ExportError(f"ONNX export ({exporter}, opset {opset}) failed: {type(e).__name__}: "
                              f"{_first_line(e)}") from e
        where = locate_operator(graph.model, sample, graph.task_names, op)
        low, high = opset_range(exporter)
        raise ExportError(f"ONNX (opset {opset}) cannot express operator '{op}' used in module "
                          f"{where or '(not found by name)'}; replace that module or pick another opset "
                          f"({exporter}: {low}–{high}; newer opsets express more operators)"
                          + _resampling_hint(graph.model, sample, op)
                          + ("; or try format.exporter=dynamo (opsets {}–{}), which decomposes many operators the "
                             "torchscript exporter cannot write".format(*opset_range("dynamo"))
                             if exporter == "torchscript" else "")) from None
    finally:
        graph.eval()  # the torchscript exporter restores the wrapper's mode; keep eval for verification


def _resampling_hint(model: Any, sample: torch.Tensor, op: str) -> str:
    """Why a ViT traced at another size than its ``img_size`` meets an interpolation operator: its
    position embeddings are resampled to the new token grid inside the graph."""
    trained = (getattr(model, "config", None) or {}).get("backbone", {}).get("img_size")
    size = tuple(int(v) for v in sample.shape[-2:])
    if "upsample" not in op and "interpolate" not in op or not trained or (int(trained),) * 2 == size:
        return ""
    size = size[0] if size[0] == size[1] else list(size)
    return (f"; it comes from tracing at format.input_size={size} while the backbone's img_size is {trained} "
            f"(the position embeddings are resampled): export at format.input_size={trained}")


def _file_opset(path: Path) -> int | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


@contextlib.contextmanager
def _quiet_fds() -> Iterator[None]:
    """File descriptors 1 and 2 sent to a scratch file: C++ code writes there, past ``sys.stdout``."""
    try:
        saved = [os.dup(fd) for fd in (1, 2)]
    except OSError:  # no such descriptors (an embedded interpreter): nothing to silence
        yield
        return
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):  # what is buffered goes out first
        if stream is not None:
            stream.flush()
    with tempfile.TemporaryFile() as sink:
        try:
            for fd in (1, 2):
                os.dup2(sink.fileno(), fd)
            yield
        finally:
            for fd, old in zip((1, 2), saved):
                os.dup2(old, fd)
                os.close(old)


def _first_line(e: BaseException) -> str:
    """The first line of the error that started it all (the exporter wraps it in pages of advice)."""
    from mtl.progress_log import strip_ansi

    root = e
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    lines = [ln.strip() for ln in strip_ansi(str(root)).splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    return f"{type(root).__name__}: {text}" if root is not e else text


_OP_PATTERNS = (
    re.compile(r"operator '(aten::[\w.]+)'"),
    re.compile(r"No ONNX function found for <OpOverload\(op='([\w.]+)'"),
    re.compile(r"target=torch\.ops\.([\w.]+?)(?:\.default)?\]"),
)


def unsupported_operator(e: BaseException) -> str | None:
    """The operator an exporter error complains about (``aten::i0``, ``prims.bessel_i0``), if any."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e)
        for pattern in _OP_PATTERNS:
            m = pattern.search(text)
            if m:
                return m.group(1)
        e = e.__cause__ or e.__context__
    return None


def _stem(op: str) -> str:
    # "aten::special_bessel_j0.default" / "prims.bessel_i0" -> "special_bessel_j0" / "bessel_i0"
    name = op.split("::")[-1]
    parts = [p for p in name.split(".") if p not in ("default", "Tensor", "Scalar")]
    return parts[-1] if parts else name


def locate_operator(model: nn.Module, x: torch.Tensor, tasks: Sequence[str], op: str) -> str | None:
    """Run the model once and return the qualified name of the innermost module whose code calls ``op``
    (matched by name stem, so a decomposed ``prims.bessel_i0`` finds the ``aten::i0`` call). The module
    is read off the Python call stack (the nearest frame whose ``self`` is one of the model's modules), so
    a method other than ``forward`` (``decoder.shared``, ``experts.dense``) is found too; forward hooks
    would see only ``forward`` calls and name the outermost caller."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    stem = _stem(op)
    labels = {id(m): f"{qual or 'model'} ({type(m).__name__})" for qual, m in model.named_modules()}
    found: list[str] = []

    def caller() -> str:
        frame = sys._getframe(2)
        while frame is not None:
            owner = frame.f_locals.get("self") if "self" in frame.f_code.co_varnames else None
            if owner is not None and id(owner) in labels:
                return labels[id(owner)]
            frame = frame.f_back
        return "(top level)"

    def seen(name: str) -> None:
        if not found and (name == stem or name.endswith("_" + stem) or stem.endswith("_" + name)):
            found.append(caller())

    class Spy(TorchDispatchMode):  # aten calls, after decomposition (prims.bessel_i0 -> aten::i0)
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen(_stem(func._schema.name))
            return func(*args, **(kwargs or {}))

    class FunctionSpy(TorchFunctionMode):  # Python-level calls, before a composite op is decomposed into
        def __torch_function__(self, func, types, args=(), kwargs=None):  # kernels of other names (sdpa)
            seen(getattr(func, "__name__", ""))
            return func(*args, **(kwargs or {}))

    try:
        with torch.no_grad(), FunctionSpy(), Spy():
            model(x, tasks=list(tasks))
    except Exception:
        pass  # the export error is the one to report
    return found[0] if found else None


def verify(graph: TaskGraph, path: Path, size: int | tuple[int, int], batches: Sequence[int], atol: float, rtol: float,
           seed: int) -> dict[str, Any]:
    """ONNX Runtime vs PyTorch on random uint8 batches; raises ExportError beyond tolerance."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    if names != list(graph.task_names):  # outputs are compared by position: their names must say the same
        raise ExportError(f"the ONNX file's outputs are {names}, expected {list(graph.task_names)}")
    gen = torch.Generator().manual_seed(seed + 1)
    worst: dict[str, float] = {t: 0.0 for t in graph.task_names}
    shapes: list[tuple[int, ...]] = []
    for b in batches:
        x = torch.randint(0, 256, (int(b), 3, *image_hw(size)), dtype=torch.uint8, generator=gen)
        with torch.no_grad():
            ref = [r.float().numpy() for r in graph(x)]
        got = session.run(None, {INPUT_NAME: x.numpy()})
        shapes = [r.shape for r in ref]
        for t, r, g in zip(graph.task_names, ref, got):
            if g.shape != r.shape:
                raise ExportError(f"ONNX Runtime output '{t}' has shape {g.shape} for batch {b}, PyTorch {r.shape}")
            if not np.isfinite(r).all():
                raise ExportError(f"PyTorch's own output '{t}' holds NaN or Inf on random uint8 images (batch {b}): "
                                  "the model is not fit to export; the file was not kept")
            if not np.isfinite(g).all():  # a NaN difference passes any `> tolerance` test
                raise ExportError(f"ONNX Runtime output '{t}' holds NaN or Inf where PyTorch's is finite (batch {b}); "
                                  "the file was not kept")
            excess = np.abs(g - r) - (atol + rtol * np.abs(r))
            err = float(np.abs(g - r).max()) if r.size else 0.0
            worst[t] = max(worst[t], err)
            if r.size and float(excess.max()) > 0:
                raise ExportError(f"ONNX Runtime output '{t}' differs from PyTorch by up to {err:.3g} at batch {b} "
                                  f"(tolerance atol={atol:g} + rtol={rtol:g}*|value|); the file was not kept")
    print(f"ONNX Runtime == PyTorch within atol={atol:g} + rtol={rtol:g}*|value| on batches {list(batches)}: "
          + ", ".join(f"{t} max |diff| {e:.2e}" for t, e in worst.items()), flush=True)
    return {"runtime": f"onnxruntime {ort.__version__}", "batches": list(batches), "atol": atol, "rtol": rtol,
            "max_abs_diff": worst, "passed": True, "shapes": shapes}
