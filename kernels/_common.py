"""What every kernel file shares: the interpreter flag, the dtypes, tl.dot's precision, size and
device checks, and the autotuner set-up (candidates per kind of input, power-of-two keys, results
kept on disk).
"""
from __future__ import annotations

from typing import Callable

import torch
import triton

from engine.kernels._interpreter import interpreting

# Triton's interpreter (TRITON_INTERPRET=1, read when triton is imported) runs kernels on the CPU.
# It cannot autotune, and its cost grows with programs x loop steps: one configuration, big blocks.
INTERPRET = interpreting()

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT32_LIMIT = 2**31


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: exact fp32 products ("ieee") for fp32 operands unless PyTorch's own
    fp32 matmul setting allows TF32; "tf32", the default, leaves 16-bit operands on tensor cores."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def check_size(*tensors: torch.Tensor) -> None:
    """Kernels that index with 32-bit offsets take tensors of fewer than 2^31 elements."""
    for t in tensors:
        if t.numel() >= INT32_LIMIT:
            raise ValueError(f"tensor of shape {tuple(t.shape)} has 2^31 or more elements; "
                             "the kernels use 32-bit offsets")


def launchable(device: torch.device) -> bool:
    """Whether Triton can launch on tensors of this device: CUDA, the interpreter on the CPU, or a
    stand-in driver that takes CPU tensors (the compile-only one of tests/preflight.py)."""
    if device.type == "cuda" or INTERPRET:
        return True
    try:
        return triton.runtime.driver.active.get_active_torch_device().type == device.type
    except RuntimeError:  # no GPU driver at all
        return False


def bucket(n: int) -> int:
    """The autotuning key for a length that varies from call to call (tokens, sequence length): its
    next power of two, so a new batch shape or generation's growing length does not re-tune."""
    return triton.next_power_of_2(max(n, 1))


def autotune(configs_by_kind: dict[str, list[triton.Config]], kind: Callable[[dict, dict], str], key: list[str],
             **kwargs):
    """@triton.autotune over every listed configuration, pruned at launch to those of the input's kind
    (kind(named_args, constexpr_kwargs) -> a key of configs_by_kind), e.g. 16-bit or fp32 operands,
    whose register and shared-memory needs differ.

    Results persist on disk (cache_results=True, in Triton's cache next to the compiled kernels):
    a resumed run, or every rank of a multi-GPU run started after the first, reads the choice the
    first one timed instead of timing again and perhaps choosing differently, which would change the
    last bits of the results.
    """
    configs = list(dict.fromkeys(config for configs in configs_by_kind.values() for config in configs))

    def keep_inputs_kind(candidates, named_args, **constexprs):
        wanted = configs_by_kind[kind(named_args, constexprs)]
        return [config for config in candidates if config in wanted]

    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": keep_inputs_kind},
                           cache_results=True, **kwargs)
