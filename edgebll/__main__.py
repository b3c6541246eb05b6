"""``python -m edgebll`` = the ``edgebll`` command."""

import sys

from edgebll.cli import main

sys.exit(main())
