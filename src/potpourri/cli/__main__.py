"""``python -m potpourri.cli``: the same as the ``potpourri`` command."""

import sys

from potpourri.cli import main

sys.exit(main())
