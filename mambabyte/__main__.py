"""``python -m mambabyte <command>`` (and ``torchrun -m mambabyte train ...``)."""

import sys

from .cli.main import main

sys.exit(main())
