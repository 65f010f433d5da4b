#!/usr/bin/env bash
# The first thing to run whenever a GPU is at hand: one call, under 8 minutes on one
# H100/H200, nothing from the network (experiments/gpu_check.py says what it runs).
#
#   bash experiments/gpu_check.sh [OUT]        # results into $OUT (or the folder given)
#   bash experiments/gpu_check.sh --dry-run    # on the CPU: compose, resolve, check; run nothing
#
# Prepared as experiments/README.md describes, at the repository root: wheels of the
# packages the GPU image lacks in .whl/ (installed into /tmp/site here), the data packed by
# experiments/carry_data.py in .carry/data/ (unpacked into /tmp/cifar_data here unless
# CIFAR_EXP_DATA is set), and the peers' files in peers/ (race.py --export-from).
# Environment: PYTHON (default python3), WHEELS (.whl), PACKED (.carry/data).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
wheels=${WHEELS:-.whl}
packed=${PACKED:-.carry/data}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

dry=false
for arg in "$@"; do [ "$arg" = --dry-run ] && dry=true; done

if ! $dry; then
  if compgen -G "$wheels/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "$wheels"/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
  fi
  if [ -z "${CIFAR_EXP_DATA:-}" ] && [ -d "$packed" ]; then
    "$python" experiments/carry_data.py unpack "$packed" /tmp/cifar_data/cifar-10-batches-bin
    export CIFAR_EXP_DATA=/tmp/cifar_data
  fi
  "$python" -c 'import torch; print("torch", torch.__version__, "device",
    torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")'
fi
exec "$python" experiments/gpu_check.py --python "$python" --wheels "$wheels" \
  --packed "$packed" "$@"
