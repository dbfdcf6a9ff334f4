"""`python -m trainer fit ...` (and `torchrun ... -m trainer fit ...`): the `trainer` command."""

import sys

from .cli import main

sys.exit(main())
