"""Class-name lists (``data/voc.txt``, ``data/coco.txt`` or a user's file)."""

from __future__ import annotations

import sys
from pathlib import Path

from wsss.errors import WsssError

BUILTIN_CLASS_LISTS = ("voc", "coco")


def _builtin_dirs() -> list[Path]:
    # Source checkout / editable install first, then the copy installed by data_files.
    return [Path(__file__).resolve().parents[1] / "data", Path(sys.prefix) / "share" / "wsss" / "data"]


def read_class_file(path: str | Path) -> list[str]:
    """Return the class names of a text file, one per line (blank lines ignored)."""
    path = Path(path)
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except OSError as err:
        raise WsssError(f"{path}: cannot read class list ({err.strerror})") from None
    names = [name for name in names if name]
    if not names:
        raise WsssError(f"{path}: class list is empty")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise WsssError(f"{path}: duplicate class names {duplicates}")
    return names


def builtin_classes(name: str) -> list[str]:
    """Return a built-in class list (``"voc"``: 21 names, ``"coco"``: 81), background first."""
    if name not in BUILTIN_CLASS_LISTS:
        raise KeyError(f"unknown class list {name!r}; choose from {list(BUILTIN_CLASS_LISTS)}")
    for folder in _builtin_dirs():
        path = folder / f"{name}.txt"
        if path.is_file():
            return read_class_file(path)
    raise WsssError(f"{name}.txt: built-in class list not found (is the package installed?)")
