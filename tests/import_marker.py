"""A module that records that it was imported: the tests that a device or a worker imports nothing a
remote party names check that this never ran. ``AMBLE_TEST_IMPORT_MARKER`` names the file it writes."""

from __future__ import annotations

import os
from pathlib import Path

_marker = os.environ.get("AMBLE_TEST_IMPORT_MARKER")
if _marker:
    Path(_marker).write_text("imported")
