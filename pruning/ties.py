"""Root channels tied to each other through a shared index of another member of their group.

GhostNet's cheap branch is a depthwise conv of the primary conv's output, concatenated after it: index
j of the primary conv feeds channels j and j + C/2 of the concatenation, which a residual adds to the
root's channels. The dependency graph lists each index of a member under one root channel only, so a
layer read off the whole group believes root channel j + C/2 owns nothing of the primary conv, while
removing it takes channel j along. Here removal is probed on the graph itself (no tensor is touched):
``untangle`` merges tied root channels into one unit, and ``mismatch`` verifies after a removal
that every member lost exactly what the plan says.
"""
from __future__ import annotations

from typing import Iterator, Sequence

from torch import nn

Key = tuple[str, bool]  # (module name, output side)


def touched(dg, root: nn.Module, idxs: Sequence[int], names: dict[nn.Module, str]) -> dict[Key, set[int]]:
    """What removing ``idxs`` of ``root``'s output channels removes, per member (nothing is pruned)."""
    pruner = dg.get_pruner_of_module(root)
    out: dict[Key, set[int]] = {}
    for item in dg.get_pruning_group(root, pruner.prune_out_channels, list(idxs)):
        target = item.dep.target.module
        if isinstance(target, nn.Module) and target in names and len(item.idxs):
            key = (names[target], dg.is_out_channel_pruning_fn(item.dep.handler))
            out.setdefault(key, set()).update(int(i) for i in item.idxs)
    return out


def planned(deps, units: Sequence[int]) -> dict[Key, set[int]]:
    """What the layer's plan says removing ``units`` removes, per member."""
    out: dict[Key, set[int]] = {}
    for d in deps:
        idxs = {i for u in units for i in d.local[u]}
        if idxs:
            out.setdefault((d.module, d.is_out), set()).update(idxs)
    return out


def _root_channels(deps, root_name: str, units: Sequence[int]) -> list[int]:
    root = next(d for d in deps if d.module == root_name and d.is_out)
    return sorted(i for u in units for i in root.local[u])


def _bit_sets(n: int) -> Iterator[list[int]]:
    """Unit sets that separate every pair of units (each bit of the index, and its complement)."""
    for b in range(max(n - 1, 0).bit_length()):
        yield [u for u in range(n) if u >> b & 1]
        yield [u for u in range(n) if not u >> b & 1]


def consistent(dg, root: nn.Module, root_name: str, deps, n: int, names) -> bool:
    """True when removing units removes exactly their planned indices. A unit reaching an index the
    plan gives another unit shows in the probe of some bit set holding one of the two but not the
    other, so 2·log2(n) probes settle it."""
    return all(touched(dg, root, _root_channels(deps, root_name, s), names) == planned(deps, s)
               for s in _bit_sets(n))


def untangle(dg, root: nn.Module, root_name: str, deps, n: int, names, dep_type) -> tuple[list, int] | str:
    """``(deps, root channels per unit)`` with tied root channels merged into one unit, or the reason
    the layer cannot be pruned."""
    if consistent(dg, root, root_name, deps, n, names):
        return deps, 1
    reach = [touched(dg, root, _root_channels(deps, root_name, [u]), names) for u in range(n)]
    parent = list(range(n))

    def find(u: int) -> int:
        while parent[u] != u:
            parent[u] = parent[parent[u]]
            u = parent[u]
        return u

    owner: dict[tuple[Key, int], int] = {}
    for u, r in enumerate(reach):
        for key, idxs in r.items():
            for i in idxs:
                parent[find(u)] = find(owner.setdefault((key, i), u))
    sets: dict[int, list[int]] = {}
    for u in range(n):
        sets.setdefault(find(u), []).append(u)
    units = sorted(sets.values())
    per_unit = {len(_root_channels(deps, root_name, s)) for s in units}
    if len(units) < 2:
        return "ties all its channels together (removing any removes all)"
    if len(per_unit) != 1:
        return f"ties its {n} channels into {len(units)} sets of unequal sizes {sorted(per_unit)}"
    keys = list(dict.fromkeys([(d.module, d.is_out) for d in deps] + [k for r in reach for k in r]))
    merged = [dep_type(m, is_out, [sorted({i for u in s for i in reach[u].get((m, is_out), ())}) for s in units])
              for m, is_out in keys]
    if not consistent(dg, root, root_name, merged, len(units), names):
        return "removal touches channels outside the plan even with tied channels merged"
    return merged, per_unit.pop()


def width(m: nn.Module, is_out: bool) -> int | None:
    """The size of ``m``'s output (``is_out``) or input channel side, when it has a known one."""
    if isinstance(m, nn.modules.conv._ConvNd):
        return m.out_channels if is_out else m.in_channels
    if isinstance(m, nn.Linear):
        return m.out_features if is_out else m.in_features
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return m.num_features
    return None


def widths(model: nn.Module, keys) -> dict[Key, int | None]:
    return {(name, is_out): width(model.get_submodule(name), is_out) for name, is_out in keys}


def mismatch(model: nn.Module, expected: dict[Key, set[int]], before: dict[Key, int | None]) -> str | None:
    """Which member did not lose exactly its planned number of channels (None: every one did)."""
    for (name, is_out), idxs in expected.items():
        was, now = before[(name, is_out)], width(model.get_submodule(name), is_out)
        if was is not None and was - now != len(idxs):
            side = "output" if is_out else "input"
            return f"removed {was - now} {side} channels of {name!r} where the plan removes {len(idxs)}"
    return None
