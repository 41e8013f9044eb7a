"""`python -m stochdepth.bench`: see stochdepth.bench for what it measures."""

import sys

from stochdepth.bench import main

sys.exit(main())
