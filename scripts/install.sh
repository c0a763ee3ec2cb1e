#!/usr/bin/env bash
# Set up mambabyte on this machine.
#   bash scripts/install.sh          # the package (keeps an existing torch)
#   bash scripts/install.sh --test   # the package plus what the tests need
# torch: an already-installed torch is kept as it is. With none, torch==$MAMBABYTE_TORCH_VERSION
# (default 2.13.0) is installed from pip's configured sources, or from $MAMBABYTE_TORCH_INDEX_URL when
# set: on a Linux machine without a GPU, MAMBABYTE_TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# avoids PyPI's multi-GB CUDA build. GPU users should install their CUDA build of torch first.
# CUDA kernels are compiled when a CUDA torch and nvcc are present (MAMBABYTE_CUDA_ARCH_LIST picks archs).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=""
if [ "${1:-}" = "--test" ]; then extras="[test]"; fi
if "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "install.sh: keeping torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
  tv="${MAMBABYTE_TORCH_VERSION:-2.13.0}"
  if [ -n "${MAMBABYTE_TORCH_INDEX_URL:-}" ]; then
    echo "install.sh: installing torch==$tv from $MAMBABYTE_TORCH_INDEX_URL"
    "$PY" -m pip install -q "torch==$tv" --index-url "$MAMBABYTE_TORCH_INDEX_URL"
  else
    if [ "$(uname -s)" = "Linux" ] && ! command -v nvidia-smi >/dev/null 2>&1; then
      echo "install.sh: no GPU seen; if pip offers the large CUDA build of torch, stop and rerun with" \
           "MAMBABYTE_TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu"
    fi
    echo "install.sh: installing torch==$tv"
    "$PY" -m pip install -q "torch==$tv"
  fi
fi
"$PY" -m pip install -q "setuptools>=64" wheel
"$PY" -m pip install -q --no-build-isolation -e ".${extras}"
echo "install.sh: done ($("$PY" -c 'import mambabyte; print("mambabyte", mambabyte.__version__)'))"
