#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py: the steps, their timeouts, what they write):
#   bash benchmarks/gpu_check.sh --out DIR     # on a GPU machine (GPU 0)
#   bash benchmarks/gpu_check.sh --cpu         # the same steps at toy sizes on the CPU (checks the script itself)
#   bash benchmarks/gpu_check.sh --dry-run     # print the steps' commands, run nothing
# PYTHON picks the interpreter: default .venv/bin/python if present, else python3 (on the GPU machine, where the
# project is not installed, python3 with the carried wheels: benchmarks/gpu_kit.sh).
cd "$(dirname "$0")/.." || exit 1
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" benchmarks/gpu_check.py "$@"
