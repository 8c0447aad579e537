"""The `triton` backend: the Triton kernels in kernels/, registered with torch.library.

Each op lives in its own module here (attention.py, ffn.py, layer_norm.py, cross_entropy.py):
a `torch.library.custom_op` around the kernel launch, with `register_fake` (shapes for
torch.compile) and `register_autograd` (the backward kernels), plus the plain function the
registry calls.

Availability: Triton must import, the top-level `kernels` package must be this project's (PyPI
has an unrelated package of that name), and kernels need a CUDA GPU, or TRITON_INTERPRET=1 to
run on the CPU through Triton's interpreter (slow; that is how the tests run without a GPU).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from engine.ops.backend import Backend

PROJECT_ROOT = Path(__file__).resolve().parents[3]


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_kernels_package() -> None:
    """Raise ImportError unless `import kernels` finds this project's kernels/ folder."""
    import kernels

    file = getattr(kernels, "__file__", None)
    location = Path(file).resolve().parent if file else Path(next(iter(kernels.__path__), "?"))
    if location != PROJECT_ROOT / "kernels":
        raise ImportError(
            f"`import kernels` found {location}, not this project's {PROJECT_ROOT / 'kernels'} "
            "(an unrelated PyPI package named 'kernels' is installed?); uninstall it or install the engine with "
            "`pip install -e .`"
        )


def availability() -> tuple[bool, str]:
    if not (torch.cuda.is_available() or interpreting()):
        return False, "no CUDA GPU (set TRITON_INTERPRET=1 to run the kernels, slowly, on the CPU)"
    return True, ""


check_kernels_package()

# Imported after the check: they import `kernels`.
from engine.ops.triton.attention import attention  # noqa: E402
from engine.ops.triton.cross_entropy import cross_entropy, linear_cross_entropy  # noqa: E402
from engine.ops.triton.ffn import ffn  # noqa: E402
from engine.ops.triton.layer_norm import layer_norm  # noqa: E402

BACKEND = Backend(
    name="triton",
    devices=frozenset({"cuda", "cpu"} if interpreting() else {"cuda"}),
    ops={
        "attention": attention,
        "ffn": ffn,
        "layer_norm": layer_norm,
        "cross_entropy": cross_entropy,
        "linear_cross_entropy": linear_cross_entropy,
    },
    availability=availability,
    dropout_ops=frozenset({"ffn"}),  # attention dropout is not implemented in the Triton kernel
)
