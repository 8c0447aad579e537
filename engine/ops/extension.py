"""The `cpp` and `cuda` backends: the compiled ops of `engine._C` (csrc/), registered with torch.library.

`engine._C` defines the schemas of the `engine` op library (csrc/ops.cpp) with CPU kernels
(csrc/cpu/) and, when built with CUDA, CUDA kernels (csrc/cuda/). This module loads it on first
use and registers a fake (shape) function for every op; the autograd formulas are in C++ (csrc/glue.cpp,
the Autograd key), where they cost no Python per call. So `torch.compile(fullgraph=True)` traces
through the ops. This module exposes the functions of the engine.ops API on top:

- attention: attention_forward (saves lse) / attention_backward, flash-style, no T x T matrix.
- ffn: ffn_forward / ffn_backward, one node of the graph: pre = x @ w1^T (PyTorch's matmul),
  hidden = bias_gelu(pre, b1), y = hidden @ w2^T, out = bias_residual(y, b2, residual); the backward takes
  the bias gradients in the epilogues' passes. Under autocast the matmuls run in its dtype: the op's Autocast
  kernel (csrc/glue.cpp) casts x, w1 and w2, as autocast does for a matmul.
- layer_norm, cross_entropy: forward and backward kernels; linear_cross_entropy is the PyTorch
  matmul followed by cross_entropy (the logits are materialized).
Dropout is not implemented: dropout_p > 0 raises ValueError (and `auto` picks another backend for
such calls, as the records' empty dropout_ops say). Backends `cpp` (CPU tensors) and
`cuda` (CUDA tensors) share these functions and the C++ glue below them (csrc/glue.cpp: checks, dtype
promotion, layout, allocation); the tensors' device picks the kernel. ENGINE_CUDA_ATTENTION_BLOCKS_PER_SM=2
(read at every call) runs the CUDA attention forward at head dims 40-64 in its two-blocks-per-SM build
(csrc/cuda/launchers.h), for timing against the default.

Building engine._C:
- `pip install --no-build-isolation -e .` (install.sh) builds it with setup.py, with the CUDA
  kernels when torch has CUDA and nvcc is present (see setup.py for the switches).
- For development, `python -m engine.ops.extension --build` compiles the CPU ops just in time
  with torch.utils.cpp_extension.load and ninja into build/jit/ (incremental: only changed
  files recompile) and installs the library as engine/_C*.so, where `import engine._C` finds it
  in new processes. `--vectorize-report` adds GCC's -fopt-info-vec-optimized (which loops
  vectorized, and with what vector width).
- `python -m engine.ops.extension` prints whether the ops load, and if not, why.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import importlib.machinery
import importlib.util
import math
import shutil
import sys
from pathlib import Path
from types import ModuleType

import torch

from engine.ops.backend import TRAINING_DTYPES, Backend

PROJECT_ROOT = Path(__file__).resolve().parents[2]

# Same flags as setup.py's CXX_FLAGS (see the reasons there).
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=fast", "-fno-trapping-math", "-fno-math-errno"]

NOT_BUILT = ("not built: engine._C is missing; run `pip install --no-build-isolation -e .` "
             "(or `python -m engine.ops.extension --build`)")


@functools.cache
def load() -> tuple[ModuleType | None, str]:
    """Import engine._C once and register the Python side of its ops: (module, "") or (None, reason)."""
    if importlib.util.find_spec("engine._C") is None:
        return None, NOT_BUILT
    try:
        module = importlib.import_module("engine._C")
    except (ImportError, OSError) as error:
        return None, (f"engine._C failed to import ({type(error).__name__}: {error}); it was probably built "
                      f"against another torch than {torch.__version__}: rebuild it")
    _register_fakes()
    return module, ""


def has_cuda_kernels() -> bool:
    """Whether engine._C was built with its CUDA kernels (a CUDAExtension build)."""
    return load()[0] is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "engine::attention_forward", "CUDA")


def cpp_availability() -> tuple[bool, str]:
    module, reason = load()
    return (True, "") if module is not None else (False, reason)


def cuda_availability() -> tuple[bool, str]:
    module, reason = load()
    if module is None:
        return False, reason
    if not has_cuda_kernels():
        return False, ("engine._C was built without CUDA kernels (CPU-only torch, nvcc not found, or "
                       "ENGINE_SKIP_CUDA=1 at build time)")
    if not torch.cuda.is_available():
        return False, "no CUDA GPU"
    return True, ""


# ------------------------------------------------------------------ fake (shape) functions
# Every output is contiguous, whatever the inputs' strides (new_empty, not empty_like), with the dtypes
# csrc/glue.cpp gives the real outputs (its header lists them).

def _register_fakes() -> None:
    register = torch.library.register_fake

    @register("engine::attention_forward")
    def _(q, k, v, causal, scale):
        return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)

    @register("engine::attention_backward")
    def _(grad_out, q, k, v, out, lse, causal, scale):
        return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)

    @register("engine::bias_gelu")
    def _(pre, bias, tanh_approx):
        return pre.new_empty(pre.shape)

    @register("engine::bias_gelu_backward")
    def _(grad, pre, bias, tanh_approx):
        return pre.new_empty(pre.shape)

    @register("engine::bias_residual")
    def _(y, bias, residual):
        dtype = torch.promote_types(y.dtype, residual.dtype)
        if bias is not None:
            dtype = torch.promote_types(dtype, bias.dtype)
        return y.new_empty(y.shape, dtype=dtype)

    @register("engine::ffn_forward")
    def _(x, w1, b1, w2, b2, residual, tanh_approx):
        rows, features = math.prod(x.shape[:-1]), w1.shape[0]
        dtype = torch.promote_types(x.dtype, residual.dtype)
        if b2 is not None:
            dtype = torch.promote_types(dtype, b2.dtype)
        return (residual.new_empty(residual.shape, dtype=dtype), x.new_empty((rows, features)),
                x.new_empty((rows, features)))

    @register("engine::ffn_backward")
    def _(grad_out, x, w1, b1, w2, pre, hidden, tanh_approx):
        return (x.new_empty(x.shape), w1.new_empty(w1.shape), x.new_empty((w1.shape[0],), dtype=torch.float32),
                w2.new_empty(w2.shape), x.new_empty((x.shape[-1],), dtype=torch.float32))

    @register("engine::layer_norm_forward")
    def _(x, weight, bias, eps):
        rows = x.shape[0]
        return x.new_empty(x.shape), x.new_empty((rows,), dtype=torch.float32), x.new_empty((rows,), dtype=torch.float32)

    @register("engine::layer_norm_backward")
    def _(grad_y, x, weight, mean, rstd):
        return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape)

    @register("engine::cross_entropy_forward")
    def _(logits, targets, ignore_index):
        return logits.new_empty((), dtype=torch.float32), logits.new_empty((logits.shape[0],), dtype=torch.float32)

    @register("engine::cross_entropy_backward")
    def _(grad_loss, logits, targets, lse, ignore_index):
        return logits.new_empty(logits.shape)


# ----------------------------------------------------------------- the engine.ops functions

_ACTIVATIONS = ("gelu", "gelu_tanh")


def _reject_dropout(op: str, dropout_p: float) -> None:
    if dropout_p > 0.0:
        raise ValueError(f"the cpp and cuda backends do not implement dropout in {op} (dropout_p={dropout_p}); "
                         "train with dropout 0, or use the torch or reference backend")


def attention(q, k, v, *, causal=True, scale=None, dropout_p=0.0):
    _reject_dropout("attention", dropout_p)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out, _ = torch.ops.engine.attention_forward(q, k, v, causal, float(scale))
    return out  # (B, H, T, D)


def ffn(x, w1, b1, w2, b2, residual, *, activation="gelu", dropout_p=0.0):
    if activation not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {_ACTIVATIONS}")
    _reject_dropout("ffn", dropout_p)
    out, _, _ = torch.ops.engine.ffn_forward(x, w1, b1, w2, b2, residual, activation == "gelu_tanh")
    return out  # residual's shape


def layer_norm(x, weight, bias, eps=1e-5):
    y, _, _ = torch.ops.engine.layer_norm_forward(x.reshape(-1, x.shape[-1]), weight, bias, float(eps))
    return y.reshape(x.shape)


def cross_entropy(logits, targets, *, ignore_index=-1):
    loss, _ = torch.ops.engine.cross_entropy_forward(logits, targets, int(ignore_index))
    return loss


def linear_cross_entropy(x, weight, targets, *, ignore_index=-1):
    return cross_entropy(x @ weight.t(), targets, ignore_index=ignore_index)


OPS = {
    "attention": attention,
    "ffn": ffn,
    "layer_norm": layer_norm,
    "cross_entropy": cross_entropy,
    "linear_cross_entropy": linear_cross_entropy,
}

# Capabilities (csrc/): both attentions need k and v of q's shape (no decoding with T_q != T_k);
# the CPU one takes any head dimension, the CUDA one multiples of 8 up to kAttentionMaxHeadDim = 128
# (csrc/cuda/glue.cpp, launchers.h).
CPP_BACKEND = Backend(name="cpp", devices=frozenset({"cpu"}), ops=OPS, availability=cpp_availability,
                      dropout_ops=frozenset(), dtypes=TRAINING_DTYPES, head_dims=None, decode=False)
CUDA_BACKEND = Backend(name="cuda", devices=frozenset({"cuda"}), ops=OPS, availability=cuda_availability,
                       dropout_ops=frozenset(), dtypes=TRAINING_DTYPES, head_dims=frozenset(range(8, 129, 8)),
                       decode=False)


# ------------------------------------------------------------------------- JIT build, CLI

def build_jit(verbose: bool = False, vectorize_report: bool = False) -> Path:
    """Compile the CPU ops with ninja into build/jit/ and install the library as engine/_C<suffix>.

    Loads the freshly built library into this process (torch's loader always does), so call it from
    a process that has not imported engine._C, e.g. `python -m engine.ops.extension --build`.
    """
    from torch.utils.cpp_extension import load as load_extension

    sources = [PROJECT_ROOT / "csrc" / "ops.cpp", PROJECT_ROOT / "csrc" / "glue.cpp",
               *sorted((PROJECT_ROOT / "csrc" / "cpu").glob("*.cpp"))]
    build_directory = PROJECT_ROOT / "build" / "jit"
    build_directory.mkdir(parents=True, exist_ok=True)
    flags = CXX_FLAGS + (["-fopt-info-vec-optimized"] if vectorize_report else [])
    load_extension(name="_C", sources=[str(s) for s in sources], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                   build_directory=str(build_directory), verbose=verbose or vectorize_report)
    target = PROJECT_ROOT / "engine" / f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]}"
    shutil.copy2(build_directory / "_C.so", target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.ops.extension", description=__doc__.split("\n\n")[0])
    parser.add_argument("--build", action="store_true", help="JIT-compile the CPU ops and install engine/_C*.so")
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands")
    parser.add_argument("--vectorize-report", action="store_true",
                        help="with --build: print GCC's report of the vectorized loops (forces a full rebuild)")
    args = parser.parse_args(argv)
    if args.build:
        if args.vectorize_report:
            shutil.rmtree(PROJECT_ROOT / "build" / "jit", ignore_errors=True)
        print(f"built {build_jit(args.verbose, args.vectorize_report)}")
        return 0
    module, reason = load()
    if module is None:
        print(f"engine._C: {reason}")
        return 1
    print(f"engine._C: loaded from {module.__file__}; CPU kernels use {module.cpu_isa()}; "
          f"CUDA kernels: {'yes' if has_cuda_kernels() else 'no'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
