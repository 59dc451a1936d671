"""``python -m framework.organism``: build the base / instruct model pair (see :mod:`framework.organism.cli`)."""
import sys

from .cli import main

sys.exit(main())
