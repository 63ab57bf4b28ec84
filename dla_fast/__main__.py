"""`python -m dla_fast bench | cost | info` (the `dla-fast` console script runs the same `main`)."""
import sys

from dla_fast.cli import main

if __name__ == "__main__":
    sys.exit(main())
