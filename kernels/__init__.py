"""Triton kernels, one file per op (attention.py, ffn.py, layernorm.py, cross_entropy.py).

Each file follows one order: private @triton.jit kernels, then plain launchers (reshape, allocate,
choose block sizes, reject unsupported input), then the autograd.Function, then a functional
wrapper. engine/ops/triton/ registers them with torch.library; the model never calls them directly.
"""
