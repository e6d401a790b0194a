"""The progress bars of every stage, under one policy.

A bar is drawn when the caller wants one, INFO messages are on (``wsss -q`` hides the bars
with the info lines) and standard error is a terminal: redirected to a log file, a bar would
write thousands of carriage-return updates, while the stages log their per-epoch and summary
lines anyway.  ``WSSS_PROGRESS=1`` draws bars into files too, ``WSSS_PROGRESS=0`` never.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Iterable

from tqdm import tqdm


def enabled(show: bool = True) -> bool:
    """Whether a bar asked for with ``show`` is drawn (see the module docstring)."""
    forced = os.environ.get("WSSS_PROGRESS", "").strip()
    if not show or forced == "0":
        return False
    if not logging.getLogger().isEnabledFor(logging.INFO):
        return False
    return forced == "1" or sys.stderr.isatty()


def bar(iterable: Iterable | None = None, *, show: bool = True, unit: str = "img", **kwargs: Any) -> tqdm:
    """A tqdm bar over ``iterable`` (or with ``total=``) that follows :func:`enabled`."""
    return tqdm(iterable, disable=not enabled(show), unit=unit, dynamic_ncols=True, **kwargs)
