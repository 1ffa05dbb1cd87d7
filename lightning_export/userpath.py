"""The user's project on the import path: its own classes import from its root, as with `python -m`."""

from __future__ import annotations

import os
import sys


def ensure_cwd_importable() -> None:
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
