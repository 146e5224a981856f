"""``python -m kvbm_core.cli`` runs the ``kvbm`` command."""

import sys

from kvbm_core.cli.main import main

sys.exit(main())
