"""How far a packed sweep's stacked members are from the same jobs run one after another:
the same seeds, the same steps, each way through the real command; then, per seed, the
largest difference of the logged loss over all steps and of the final precision.

    CIFAR_EXP_DATA=<data> python experiments/packed_fidelity.py [--steps 200] [--seeds 3]

The stacked step runs the members' convolutions as one batched convolution (vmap), which
sums in another order than a lone job's: the differences are float32 rounding, compounded
over the steps. The table goes to stdout, in markdown."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient


def sweep(folder: Path, mode: str, steps: int, seeds: int) -> dict[int, dict[str, list]]:
    """Run the sweep with the packed launcher in `mode`; per seed, its loss history and
    final precision."""
    uri = f"sqlite:///{folder / f'{mode}.db'}"
    command = [sys.executable, "-m", "cifar_exp.run", "-m", "hydra/launcher=packed",
               f"hydra.launcher.mode={mode}", f"seed={','.join(map(str, range(seeds)))}",
               f"steps={steps}", "log_every=10", f"eval_every={steps}", "eval_images=2000",
               "tracking.log_model=false", "checkpoint.enabled=false", f"tracking.uri={uri}",
               f"hydra.sweep.dir={folder / mode}"]
    subprocess.run(command, check=True, cwd=folder, capture_output=True)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("cifar_exp")
    results = {}
    jobs = [run for run in client.search_runs([experiment.experiment_id])
            if run.data.tags.get("sweep") != "parent"]  # a filter needs the tag on all runs
    if len(jobs) != seeds:
        raise SystemExit(f"{mode}: {len(jobs)} jobs logged, {seeds} expected")
    for run in jobs:
        losses = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id,
                                                                            "loss"))
        results[int(run.data.params["seed"])] = {
            "loss": [value for _, value in losses],
            "precision": [run.data.metrics["precision"]]}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        stacked = sweep(Path(folder), "stacked", args.steps, args.seeds)
        alone = sweep(Path(folder), "sequential", args.steps, args.seeds)
    print("| seed | loss points | largest loss difference (relative) | precision stacked "
          "| precision one after another |")
    print("| --- | --- | --- | --- | --- |")
    for seed in sorted(alone):
        a, b = stacked[seed]["loss"], alone[seed]["loss"]
        relative = max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))
        print(f"| {seed} | {len(b)} | {relative:.2e} | {stacked[seed]['precision'][0]:.4f} "
              f"| {alone[seed]['precision'][0]:.4f} |")


if __name__ == "__main__":
    main()
