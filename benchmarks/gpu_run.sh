#!/usr/bin/env bash
# Everything GPU-side in one go, for a machine with a CUDA GPU: the GPU tests (tests/test_gpu.py), then the
# quick benchmark set (on a GPU it includes the 20-step 512x512 edit), its JSON and its report.
#   bash benchmarks/gpu_run.sh OUT_DIR [PYTEST ARGS FOR THE BENCHMARKS, e.g. -k "not sd15-512-edit"]
# writes gpu.txt, tests.log, bench.log, results.json, report.md and report.png into OUT_DIR.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_run.sh OUT_DIR}
mkdir -p "$out"
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'torch sees no CUDA GPU')" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)" | tee -a "$out/gpu.txt"
status=0
python3 -m pytest tests/test_gpu.py -p no:cacheprovider -q -rs 2>&1 | tee "$out/tests.log" || status=1
python3 -m pytest benchmarks --benchmark-only -p no:cacheprovider -q -rs \
    --benchmark-json="$out/results.json" "${@:2}" 2>&1 | tee "$out/bench.log" || status=1
python3 -m ip2p bench report "$out/results.json" -o "$out/report.md" && cat "$out/report.md" || status=1
exit $status
