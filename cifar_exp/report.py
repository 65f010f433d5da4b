"""`python -m cifar_exp.report`: the runs report (cifar_exp.tracking.report)."""

from typing import NoReturn

from cifar_exp.quick_exit import run_and_exit
from cifar_exp.tracking.report import main


def command() -> NoReturn:
    """`python -m cifar_exp.report` and `cifar-exp-report`: main(), then a quick
    exit (cifar_exp.quick_exit)."""
    run_and_exit(main)


if __name__ == "__main__":
    command()
