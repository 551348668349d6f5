"""Coefficient layouts: which merged tensors share a coefficient row.

| granularity | rows | shape of the coefficients |
|---|---|---|
| `task` | one row for the whole model | (T,) |
| `layer` | one row per merged tensor (AdaMerging's "layer-wise") | (tensors, T) |
| `block` | one row per parameter block (aTLAS); `blocks="tensor"` (each weight / bias, as in the paper), `"module"` (tensors of one module share a row) or `{name: regex}` | (blocks, T) |
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

__all__ = ["GRANULARITIES", "Layout", "check_blocks", "check_patterns", "make_layout"]

GRANULARITIES = ("task", "layer", "block")


@dataclass
class Layout:
    granularity: str
    groups: list[str]
    group_of: dict[str, int]

    @property
    def rows(self) -> int:
        return len(self.groups)

    def shape(self, T: int) -> tuple[int, ...]:
        return (T,) if self.granularity == "task" else (self.rows, T)

    def select(self, patterns: Sequence[str] | str | None) -> list[int]:
        """Rows whose name matches any regex in `patterns` (all rows for None); an unmatched pattern is an error."""
        if patterns is None:
            return list(range(self.rows))
        rows: set[int] = set()
        for rx in check_patterns(patterns):
            hit = [i for i, g in enumerate(self.groups) if rx.search(g)]
            if not hit:
                some = ", ".join(self.groups[:6]) + (", ..." if self.rows > 6 else "")
                raise ValueError(f"learn_blocks: {rx.pattern!r} matches no {self.granularity} (there are {self.rows}: {some})")
            rows.update(hit)
        return sorted(rows)


def _compile(p: str, what: str) -> re.Pattern:
    try:
        return re.compile(p)
    except (re.error, TypeError) as e:
        raise ValueError(f"{what}: {p!r} is not a regular expression ({e})") from None


def check_patterns(patterns: Sequence[str] | str | None) -> list[re.Pattern]:
    """`learn_blocks` as compiled regexes (none for None); an empty list, which would learn nothing, is an error."""
    if patterns is None:
        return []
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    if not patterns:  # every step would run and leave the coefficients at init
        raise ValueError("learn_blocks=[] selects no block; use null (None) to learn every block")
    return [_compile(p, "learn_blocks") for p in patterns]


def check_blocks(blocks: str | Mapping[str, str]) -> None:
    if isinstance(blocks, Mapping):
        for p in blocks.values():
            _compile(p, "blocks")
    elif blocks not in ("tensor", "module"):
        raise ValueError(f"unknown blocks {blocks!r}; valid: 'tensor', 'module' or a {{name: regex}} mapping")


def make_layout(keys: Sequence[str], granularity: str, blocks: str | Mapping[str, str] = "tensor") -> Layout:
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; valid: {', '.join(GRANULARITIES)}")
    if granularity == "task":
        return Layout("task", ["all"], {k: 0 for k in keys})
    if granularity == "layer" or blocks == "tensor":
        return Layout(granularity, list(keys), {k: i for i, k in enumerate(keys)})
    if blocks == "module":
        names: dict[str, int] = {}
        for k in keys:
            names.setdefault(k.rsplit(".", 1)[0], len(names))
        return Layout("block", list(names), {k: names[k.rsplit(".", 1)[0]] for k in keys})
    check_blocks(blocks)
    if isinstance(blocks, Mapping):
        rx = {name: re.compile(p) for name, p in blocks.items()}
        group_of, unmatched = {}, []
        for k in keys:
            hit = next((i for i, r in enumerate(rx.values()) if r.search(k)), None)
            if hit is None:
                unmatched.append(k)
            else:
                group_of[k] = hit
        used = set(group_of.values())
        empty = [n for i, n in enumerate(rx) if i not in used]
        wrong = []  # both mistakes in one message: fixing one would otherwise only reveal the other
        if unmatched:
            more = f" (and {len(unmatched) - 1} more)" if len(unmatched) > 1 else ""
            wrong.append(f"tensor {unmatched[0]!r}{more} matches no block pattern")
        if empty:
            wrong.append(f"block(s) {', '.join(map(repr, empty))} match no merged tensor")
        if wrong:
            raise ValueError(f"blocks: {'; '.join(wrong)}")
        return Layout("block", list(rx), group_of)
    raise AssertionError("unreachable: check_blocks refused it")
