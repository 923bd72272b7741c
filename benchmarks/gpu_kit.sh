#!/usr/bin/env bash
# The carry kit for a GPU machine with no network (Python 3.12, torch and torchvision preinstalled):
#
#   bash benchmarks/gpu_kit.sh download        # here, once: the wheels the image lacks, into .whl/ (git-ignored)
#   bash benchmarks/gpu_kit.sh device [ARGS]   # there: install .whl/ with --target .site, run gpu_check.py ARGS
#
# The device command (the machine copies the working tree; carry .whl, never .venv, never run make there, since
# make would install the torch of this machine):
#   MAE_LITE_COMMIT=<sha> bash benchmarks/gpu_kit.sh device --out "$OUT" --limit 480
# It writes <out>/gpu_check.json, <out>/gpu_check_logs.tgz and <out>/gpu_check.out (the console).
set -u
cd "$(dirname "$0")/.." || exit 1
# What the image lacks (pins = what the CPU suite runs with); Pillow only installed if the image has Pillow >= 13
WHEELS=(pycocotools==2.0.11 webdataset==1.0.2 braceexpand==0.1.7 timm==1.0.31)
OPTIONAL=(pillow==12.3.0)
PLATFORM=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

case "${1:-}" in
  download)
    PY=${PYTHON:-python3}
    mkdir -p .whl/opt
    "$PY" -m pip download -q --no-deps --only-binary=:all: "${PLATFORM[@]}" -d .whl "${WHEELS[@]}" || exit 1
    "$PY" -m pip download -q --no-deps --only-binary=:all: "${PLATFORM[@]}" -d .whl/opt "${OPTIONAL[@]}" || exit 1
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || grep -qx '/.whl/' .gitignore || echo '/.whl/' >> .git/info/exclude
    ls -l .whl .whl/opt
    du -sh .whl
    ;;
  device)
    shift
    OUT=${OUT:-benchmarks/results/gpu_check_out}
    mkdir -p "$OUT"
    export PYTHONUNBUFFERED=1 PYTHON=python3
    ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null
    ls .whl/*.whl >/dev/null 2>&1 || { echo "no wheels in .whl/: run 'bash benchmarks/gpu_kit.sh download' here and carry .whl"; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl \
      || { echo "pip install --target .site failed"; exit 1; }
    export PYTHONPATH="$PWD/.site${PYTHONPATH:+:$PYTHONPATH}"
    # the carried timm needs the image's torch/torchvision; fall back to the image's timm if it cannot import
    python3 -c 'import timm; timm.create_model("vit_tiny_patch16_224")' 2>/dev/null \
      || { echo "the carried timm does not import here: using the image's"; rm -rf .site/timm .site/timm-*; }
    python3 -c 'import PIL, sys; sys.exit(int(PIL.__version__.split(".")[0]) >= 13)' \
      || python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target .site .whl/opt/*.whl
    python3 benchmarks/gpu_check.py "$@" 2>&1 | tee "$OUT/gpu_check.out"
    exit "${PIPESTATUS[0]}"
    ;;
  *)
    echo "usage: bash benchmarks/gpu_kit.sh download | device [gpu_check.py options]" >&2
    exit 2
    ;;
esac
