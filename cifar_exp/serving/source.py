"""Which trained model a command uses, named the same way by evaluate and predict:
`--run <MLflow run id>` (with `--tracking-uri`, the run's store) or `--checkpoint <file>`.
Only argparse here: `--help` loads neither torch nor MLflow."""

from __future__ import annotations

import argparse
from pathlib import Path

from cifar_exp.config import DEFAULT_TRACKING_URI


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """--run / --checkpoint (exactly one) and --tracking-uri."""
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--run", metavar="RUN_ID", help="an MLflow run that trained a model")
    where.add_argument("--checkpoint", type=Path, help="a checkpoint file")
    parser.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI,
                        help=f"the store of --run (default {DEFAULT_TRACKING_URI})")
