"""``python -m agent.cli``: the ``ferry`` command (the lab and the tests run it so)."""

import sys

from . import main

sys.exit(main())
