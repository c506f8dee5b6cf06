"""Warnings that point at the user's line: the first frame outside the seqwrap package."""
from __future__ import annotations

import os
import sys

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def user_stacklevel() -> int:
    """The `stacklevel` for a warnings.warn call made by the caller of this function so that the warning
    names the first frame outside seqwrap (the user's call, however deep inside seqwrap it was raised)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level
