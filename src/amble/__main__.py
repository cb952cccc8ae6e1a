"""``python -m amble`` is the ``amble`` command (how the driver starts local workers)."""

import sys

from amble.cli import main

sys.exit(main())
