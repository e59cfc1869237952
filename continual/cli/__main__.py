"""``python -m adafuse.continual.cli``: the same as the ``adafuse`` command."""

import sys

from adafuse.continual.cli import main

sys.exit(main())
