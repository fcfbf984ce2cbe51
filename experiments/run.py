"""`python -m experiments.run CONFIG [overrides]` is `jaxinfer run CONFIG [overrides]`."""

import sys

from jaxinfer.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
