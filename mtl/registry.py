"""One tiny registry type, used for every pluggable concept (tasks, backbones, decoders, balancers, ...)."""
from __future__ import annotations

import math
from typing import Callable, Generic, Iterable, Iterator, Mapping, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """Raised for a name that is not registered; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would repr() the message and add quotes
        return str(self.args[0])


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            key = name or getattr(obj, "__name__")
            if key in self._items:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._items[key] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; valid names: {', '.join(sorted(self._items))}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={self.names()})"


def is_integral(value: object) -> bool:
    """An integer as a setting takes one: a Python or numpy int, not a bool (numpy's bool is no number)."""
    import numpy as np

    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """A real number as a setting takes one: a Python or numpy int or float, not a bool. Only those whose value
    is a Python number (np.longdouble's .item() is itself; Fraction and Decimal have none): anything else would be
    recorded as it is, and checkpoints (torch.load(weights_only=True)) and config.json cannot hold it."""
    import numpy as np

    return is_integral(value) or isinstance(value, float) or (
        isinstance(value, np.floating) and type(value.item()) is float)


#: the test a declared scalar passes: numpy's numbers too (np.float32 from a grid, np.int64 from np.arange), as
#: Python's do (a bool is refused where it is not declared)
_SCALARS = {"int": is_integral, "float": is_real, "bool": lambda v: isinstance(v, bool),
            "str": lambda v: isinstance(v, str)}


def keyword_parameters(fn: Callable) -> dict:
    """``fn``'s parameters; for a class whose ``__init__`` hands ``**kwargs`` on to its base's, the base's too
    (NYUv2DataModule's size, n_train, ... are DenseBenchmarkDataModule's), so they count as known settings."""
    import inspect

    params = dict(inspect.signature(fn).parameters)
    for base in fn.__mro__[1:] if inspect.isclass(fn) else ():
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()) or base is object:
            break
        if "__init__" not in vars(base):
            continue
        inherited = list(inspect.signature(base.__init__).parameters.items())[1:]  # without self
        params = {**{n: p for n, p in params.items() if p.kind is not p.VAR_KEYWORD},
                  **{n: p for n, p in inherited if n not in params}}
    return params


def check_kwargs(fn: Callable, kwargs: dict, what: str, given: tuple[str, ...] | Mapping[str, str] = ()) -> None:
    """Refuse an unknown keyword (unless ``fn`` takes ``**kwargs``) or one of the wrong scalar type before
    ``fn`` sees it, naming the field (``given``: parameters the caller fills itself, neither listed nor taken as
    settings; as ``{name: how it is set}``, such a setting is refused as set by mtlkit, saying how): a string where an ``int``/``float``/``bool`` is declared (``decoder.channels="16"``) would otherwise fail
    deep inside torch with a message about something else; so would None (``balancer.c=null``) where neither the
    annotation (``X | None``) nor the default (None) allows it. Other annotations are not checked."""
    import inspect

    try:
        params = keyword_parameters(fn)
    except (TypeError, ValueError):
        return
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key, value in kwargs.items():
        p = None if key in given else params.get(key)
        if key in given and key in params and isinstance(given, Mapping):  # a real argument, filled by the job
            raise TypeError(f"{what}.{key} is set by mtlkit ({given[key]})")
        if p is None and not open_ended:  # named here, not as "__init__() got an unexpected keyword"
            settings = [n for n, q in params.items() if q.kind in (q.POSITIONAL_OR_KEYWORD, q.KEYWORD_ONLY)
                        and n not in ("self", "in_channels", "tasks", *given)]
            raise TypeError(unknown_settings(what, [key], settings))
        if p is None or p.annotation is inspect.Parameter.empty:
            continue
        hint = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", "")
        alts = [a.strip() for a in hint.split("|")]
        if not alts or any(a not in _SCALARS and a != "None" for a in alts):
            continue  # containers, unions with other types, Optional[...], Any: not ours to judge
        if value is None and ("None" in alts or p.default is None):
            continue  # None is one of its types or its default
        if not any(_SCALARS[a](value) for a in alts if a in _SCALARS):
            got = "None" if value is None else f"{value!r} ({type(value).__name__})"
            raise TypeError(f"{what}.{key} must be {' or '.join(a for a in alts if a != 'None')}, got {got}")


#: characters typed for one another (O/0, l/1, I/1), applied after case folding (so L and i fold too); a name equal
#: to the typed one once case and these are folded is the one meant, however many others are as close by edit distance
_LOOK_ALIKE = str.maketrans("oil", "011")


def _folded(name: str) -> str:
    return name.casefold().translate(_LOOK_ALIKE)


