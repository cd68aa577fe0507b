"""``python -m localvol_fast ...`` runs the ``localvol`` command line."""

import sys

from localvol_fast.apps.cli import main

sys.exit(main())
