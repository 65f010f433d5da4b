#!/usr/bin/env bash
# The fast recipes on one GPU, in one call sized for one H100 (a few minutes), nothing
# from the network:
#   1. experiment=fast94 for each seed in SEEDS (default 0 1 2 3 4);
#   2. each recipe in OTHERS (default "fast96 resnet18") for each seed in OTHER_SEEDS
#      (default 0; "0 1 2 3 4" for 5 seeds each: about 10 minutes for both on an H200,
#      estimated from one seed's training times and start-up);
#   3. a table: precision@1 and training seconds per run, and each recipe's mean ± std
#      where it ran more than one seed.
#
#   CIFAR_EXP_DATA=/path/to/data bash experiments/fast_gpu.sh [extra overrides]
#
# Environment: OUT (results folder, default ./fast_gpu_results), SEEDS, OTHERS (either may
# be empty), OTHER_SEEDS, PYTHON (default python3). Extra overrides apply to every run
# (e.g. steps=20 for a smoke test).
set -euo pipefail
out=${OUT:-fast_gpu_results}
python=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
"$python" -c 'import torch; print("torch", torch.__version__, "device",
  torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")'

run() {  # run RECIPE SEED [overrides]
  local recipe=$1 seed=$2
  shift 2
  "$python" -m cifar_exp.run experiment="$recipe" seed="$seed" \
    tracking.uri="sqlite:///$out/mlflow.db" hydra.run.dir="$out/hydra/${recipe}_$seed" "$@" \
    2>&1 | tee "$out/${recipe}_$seed.log"
}

for seed in ${SEEDS-0 1 2 3 4}; do
  run fast94 "$seed" "$@"
done
for recipe in ${OTHERS-fast96 resnet18}; do
  for seed in ${OTHER_SEEDS-0}; do
    run "$recipe" "$seed" "$@"
  done
done

"$python" - "$out" <<'PY'
import re, statistics, sys
from collections import defaultdict
from pathlib import Path

out = Path(sys.argv[1])
pattern = r"final precision @ 1 = ([0-9.]+) \(([0-9]+) examples/sec, ([0-9.]+) s training"
print("\n| recipe | seed | precision@1 | training seconds | examples/sec |")
print("| --- | --- | --- | --- | --- |")
by_recipe = defaultdict(list)
for log in sorted(out.glob("*.log")):
    recipe, seed = log.stem.rsplit("_", 1)
    found = re.findall(pattern, log.read_text())
    if not found:
        print(f"| {recipe} | {seed} | failed: see {log} | | |")
        continue
    precision, rate, seconds = found[-1]
    print(f"| {recipe} | {seed} | {precision} | {seconds} | {rate} |")
    by_recipe[recipe].append(float(precision))
print()
for recipe, precisions in by_recipe.items():
    if len(precisions) > 1:
        print(f"{recipe} over {len(precisions)} seeds: {statistics.mean(precisions):.4f} "
              f"± {statistics.stdev(precisions):.4f} (mean ± std)")
PY
