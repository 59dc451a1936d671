"""``python -m tuneshift.models.organism``: build the base / instruct model pair (see :mod:`tuneshift.models.organism.cli`)."""
import sys

from .cli import main

sys.exit(main())
