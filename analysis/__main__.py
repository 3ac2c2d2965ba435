"""``python -m analysis --storage URL [--storage URL2 ...] [--study NAME] --out DIR``."""

import sys

from analysis.report import main

sys.exit(main())
