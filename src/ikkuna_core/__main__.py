"""``python -m ikkuna_core``: the ``ikkuna`` command."""

import sys

from .cli import main

sys.exit(main())
