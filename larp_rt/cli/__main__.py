"""``python -m larp_rt.cli``: the ``larp-rt`` console script."""

import sys

from . import main

sys.exit(main())
