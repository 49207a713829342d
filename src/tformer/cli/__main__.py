"""`python -m tformer.cli ...` (torchrun runs the CLI this way)."""

import sys

from tformer.cli import main

sys.exit(main())
