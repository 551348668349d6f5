"""Which split of a local HF dataset serves as train, val and test: split names read as HF ``datasets`` reads them
(its ``data_files.SPLIT_KEYWORDS``), ``data.splits`` checked, and nothing left out or merged without a word."""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

from mtl.data.memory import SPLITS

log = logging.getLogger(__name__)

#: role -> the words HF datasets reads as that split, in file names and folder names
KEYWORDS = {"train": ("train", "training"), "test": ("test", "testing", "eval", "evaluation"),
            "val": ("validation", "valid", "dev", "val")}
#: role -> the name HF datasets gives the split its keyword files form
HF_NAME = {"train": "train", "val": "validation", "test": "test"}
_ALL_WORDS = ", ".join("/".join(words) for words in KEYWORDS.values())
#: HF's sharded layout ``data/<split>-00000-of-00001.parquet``: any word names a split there
_SHARDED = re.compile(r"^(\w+?)-\d{5}-of-\d{5}")


def role_of(name: str) -> str | None:
    """The role (train/val/test) a split name plays by HF's keywords, None for any other name."""
    return next((role for role, words in KEYWORDS.items() if name.lower() in words), None)


def split_of(rel: Path) -> str | None:
    """The split a parquet/arrow file belongs to (None: its path names none), from whole words of its path, the file
    name first (``data/validation-00000-of-00001.parquet`` and ``eval.parquet``: validation and test;
    ``latest/train.parquet``: train, not test). Keyword files take HF's split name (``val.parquet``: validation)."""
    if len(rel.parts) == 2 and rel.parts[0] == "data" and (m := _SHARDED.match(rel.name)):
        role = role_of(m[1])
        return HF_NAME[role] if role else m[1]
    for part in reversed(rel.with_suffix("").parts):
        words = set(re.split(r"[^a-z]+", part.lower()))
        role = next((role for role, names in KEYWORDS.items() if words & set(names)), None)
        if role:
            return HF_NAME[role]
    return None


def _sharded_word(name: str) -> str | None:
    """The split word of a sharded file name (``unsupervised-00000-of-00001.parquet``) in any folder."""
    return m[1] if (m := _SHARDED.match(name)) else None


def file_splits(path: Path, files: list[Path]) -> dict[Path, str]:
    """Each file's split; files that name none are train when no file names one (HF does the same), and refused
    otherwise: HF would leave them out, and adding them to train would mix their rows in unseen. Beside files
    that name a split, a sharded name outside ``data/`` names one too, as it would under ``data/``."""
    named = {f: split_of(f.relative_to(path) if path.is_dir() else Path(f.name)) for f in files}
    if any(named.values()):  # data.path = <dataset>/data: its shards' names still name their splits (unsupervised)
        named = {f: split or _sharded_word(f.name) for f, split in named.items()}
    unnamed = [f for f, split in named.items() if split is None]
    if unnamed and len(unnamed) < len(files):
        raise ValueError(f"hf_local: {unnamed[0]} names no split while other files in {str(path)!r} do "
                         f"({len(unnamed)} such file(s)); a split is named by a word of the path ({_ALL_WORDS}): "
                         "rename it or move it out")
    return {f: split or "train" for f, split in named.items()}


def check_splits(splits: Any) -> dict[str, str]:
    """``data.splits`` as {role: the dataset's split name}: roles are train/val/test, each split serves one role."""
    if splits is None:
        return {}
    if not isinstance(splits, Mapping):
        raise ValueError(f"hf_local: data.splits must map train/val/test to the dataset's split names "
                         f"(e.g. {{val: validation}}), got {splits!r}")
    for key, name in splits.items():
        if key not in SPLITS:
            near = f" (did you mean {role_of(str(key))}?)" if role_of(str(key)) else ""
            raise ValueError(f"hf_local: data.splits key {key!r} is not a split here{near}; the keys are "
                             f"{', '.join(SPLITS)}, each mapped to a split name of the dataset")
        if not isinstance(name, str) or not name:
            raise ValueError(f"hf_local: data.splits.{key} must be a split name of the dataset, got {name!r}")
    roles: dict[str, str] = {}
    for key, name in splits.items():
        if name in roles:  # e.g. {train: train, test: train}: the test set would be the training set
            raise ValueError(f"hf_local: data.splits maps both {roles[name]} and {key} to split {name!r}; "
                             "each split of the dataset serves one of train, val, test")
        roles[name] = key
    return dict(splits)


def choose_splits(available: Iterable[str], splits: Mapping[str, str], where: str) -> dict[str, str]:
    """{role: split name}: ``splits`` (checked) first, then the split whose name is the role's keyword; a role
    with none is left out (carved from train later). Two candidates for one role are refused; splits no role
    takes are named in a warning."""
    available = sorted(available)
    splits = {role: _split_named(name, role, available, where) for role, name in splits.items()}
    check_splits(splits)  # two keywords may name one split ({val: val, test: validation})
    chosen, taken = {}, set(splits.values())
    for role in SPLITS:
        if role in splits:
            chosen[role] = splits[role]
            continue
        found = [name for name in available if role_of(name) == role and name not in taken]
        if len(found) > 1:
            raise ValueError(f"hf_local: {where} has splits {found}, which all read as {role}; choose one with "
                             f"data.splits={{{role}: {found[0]}}}")
        if found:
            chosen[role] = found[0]
    unused = [name for name in available if name not in chosen.values()]
    if unused:
        log.warning("hf_local: split(s) %s of %s are not used (%s); map one with data.splits to use it", unused,
                    where, ", ".join(f"{role}: {name}" for role, name in chosen.items()))
    return chosen


def _split_named(name: str, role: str, available: list[str], where: str) -> str:
    """The split ``data.splits.<role>`` names: itself, or HF's name for it where keyword files formed the split
    (``val.parquet`` forms ``validation``, so {val: val} and {val: validation} both mean it, and {test: val} tests
    on it)."""
    if name in available:
        return name
    word_role = role_of(name)
    if word_role is not None and HF_NAME[word_role] in available:
        return HF_NAME[word_role]
    raise KeyError(f"hf_local: {where} has no split {name!r} (data.splits.{role}); splits: {', '.join(available)}")
