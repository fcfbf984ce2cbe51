"""`python -m experiments.report FOLDER ...` is `jaxinfer report FOLDER ...`."""

import sys

from jaxinfer.cli import main

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
