"""`python -m stochdepth.bench`: see stochdepth.bench.cli for the options."""

import sys

from stochdepth.bench.cli import main

sys.exit(main())
