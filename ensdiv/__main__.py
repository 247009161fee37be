"""``python -m ensdiv ...`` runs the command line (also under ``torchrun -m ensdiv``)."""

import sys

from ensdiv.cli import main

sys.exit(main())
