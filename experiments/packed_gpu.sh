#!/usr/bin/env bash
# One call on a GPU host (sized for one H100/H200, under 10 minutes), nothing from the
# network: a sweep of JOBS seeds timed one after another and packed onto the GPU
# (hydra/launcher=packed, stacked and processes; Ray where installed; processes again
# under CUDA MPS where its daemon exists, as <name>_mps.md), as jobs per hour with each
# way's precision mean ± std:
#   1. the 3,000-step Adam baseline (the default run);
#   2. experiment=fast94.
#
#   CIFAR_EXP_DATA=/path/to/data bash experiments/packed_gpu.sh [extra overrides]
#
# Environment: OUT (results folder, default ./packed_gpu_results), JOBS (default 8),
# BASELINE_ARGS (overrides of the baseline's sweep, default "log_every=100"), FAST_ARGS
# (of fast94's, default empty), SWEEPS (which to run, default "baseline fast94"; gpu_check.sh
# runs fast94 alone), MPS (false: no MPS run), PYTHON (default python3). Extra arguments are
# overrides for both sweeps. The Python packages must already be importable.
set -euo pipefail
out=${OUT:-packed_gpu_results}
jobs=${JOBS:-8}
python=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
"$python" -c 'import torch; print("torch", torch.__version__, "device",
  torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")'

# Ray where its launcher is installed (the `ray` extra); CUDA MPS where its daemon exists.
modes=sequential,stacked,processes
if "$python" -c 'import hydra_plugins.hydra_ray_launcher' 2>/dev/null; then modes+=,ray; fi
mps=false
if [ "${MPS:-auto}" != false ] && command -v nvidia-cuda-mps-control >/dev/null; then mps=true; fi

sweep() {  # sweep <name> <overrides...>: the table of the sweep timed each way
  local name=$1; shift
  "$python" -m cifar_exp.bench --sweep "$jobs" --modes "$modes" tracking.log_model=false "$@" \
    | tee "$out/$name.md"
  if $mps; then  # processes again, their kernels sharing the GPU through MPS
    nvidia-cuda-mps-control -d
    "$python" -m cifar_exp.bench --sweep "$jobs" --modes sequential,processes \
      tracking.log_model=false "$@" | tee "$out/${name}_mps.md" || true
    echo quit | nvidia-cuda-mps-control
  fi
}

sweeps=" ${SWEEPS-baseline fast94} "
if [[ $sweeps == *" baseline "* ]]; then
  # shellcheck disable=SC2086
  sweep baseline ${BASELINE_ARGS-log_every=100} "$@"
fi
if [[ $sweeps == *" fast94 "* ]]; then
  # shellcheck disable=SC2086
  sweep fast94 experiment=fast94 ${FAST_ARGS-} "$@"
fi
