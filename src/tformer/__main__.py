"""`python -m tformer ...` runs the command line."""

import sys

from tformer.cli import main

sys.exit(main())
