"""``python -m cucrf``: the same as the ``cucrf`` command."""

import sys

from .cli import main

sys.exit(main())
