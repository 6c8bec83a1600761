"""``python -m pigeon …`` (and ``accelerate launch -m pigeon …``): the ``pigeon`` command."""

import sys

from pigeon.cli import main

sys.exit(main())
