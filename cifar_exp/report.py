"""`python -m cifar_exp.report`: the runs report (cifar_exp.tracking.report)."""

import sys

from cifar_exp.tracking.report import main

if __name__ == "__main__":
    sys.exit(main())
