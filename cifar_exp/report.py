"""`python -m cifar_exp.report`: the runs report (cifar_exp.tools.report)."""

import sys

from cifar_exp.tools.report import main

if __name__ == "__main__":
    sys.exit(main())
