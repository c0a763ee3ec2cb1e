#!/usr/bin/env python3
"""extract_module_outputs.py: thin wrapper over :func:`mambabyte.cli.extract.main_module_outputs` (see its --help)."""

import os
import sys

if __name__ == "__main__":
    # running from a checkout without installing: make the package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from mambabyte.cli.extract import main_module_outputs

    sys.exit(main_module_outputs(sys.argv[1:]))
