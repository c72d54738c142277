"""``python -m fxdecomp ...`` (and ``torchrun ... -m fxdecomp extract ...``): the fxdecomp CLI."""
import sys

from fxdecomp.cli import main

if __name__ == "__main__":
    sys.exit(main())
