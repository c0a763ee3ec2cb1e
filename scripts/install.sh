#!/usr/bin/env bash
# Set up mambabyte on this machine.
#   bash scripts/install.sh          # the package (keeps an existing torch)
#   bash scripts/install.sh --test   # the package plus what the tests need
# torch: an already-installed torch is kept as it is. With none, torch==$MAMBABYTE_TORCH_VERSION
# (default 2.13.0) is installed; GPU users should install their CUDA build of torch first.
# CUDA kernels are compiled when a CUDA torch and nvcc are present (MAMBABYTE_CUDA_ARCH_LIST picks archs).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=""
if [ "${1:-}" = "--test" ]; then extras="[test]"; fi
if "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "install.sh: keeping torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
  echo "install.sh: installing torch==${MAMBABYTE_TORCH_VERSION:-2.13.0}"
  "$PY" -m pip install -q "torch==${MAMBABYTE_TORCH_VERSION:-2.13.0}"
fi
"$PY" -m pip install -q "setuptools>=61" wheel
"$PY" -m pip install -q --no-build-isolation -e ".${extras}"
echo "install.sh: done ($("$PY" -c 'import mambabyte; print("mambabyte", mambabyte.__version__)'))"
