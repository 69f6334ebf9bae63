"""``python -m mixrun``: the ``mixrun`` command."""

import sys

from mixrun.cli import main

sys.exit(main())
