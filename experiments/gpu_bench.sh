#!/usr/bin/env bash
# One call on a GPU host (sized for one H100, under 10 minutes), nothing from the network:
#   1. python -m cifar_exp.bench for tf_cnn at batch 128 and at batch 1024;
#   2. the tutorial's full recipe: optimizer=sgd_decay steps=100000, end to end, and where
#      its time went (start-up, data, tracking, steps, evaluations, checkpoints, model);
#   3. a table of the figures;
#   4. a profile of the bare and the framework step at the first batch size, for each
#      setting in PROFILES: where the time goes, operators and kernel launches per step.
#
#   CIFAR_EXP_DATA=/path/to/data bash experiments/gpu_bench.sh [extra overrides]
#
# Environment: OUT (results folder, default ./gpu_bench_results), STEPS (default 100000),
# BATCHES (default "128 1024"), BENCH_ARGS (bench flags, default "--window-steps 100
# --workers 4,8,16": GPU steps take milliseconds), SGD_ARGS (overrides for the long run,
# default "log_every=100"; cuda_graph=auto replays the whole step as a CUDA graph),
# PROFILES (default "cuda_graph=false cuda_graph=true"; empty: none), PROFILE_STEPS
# (default 50), PYTHON (default python3). The Python
# packages must already be importable (pip install -e ., or wheels unpacked onto PYTHONPATH).
set -euo pipefail
out=${OUT:-gpu_bench_results}
steps=${STEPS:-100000}
python=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
"$python" -c 'import torch; print("torch", torch.__version__, "device",
  torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")'

for batch in ${BATCHES:-128 1024}; do
  # shellcheck disable=SC2086
  "$python" -m cifar_exp.bench model=tf_cnn batch_size=$batch "$@" ${BENCH_ARGS---window-steps 100 --workers 4,8,16} \
    --json "$out/bench_$batch.json" | tee "$out/bench_$batch.txt"
done

start=$(date +%s.%N)
# shellcheck disable=SC2086
"$python" -m cifar_exp.run optimizer=sgd_decay steps="$steps" eval_every=10000 \
  tracking.uri="sqlite:///$out/mlflow.db" tracking.experiment=gpu_bench \
  hydra.run.dir="$out/hydra" ${SGD_ARGS-log_every=100} "$@" \
  2>&1 | tee "$out/sgd_decay.log"
end=$(date +%s.%N)

"$python" - "$out" "$start" "$end" "$steps" <<'PY'
import json, re, sys
from pathlib import Path

out, start, end, steps = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
from cifar_exp.tools.bench import MARKDOWN_HEADER, markdown_row

print("\n" + MARKDOWN_HEADER)
for path in sorted(out.glob("bench_*.json"), key=lambda p: int(p.stem.split("_")[1])):
    print(markdown_row(json.loads(path.read_text())))
log = (out / "sgd_decay.log").read_text()
final = re.findall(r"final precision @ 1 = ([0-9.]+) \(([0-9]+) examples/sec", log)
precision, rate = final[-1] if final else ("?", "?")
print(f"\noptimizer=sgd_decay steps={steps}: precision {precision}, "
      f"{end - start:.0f} s end to end, {rate} examples/sec")
timeline = re.findall(r"\] time: (.*)", log)  # where the run's seconds went
print(f"its time, phase by phase: {timeline[-1] if timeline else '?'}")
PY

read -r first_batch _ <<< "${BATCHES:-128 1024}"
for setting in ${PROFILES-cuda_graph=false cuda_graph=true}; do
  name=profile_${setting//[^a-z0-9-]/_}
  "$python" -m cifar_exp.bench model=tf_cnn batch_size="$first_batch" "$setting" "$@" \
    --window-steps "${PROFILE_STEPS:-50}" --profile "$out/$name" --json "$out/$name.json" \
    | tee "$out/$name.txt"
done
