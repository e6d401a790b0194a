"""The one exception type that means "the user's input is wrong", and checks shared by settings."""

from __future__ import annotations

import dataclasses
import math
import numbers


class WsssError(Exception):
    """Bad input or an unusable artifact.

    The message is one line that names the file (or option) and what is wrong;
    the command line turns it into ``Error: <message>`` and a non-zero exit
    without a traceback.
    """


# config fields whose command-line option is not simply "--" + the field with dashes
_IRREGULAR_OPTIONS = {"out_dir": "--out", "out_file": "--out", "cam_dir": "--cams", "pred_dir": "--pred",
                      "reliability_dir": "--reliability", "compile_model": "--compile", "evaluate": "--eval"}


def option_name(field: str) -> str:
    """The command-line option of a stage config field, for messages: ``batch_size`` -> ``--batch-size``."""
    return _IRREGULAR_OPTIONS.get(field, "--" + field.replace("_", "-"))


def non_finite_field(settings) -> str | None:
    """The name of the first real-number field of a dataclass that is NaN or infinite, else None."""
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isfinite(value):
            return field.name
    return None


def check_finite_fields(settings) -> None:
    """Raise ValueError naming the first real-number field of a dataclass that is NaN or infinite.

    Settings dataclasses (CRF, GMM, refinement) call it first in ``__post_init__``: a NaN passes
    every ``x < bound`` test, and some native code (pydensecrf) crashes on one.
    """
    name = non_finite_field(settings)
    if name is not None:
        raise ValueError(f"{name} must be a finite number, got {getattr(settings, name)}")
