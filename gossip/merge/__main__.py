"""``python -m gossip.merge``: see :mod:`gossip.merge.cli`."""

import sys

from gossip.merge.cli import main

sys.exit(main())
