"""`python -m peftlab ...` (what torchrun starts in every process): the command line."""

import sys

from .cli import main

sys.exit(main())
