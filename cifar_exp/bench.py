"""`python -m cifar_exp.bench`: the throughput benchmark (cifar_exp.tools.bench)."""

from typing import NoReturn

from cifar_exp.quick_exit import run_and_exit
from cifar_exp.tools.bench import main


def command() -> NoReturn:
    """`python -m cifar_exp.bench` and `cifar-exp-bench`: main(), then a quick
    exit (cifar_exp.quick_exit)."""
    run_and_exit(main)


if __name__ == "__main__":
    command()
