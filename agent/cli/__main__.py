"""``python -m agent.cli``: the ``ferry`` command (the lab and the tests run it so). Only
run as a program: the packages' import checks import every module, this one too."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
