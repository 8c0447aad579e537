"""Whether Triton's interpreter is chosen: TRITON_INTERPRET=1 runs the kernels on the CPU (slowly).

The one place that reads the variable. It imports nothing, so code that must decide before triton is
imported asks it too (bench/autotune.py, tests/preflight.py); the kernels read it once, through
_common.INTERPRET, when they are defined, which is when Triton itself reads it.
"""
from __future__ import annotations

import os


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"
