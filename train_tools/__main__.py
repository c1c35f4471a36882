"""``python -m train_tools``: the command line (and, with no command, the app)."""

import sys

from .cli import main

sys.exit(main())
