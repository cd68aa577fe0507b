"""``python -m localvol_fast ...`` runs the ``localvol`` command line."""

import sys

from .cli import main

sys.exit(main())
