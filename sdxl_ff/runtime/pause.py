"""Developer-only pause points, so that tests signal or kill a process at an exact place instead of racing it."""

from __future__ import annotations

import os
import sys

PAUSE_FOLDER_VARIABLE = "SDXL_FF_PAUSE_AT"


def pause_point(name: str) -> None:
    """Inert unless SDXL_FF_PAUSE_AT names a folder holding a FIFO called `name`: then say so on stderr
    ("pause point NAME: held") and block until the test opens that FIFO for writing and closes it."""
    folder = os.environ.get(PAUSE_FOLDER_VARIABLE)
    if folder and os.path.exists(fifo := os.path.join(folder, name)):
        print(f"pause point {name}: held", file=sys.stderr, flush=True)
        with open(fifo) as held:
            held.read()
