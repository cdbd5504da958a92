"""`python -m r1kit <verb> ...`: the same as the `r1kit` command, and what torchrun launches:

    torchrun --nproc-per-node 2 -m r1kit zero
"""
import sys

from r1kit.cli import main

if __name__ == "__main__":
    sys.exit(main())
