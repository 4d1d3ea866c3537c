"""`python -m lessons_lib`: the health check (lesson 00 explains every line)."""

import sys

from lessons_lib.health import main

sys.exit(main())
