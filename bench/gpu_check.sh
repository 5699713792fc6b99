#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one script for a lent GPU machine with no network:
# the CUDA tests, then bench/throughput.py on cuda:0. Packages the machine lacks travel as
# wheels in .whl/ (see docs/benchmarks.md); results go to $OUT (or ./gpu-out).
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/ringserve
export PYTHONPATH=/tmp/pkg:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, zmq; print('torch', torch.__version__, 'zmq', zmq.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider -x ${RS_GPU_TESTS:-tests/test_batching.py} 2>&1 | tee "$OUT/tests.log" | tail -25
timeout ${RS_GPU_BENCH_S:-200} python3 bench/throughput.py --device cuda:0 --seconds ${RS_GPU_SECONDS:-3} \
  2>"$OUT/bench.err" | tee "$OUT/throughput_gpu.json"
tail -5 "$OUT/bench.err"
