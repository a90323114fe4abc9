#!/usr/bin/env bash
# Every GPU check in one run (a GPU machine, repository root, under 8 minutes): the GPU tests (tiny
# checkpoint on CUDA, decode graphs, the Triton kernel on the device, the real server streaming
# through them), then `python -m bench.gpu`: decode per backend (flash where flash-attn is
# installed, triton, sdpa) at batch 1/8/32/64 x context 512/2,048/8,192 with each result's achieved
# bandwidth, and vision batching.
#   bash bench/gpu_checks.sh [OUT_DIR]        (default: $OUT, else artifacts/gpu)
# Where the server's packages are missing (an offline GPU box), wheels in .whl/ are installed
# into /tmp/site first.
set -u
out=${1:-${OUT:-artifacts/gpu}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
export TRITON_INTERPRET=0  # real kernels on the device
if [ -d .whl ] && ! python3 -c "import fastapi, pydantic_settings, uvicorn, openai" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/device.txt"
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -p no:logging tests/model/test_gpu.py tests/server/test_gpu.py 2>&1 \
  | tee "$out/tests.log"
tests=${PIPESTATUS[0]}
backends=triton,sdpa
python3 -c "import flash_attn" 2>/dev/null && backends=flash,$backends
timeout 270 python3 -m bench.gpu --profile --modes compiled --backends $backends --contexts 512,2048,8192 \
  --steps 32 --vision --json "$out/gpu.json" 2>&1 | tee "$out/bench.log"
bench=${PIPESTATUS[0]}
echo "gpu checks: tests rc=$tests, bench rc=$bench"
[ "$tests" = 0 ] && [ "$bench" = 0 ]
