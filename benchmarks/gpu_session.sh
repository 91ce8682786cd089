#!/usr/bin/env bash
# The GPU half of issue 6, scripted for a session that is lent a CUDA machine
# (docs/performance.md, "On a GPU: the runbook"). Run from the repository root.
#
#   bash benchmarks/gpu_session.sh collect      # after each call that carried one .devwhl/pN: copy it to /tmp/w
#   bash benchmarks/gpu_session.sh install      # join the split wheels in /tmp/w, install into /tmp/site
#   bash benchmarks/gpu_session.sh tests OUT    # the CUDA twins of the CPU tests (+ the DALI ones)
#   bash benchmarks/gpu_session.sh quick OUT    # every GPU benchmark once, small (catches errors cheaply)
#   bash benchmarks/gpu_session.sh stage2 OUT   # the full benchmarks, one per call (each < 10 min)
#   bash benchmarks/gpu_session.sh stage1 OUT
#   bash benchmarks/gpu_session.sh memory OUT
#
# The device image has torch, timm, pyarrow, click and pytest but not DALI or
# zarr: `bash ../shared/tools/device-wheels.sh` here splits those wheels into
# .devwhl/p1..pN, one carried per call. Every stage after `install` puts
# /tmp/site on PYTHONPATH itself. Outputs (logs, JSON) go to OUT, e.g. $OUT.
set -uo pipefail
stage=${1:?stage: collect | install | tests | quick | stage2 | stage1 | memory}
out=${2:-/tmp/gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"

bench() {  # name, then its arguments; the JSON and the log land in OUT
  local name=$1; shift
  python3 -m "benchmarks.$name" --out "$out/$name.json" "$@" 2>&1 | tee "$out/$name.log"
}

case $stage in
  collect)
    mkdir -p /tmp/w && cp .devwhl/p*/* /tmp/w/ && ls /tmp/w ;;
  install)
    cd /tmp/w || exit 1
    for first in *.whl.part-aa; do
      [ -e "$first" ] || continue
      whl=${first%.part-aa}; cat "$whl".part-* > "$whl" && rm "$whl".part-*
    done
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ./*.whl
    python3 -c "import nvidia.dali, zarr, numcodecs; print('dali', nvidia.dali.__version__, 'zarr', zarr.__version__)" ;;
  tests)
    nvidia-smi | tee "$out/nvidia-smi.txt"
    python3 -m pytest -q -rs -p no:cacheprovider tests/test_loaders.py tests/test_teacher_cache.py \
      tests/test_distill.py -k "cuda or dali" 2>&1 | tee "$out/pytest-cuda.log" ;;
  quick)
    bench bench_stage2 --quick
    bench bench_stage1 --quick
    bench bench_memory --quick ;;
  stage2) bench bench_stage2 ;;
  stage1) bench bench_stage1 ;;
  memory) bench bench_memory ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
