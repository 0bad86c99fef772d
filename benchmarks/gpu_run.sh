#!/usr/bin/env bash
# Everything GPU-side in one go, for a machine with one CUDA GPU, PyTorch and no internet: the GPU tests
# (tests/test_gpu.py), then the side by side on the random-weight sd15 at 512x512 (benchmarks/gpu_compare.py:
# diffusers float16 eager and compiled with channels-last, the engine eager and compiled with CUDA graphs), its
# JSON and its report. Planned to take at most 8 minutes on an H100, model creation and compilation included.
#   bash benchmarks/gpu_run.sh OUT_DIR [--quick-set]
# Packages the machine lacks (diffusers, on the lent H100) travel as wheels in .whl/, fetched beforehand on a
# machine with pip by `bash benchmarks/gpu_run.sh --wheels`; --quick-set also runs the pytest-benchmark set.
# Writes gpu.txt, tests.log, compare.log, compare.json, compare.md (and bench.log, results.json, report.md).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--wheels" ]; then  # here, with pip and the project installed: the wheels the GPU machine lacks
    for name in diffusers importlib_metadata; do
        version=$(python3 -c "import importlib.metadata as m; print(m.version('$name'))") || exit 1
        python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux2014_x86_64 -d .whl "$name==$version" || exit 1
    done
    exit 0
fi
out=${1:?usage: bash benchmarks/gpu_run.sh OUT_DIR [--quick-set] | --wheels}
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ip2p-site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/ip2p-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'torch sees no CUDA GPU')" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)" | tee -a "$out/gpu.txt"
status=0
python3 -m pytest tests/test_gpu.py -p no:cacheprovider -q -rs 2>&1 | tee "$out/tests.log" || status=1
python3 -m benchmarks.gpu_compare --model sd15 --json "$out/compare.json" --report "$out/compare.md" 2>&1 \
    | tee "$out/compare.log" || status=1
if [ "${2:-}" = "--quick-set" ]; then
    python3 -m pytest benchmarks --benchmark-only -p no:cacheprovider -q -rs \
        --benchmark-json="$out/results.json" 2>&1 | tee "$out/bench.log" || status=1
    python3 -m ip2p bench report "$out/results.json" -o "$out/report.md" || status=1
fi
exit $status
