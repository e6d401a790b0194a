"""The one exception type that means "the user's input is wrong"."""

from __future__ import annotations


class WsssError(Exception):
    """Bad input or an unusable artifact.

    The message is one line that names the file (or option) and what is wrong;
    the command line turns it into ``Error: <message>`` and a non-zero exit
    without a traceback.
    """
