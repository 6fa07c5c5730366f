"""`python -m server` is the `concentric` command."""

import sys

from server.cli import main

sys.exit(main())
