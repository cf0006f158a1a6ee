"""`python -m faasmoe.cli`: the same as the `faasmoe` console script."""

import sys

from faasmoe.cli import main

sys.exit(main())
