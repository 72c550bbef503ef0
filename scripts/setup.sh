#!/usr/bin/env bash
# Set up discrnn in ./.venv on a fresh machine; safe to re-run.
# The venv sees system site-packages, so a torch that is already installed (e.g. a CUDA build on a GPU
# machine) is used as is. Where none is, torch 2.13.0 is installed first: a plain `pip install torch`
# on a machine without torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv --system-site-packages .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  "${PIP[@]}" torch==2.13.0
fi
"${PIP[@]}" -e ".[test]"
.venv/bin/python -c "import torch, triton, discrnn; print(f'discrnn {discrnn.__version__}: torch {torch.__version__}, triton {triton.__version__}, cuda {torch.cuda.is_available()}')"
