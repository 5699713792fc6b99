#!/usr/bin/env bash
# The checks that need a GPU machine, as one script for a lent machine with no network: the
# CUDA tests, bench/throughput.py on cuda:0 and on its CPUs, and bench/weightsync.py (with
# more cores than the development machine's two). Packages the machine lacks travel as wheels
# in .whl/ (see docs/benchmarks.md); results go to $OUT (or ./gpu-out), one file per step.
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/ringserve
export PYTHONPATH=/tmp/pkg:${PYTHONPATH:-} PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc
  python3 -c "import torch, zmq; print('torch', torch.__version__, 'zmq', zmq.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/machine.txt"
timeout ${RS_GPU_TEST_S:-150} python3 -m pytest -q -p no:cacheprovider ${RS_GPU_TESTS:-tests/test_batching.py tests/test_ragged.py} \
  2>&1 | tee "$OUT/tests.log" | tail -6
SECONDS_EACH=${RS_GPU_SECONDS:-3}
for dev in ${RS_GPU_DEVICES:-cuda:0 cpu}; do
  timeout ${RS_GPU_BENCH_S:-150} python3 bench/throughput.py --device "$dev" --seconds "$SECONDS_EACH" \
    2>"$OUT/throughput_${dev/:/}.err" | tee "$OUT/throughput_${dev/:/}.json"
done
[ -n "${RS_GPU_SKIP_SYNC:-}" ] || timeout ${RS_GPU_SYNC_S:-150} python3 bench/weightsync.py 2>"$OUT/weightsync.err" \
  | tee "$OUT/weightsync.json"
