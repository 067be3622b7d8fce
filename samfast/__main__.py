"""``python -m samfast``: samfast-doctor (versions, build, correctness and bandwidth of every
backend on every device)."""

import sys

from .doctor import main

sys.exit(main())
