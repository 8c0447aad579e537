"""Package metadata and build of the `engine` package and its compiled ops `engine._C`.

`pip install --no-build-isolation -e .` (what install.sh runs) builds the extension against the torch
already installed; with build isolation pip would build against another torch (PLATFORM.md).

What gets built:
- always (unless skipped): a CppExtension of csrc/ops.cpp (the op schemas), csrc/glue.cpp (the torch-facing
  glue of both devices) and csrc/cpu/*.cpp (the CPU kernels), giving the `cpp` backend;
- with a CUDA build of torch and nvcc: a CUDAExtension instead, adding the kernels csrc/cuda/*.cu and
  defining ENGINE_WITH_CUDA, which makes csrc/glue.cpp register the same functions for CUDA tensors too,
  giving the `cuda` backend. Without nvcc the build warns and stays CPU-only.

Environment switches:
- ENGINE_SKIP_EXTENSION=1  no C++ at all (pure Python; `cpp` and `cuda` then report "not built").
- ENGINE_SKIP_CUDA=1       CPU ops only, even with a CUDA torch and nvcc.
- TORCH_CUDA_ARCH_LIST     CUDA architectures, e.g. "8.0;9.0" (read by PyTorch's build helpers).
- MAX_JOBS                 parallel compile jobs (read by PyTorch's ninja build).

For development without reinstalling: `python -m engine.ops.extension --build` (a JIT build with ninja).
"""
import glob
import os
import sys
import warnings

from setuptools import find_packages, setup

# The compiler flags of the CPU sources; engine/ops/extension.py (the JIT build) uses the same list.
# No -march: one binary runs on every x86-64 CPU and picks AVX-512/AVX2/SSE2 kernels at run time
# (csrc/cpu/simd.h). -fopenmp enables at::parallel_for's threads and `#pragma omp simd`;
# -ffp-contract=fast lets multiply-adds become FMA instructions (off by default under -std=c++NN);
# -fno-trapping-math lets GCC turn the clamps and selects of the kernels' math into vector selects
# (without it GCC 12 leaves the GELU and cross-entropy loops scalar for SSE2), and -fno-math-errno
# makes sqrt a single instruction. PyTorch builds its own kernels with the last two as well.
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=fast", "-fno-trapping-math", "-fno-math-errno"]
NVCC_FLAGS = ["-O3", "-lineinfo"]


def _enabled(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def extension_build() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for setup(); empty when the extension is skipped or cannot be built."""
    if _enabled("ENGINE_SKIP_EXTENSION"):
        print("ENGINE_SKIP_EXTENSION is set: building without the C++ extension engine._C")
        return [], {}
    if sys.platform == "win32":
        warnings.warn("the C++ extension needs GCC or Clang; building without it (the cpp backend is unavailable)")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as error:
        warnings.warn(f"torch is not importable ({error}); building without the C++ extension. "
                      "Install torch first, then `pip install --no-build-isolation -e .`")
        return [], {}

    sources = ["csrc/ops.cpp", "csrc/glue.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    use_cuda = False
    if torch.version.cuda is None:
        print("torch is a CPU build: building the CPU ops of engine._C only")
    elif _enabled("ENGINE_SKIP_CUDA"):
        print("ENGINE_SKIP_CUDA is set: building the CPU ops of engine._C only")
    elif nvcc is None or not os.path.exists(nvcc):
        warnings.warn("torch has CUDA but nvcc was not found (set CUDA_HOME): building the CPU ops only; "
                      "the cuda backend will be unavailable")
    else:
        use_cuda = True

    link_args = ["-fopenmp"]
    if use_cuda:
        extension = CUDAExtension(
            "engine._C", sources + cuda_sources, define_macros=[("ENGINE_WITH_CUDA", None)],
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS}, extra_link_args=link_args,
        )
    else:
        extension = CppExtension("engine._C", sources, extra_compile_args={"cxx": CXX_FLAGS}, extra_link_args=link_args)
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = extension_build()

setup(
    name="gpt-engine",
    version="0.1.0",
    description="A GPT training engine whose hot path runs on hand-written kernels",
    python_requires=">=3.10",
    # One top-level import name, `engine`. engine/kernels is a link to the Triton kernels in kernels/
    # (a folder without __init__.py, so nothing run from the checkout shadows PyPI's unrelated
    # `kernels`); the wheel holds them at engine/kernels/. bench/ runs from the checkout only.
    packages=[*find_packages(include=["engine", "engine.*"]), "engine.kernels"],
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    extras_require={"test": ["pytest>=8"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
