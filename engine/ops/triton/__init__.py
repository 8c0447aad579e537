"""The `triton` backend: the Triton kernels of engine.kernels (kernels/), registered with torch.library.

Each op lives in its own module here (attention.py, ffn.py, layer_norm.py, cross_entropy.py):
a `torch.library.custom_op` around the kernel launch, with `register_fake` (shapes for
torch.compile) and `register_autograd` (the backward kernels), plus the plain function the
registry calls.

Availability: Triton must import, and kernels need a CUDA GPU, or TRITON_INTERPRET=1 to run on
the CPU through Triton's interpreter (slow; that is how the tests run without a GPU).
"""
from __future__ import annotations

import torch

from engine.kernels._common import INTERPRET
from engine.kernels.attention import SUPPORTED_HEAD_DIMS
from engine.ops.backend import TRAINING_DTYPES, Backend
from engine.ops.triton.attention import attention
from engine.ops.triton.cross_entropy import cross_entropy, linear_cross_entropy
from engine.ops.triton.ffn import ffn
from engine.ops.triton.layer_norm import layer_norm


def availability() -> tuple[bool, str]:
    if not (torch.cuda.is_available() or INTERPRET):
        return False, "no CUDA GPU (set TRITON_INTERPRET=1 to run the kernels, slowly, on the CPU)"
    return True, ""


BACKEND = Backend(
    name="triton",
    devices=frozenset({"cuda", "cpu"} if INTERPRET else {"cuda"}),
    ops={
        "attention": attention,
        "ffn": ffn,
        "layer_norm": layer_norm,
        "cross_entropy": cross_entropy,
        "linear_cross_entropy": linear_cross_entropy,
    },
    availability=availability,
    dropout_ops=frozenset({"ffn"}),  # attention dropout is not implemented in the Triton kernel
    dtypes=TRAINING_DTYPES,
    head_dims=frozenset(SUPPORTED_HEAD_DIMS),
    decode=True,  # kernels/attention.py takes T_q != T_k without the causal mask
)
