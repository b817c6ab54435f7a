#!/usr/bin/env bash
# The GPU checks, in one go, on a machine with cupy and a CUDA GPU (run from the repository root):
#
#   OUT=/tmp/gpu-check scripts/gpu_check.sh
#
# 1. the engine's op-gradient suite and GPU training tests (pytest -m gpu),
# 2. the engine step on cupy against numpy (scripts/bench_gpu.py),
# 3. distributed training runs with GPU workers, the MLP and the paper's CNN (needs Ray;
#    mnist1d from .whl/ if carried).
# On a machine without Ray, carry one packed by shared/device/pack-ray.sh in .device/.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-8}
if [[ -f .device/ray-core.tar.xz ]] && ! python3 -c "import ray" 2>/dev/null; then
  mkdir -p /tmp/site && tar -xJf .device/ray-core.tar.xz -C /tmp/site &&
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/wheels/*.whl
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
if compgen -G ".whl/*.whl" >/dev/null && ! python3 -c "import mnist1d" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import cupy, numpy, ray; print('cupy', cupy.__version__, 'numpy', numpy.__version__, 'ray', ray.__version__)"
status=0
echo "== pytest -m gpu"
python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/pytest-gpu.log" | tail -n 15
[[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
echo "== bench_gpu"
python3 scripts/bench_gpu.py --out "$OUT/gpu.json" || status=1
echo "== distributed training on GPU workers"
python3 scripts/train.py --dataset mnist1d --workers 2 --gpus-per-worker 0.5 --epochs 30 --cpus 4 \
  --out "$OUT/gpu-run" --no-progress --log-every 1000 2>&1 | tail -n 6
[[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
python3 scripts/train.py --dataset mnist1d --model cnn1d --workers 2 --gpus-per-worker 0.5 --optimizer adam \
  --lr 0.01 --batch-size 100 --steps 2000 --cpus 4 --out "$OUT/gpu-cnn-run" --no-progress --log-every 1000 2>&1 \
  | tail -n 4
[[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
exit $status
