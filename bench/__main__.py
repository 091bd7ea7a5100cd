"""``python -m bench paper`` is ``agent bench paper`` (with the configuration from the environment)."""

import sys

from bench.cli import main

sys.exit(main(prog="python -m bench"))
