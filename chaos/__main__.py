"""`python -m chaos` is `raftpbx-chaos`."""

import sys

from chaos.cli import main

sys.exit(main())
