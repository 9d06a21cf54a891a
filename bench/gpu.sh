#!/usr/bin/env bash
# The GPU path in one command (about 8 minutes on one H100 or H200): build the fused rank-1
# kernels, run the GPU tests, compute-sanitizer (memcheck and racecheck) on tiny cases, then the
# table of bench/gpu.py (the op at the 32B shapes, a training step, decode, fused vs reference).
#
#   bash bench/gpu.sh          # on a CUDA machine
#   bash bench/gpu.sh --cpu    # the same script end to end on tiny CPU shapes (CI runs this)
#   bash bench/gpu.sh --help   # this text
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  --cpu) exec python -m bench.gpu --cpu --repeats 2 ;;
  -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
  "") ;;
  *) echo "bench/gpu.sh: unknown argument $1 (expected --cpu or --help)" >&2; exit 2 ;;
esac
python -c "import lora_cuda" && echo "build: the fused rank-1 extension loads"
status=0  # a failed step is reported and the table still runs; the exit status says it failed
python -m pytest -q tests/test_cuda_kernel.py || status=1
if command -v compute-sanitizer > /dev/null; then
  for tool in memcheck racecheck; do
    # only our kernels (rank1_*). On an H200 (driver 580, CUDA 13) racecheck crashed inside the
    # tool ("failed to handle a hardware exception") at the first kernel it instrumented
    compute-sanitizer --tool "$tool" --error-exitcode 1 --kernel-name kns=rank1_ \
      python -m bench.gpu --sanitize || { echo "compute-sanitizer $tool: FAILED"; status=1; }
  done
else
  echo "compute-sanitizer: not installed; skipped"
fi
python -m bench.gpu --out runs/gpu-bench || status=1  # each table's JSON as it ends
exit $status
