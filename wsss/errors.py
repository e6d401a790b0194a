"""The one exception type that means "the user's input is wrong", and option names for its messages."""

from __future__ import annotations


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
