"""Autocast for the triton backend's custom ops, which autocast does not see (it casts only the
built-in ops on its lists): the public functions cast their matmul inputs themselves, as F.linear
or F.scaled_dot_product_attention would be cast."""
from __future__ import annotations

import torch


def cast_for_autocast(device_type: str, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The tensors in the autocast dtype when autocast is on for device_type, else unchanged; None stays None."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(None if t is None else t.to(dtype) for t in tensors)
