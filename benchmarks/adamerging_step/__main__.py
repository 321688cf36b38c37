"""``python -m benchmarks.adamerging_step [options]``: see :mod:`benchmarks.adamerging_step`."""

import sys

from .cli import main

sys.exit(main())