def close_names(key: str, known: Iterable[str], cutoff: float = 0.75, most: int = 3) -> list[str]:
    """The known names a misspelt ``key`` most likely meant: those equal to it but for case and look-alike characters
    (those differing in case alone first), else those scoring best by difflib's ratio (>= ``cutoff``), every one of an equal best (in ``known``'s
    order: which of equally close names was meant cannot be told), at most ``most``; [] when nothing is close."""
    import difflib

    known = list(dict.fromkeys(known))
    alike = [k for k in known if k != key and _folded(k) == _folded(key)]
    if alike:  # those differing from it in case alone first
        return sorted(alike, key=lambda k: k.casefold() != key.casefold())[:most]
    matcher, scores = difflib.SequenceMatcher(), {}
    matcher.set_seq2(key)
    for name in known:  # difflib.get_close_matches' scoring, keeping ties (it keeps the largest string of them)
        matcher.set_seq1(name)
        if matcher.real_quick_ratio() >= cutoff and matcher.quick_ratio() >= cutoff and matcher.ratio() >= cutoff:
            scores[name] = matcher.ratio()
    best = max(scores.values(), default=None)
    return [name for name, score in scores.items() if score == best][:most]


def closest(key: str, known: Iterable[str], cutoff: float = 0.75, prefix: str = "") -> str | None:
    """The hint for a misspelt ``key``: the `close_names`, each after ``prefix``, as ``"a"`` or ``"a or b"``;
    None when nothing is close."""
    names = close_names(key, known, cutoff)
    return " or ".join(prefix + n for n in names) if names else None


def meant(unknown: Iterable[str], accepted: Iterable[str]) -> str:
    """' (did you mean <key>, ...?)' for the accepted keys the unknown ones most likely misspell; '' when none is
    close."""
    accepted = list(accepted)
    guesses = [g for k in unknown if (g := closest(k, accepted))]
    return f" (did you mean {', '.join(guesses)}?)" if guesses else ""


def unknown_settings(what: str, keys: list[str], settings: list[str]) -> str:
    """'unknown setting <what>.<key> (did you mean <what>.<close>?); the settings here are: ...', each key with
    its close known one if any; nothing close, no guess."""
    named = []
    for key in keys:
        close = closest(key, settings, prefix=f"{what}.")
        named.append(f"{what}.{key}" + (f" (did you mean {close}?)" if close else ""))
    return f"unknown setting{'s' if len(keys) > 1 else ''} {', '.join(named)}; the settings here are: {', '.join(settings)}"


def check_bool(key: str, value: object) -> bool:
    """A switch must be a real bool: ``bool("no")`` is True, so a string would silently switch it on."""
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    return value


def check_number(key: str, value: object, low: float = 0.0) -> float:
    """A finite number (int or float, numpy's too; not a bool) >= ``low``, as a float; else one error naming the key."""
    if not is_real(value) or not math.isfinite(value) or value < low:
        raise ValueError(f"{key} must be a finite number >= {low:g}, got {value!r}")
    return float(value)


def check_int(key: str, value: object, low: int = 0, note: str = "") -> int:
    """``value`` as a setting named ``key`` must be an int >= ``low`` (numpy's too; a bool is not one), returned as
    a Python int; else one error naming the key, so a bad setting is refused before the work it would spoil."""
    if not is_integral(value) or value < low:
        raise ValueError(f"{key} must be an int >= {low}{note}, got {value!r}")
    return int(value)


#: the seeds torch's generators take (torch.manual_seed, torch.Generator.manual_seed); a negative one is read
#: modulo 2**64, so the seeds [-2**63, 2**64) name 2**64 streams
SEED_LOW, SEED_HIGH = -2**63, 2**64 - 1


def _bound(n: int) -> str:
    return {SEED_LOW: "-2**63", SEED_HIGH: "2**64 - 1", 2**32 - 1: "2**32 - 1"}.get(n, str(n))


def check_seed(key: str, value: object, low: int = SEED_LOW, high: int = SEED_HIGH) -> int:
    """``value`` as a seed named ``key``: an integer (numpy's too, not a bool) in [low, high] — by default the range
    torch's generators take, where a larger one fails deep in torch as "Overflow when unpacking long long"."""
    if not is_integral(value) or not low <= value <= high:
        raise ValueError(f"{key} must be an int in [{_bound(low)}, {_bound(high)}], got {value!r}")
    return int(value)


def derived_seed(seed: int, offset: int) -> int:
    """The seed of a stream derived from ``seed`` (seed + offset) as torch takes it: reduced modulo 2**64, as torch
    reads a negative seed, so that a seed near the top of the range plus an offset does not overflow, and every
    other seed + offset names the same stream as before."""
    return (int(seed) + int(offset)) % 2**64



def check_indices(key: str, value: object, stages: int | None = None) -> list[int]:
    """Feature-stage indices: a non-empty list of ints; given the number of ``stages``, the indices resolved (a
    negative one counts from the end, as timm's) must be distinct and increasing: a backbone returns its maps in
    stage order, once each, so any other list disagrees with the channels declared from it. Whether each lies
    within the stages is the backbone's to check (timm's feature_info, slim_resnet's range check)."""
    from collections.abc import Sequence

    shaped = isinstance(value, Sequence) and not isinstance(value, str) and len(value) > 0 and all(
        isinstance(i, int) and not isinstance(i, bool) for i in value)
    resolved = [i + stages if i < 0 else i for i in value] if shaped and stages is not None else []
    if not shaped or any(a >= b for a, b in zip(resolved, resolved[1:])):
        of = f" (of {stages} stages)" if stages is not None else ""
        raise ValueError(f"{key} must be a non-empty list of distinct increasing ints{of}, got {value!r}")
    return list(value)
