# SPDX-License-Identifier: MIT
"""``python -m pysbn {demo,bench,info}``: the command line of :mod:`pysbn.tools.cli`."""
from pysbn.tools.cli import main

if __name__ == "__main__":
    raise SystemExit(main(prog="python -m pysbn"))
