"""``python -m fastpeft.bench``: the whole-step benchmark's command line (``fastpeft/bench/cli.py``)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
