"""`python -m smp.checkpoint ...`: the smp-checkpoint command (smp/checkpoint/cli.py)."""

import sys

from smp.checkpoint.cli import main

if __name__ == "__main__":
    sys.exit(main())
