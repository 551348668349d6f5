"""Why a weights-only ``torch.load`` refused a file, in one line (a run's ``ckpt_path``, a merge's torch-file inputs)."""
from __future__ import annotations

import pickle
import re

__all__ = ["blocked_global", "torch_load_refusal"]

#: the weights-only unpickler's refusals of content it read (a global, a class, a reduce call not allowlisted); its
#: other errors (an opcode it does not know, a string too long) say the bytes are no pickle torch wrote
_BLOCKED = re.compile(r"(?i)unsupported global|unsupported class|unrecognized function|add_safe_globals")


def blocked_global(error: BaseException) -> bool:
    """Whether ``error`` is a weights-only load's refusal of a pickle needing more than tensors and plain data (an
    unsupported global), not a file that is no checkpoint at all (a text file: 'Unsupported operand 110')."""
    return isinstance(error, pickle.UnpicklingError) and bool(_BLOCKED.search(_reason(str(error))))


def torch_load_refusal(what: str, error: BaseException) -> str:
    """One line saying why a weights-only ``torch.load`` of ``what`` (a file, or ``ckpt_path <file>``) failed: a
    pickle needing more than tensors and plain data, named by the global it was refused (``posix.system``), never
    with torch's advice to load it with weights_only=False (which runs the file's code); else not a checkpoint at
    all (a zip of other files, a text file), with torch's first line of reason."""
    text = _reason(str(error))
    if blocked_global(error):
        found = re.search(r"(?i)unsupported global:?\s+(?:GLOBAL\s+)?([\w.]+)", text)  # torch ≤ 2.5 and later wordings
        blocked = f"unsupported GLOBAL {found.group(1)}" if found else _first_reason(text, type(error).__name__)
        return f"{what}: refused, it needs unpickling beyond tensors and plain data ({blocked}; a weights-only torch.load blocks it)"
    return f"{what}: not a PyTorch/Lightning checkpoint ({_first_reason(text, type(error).__name__)})"


def _reason(text: str) -> str:
    """The weights-only unpickler's own words, without torch's advice around them (which names add_safe_globals
    whatever the error)."""
    found = re.search(r"WeightsUnpickler error:(.*?)(?:Check the documentation of torch\.load|$)", text, re.S)
    return found.group(1) if found else text


def _first_reason(text: str, default: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return next((ln for ln in lines if not re.search(r"weights_only|Weights only load failed|torch\.load", ln)), default)
