"""Environment variables a run sets for itself, put back as they were once it ends."""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterable, Iterator


@contextmanager
def restored_environ(keys: Iterable[str]) -> Iterator[None]:
    """``keys`` of ``os.environ`` are as they were before the block once it ends, however it ends (set back, or
    removed when they were unset)."""
    before = {k: os.environ.get(k) for k in keys}
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
