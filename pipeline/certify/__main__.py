"""``python -m pipeline.certify --help``: see :mod:`pipeline.certify.cli`."""

import sys

from pipeline.certify.cli import main

sys.exit(main())
