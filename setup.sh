#!/usr/bin/env bash
# Creates ./.venv with finers-rt (editable), the torch reference backend and the test tools.
# torch/torchvision are installed first: the sam2 sdist imports torch while it builds, so it is
# built without isolation (an isolated build would pull a second, CUDA torch) and with
# SAM2_BUILD_CUDA=0 (no CUDA extension on CPU machines).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip 'setuptools>=68' wheel
python -m pip install -q torch==2.14.1 torchvision==0.29.1
SAM2_BUILD_CUDA=0 python -m pip install -q --no-build-isolation -e '.[export,eval,serve,ray,dev]'
python -c "import finers_rt, torch, transformers, sam2, onnxruntime; print('finers-rt env ready:', 'torch', torch.__version__, 'transformers', transformers.__version__)"
