"""python -m bench.attention: attention forward, backward and both, per backend, against T.

FLOP count (the convention of the FlashAttention papers; softmax and masking not counted):
    forward  = 4 * B * H * T * T * D   two matmuls per head, Q K^T and P V, 2 * T * T * D each;
                                       halved when causal (only the lower triangle is needed)
    backward = 2.5 * forward           five such matmuls instead of two: S = Q K^T recomputed,
                                       dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q

Default sweep: on a GPU bf16, causal, D in {64, 128}, T = 256 ... 8192 with B * T = 16384 tokens
and H = 2048 / D (a 2048-wide model), so every point does the same token work. On a CPU fp32,
causal, D = 64, T in {128, 256, 512}, B = 1, H = 4.

Besides the engine's backends (`torch` is SDPA with PyTorch's own choice of kernel) and `compile`,
`--backends` takes sdpa-flash, sdpa-cudnn, sdpa-efficient and sdpa-math: SDPA pinned to one of its
backends, so that "SDPA's best backend on this card" is measured rather than assumed.
"""
from __future__ import annotations

import argparse
import functools
import sys
from typing import Callable

import torch
import torch.nn.functional as F

from bench import harness

GPU_T = (256, 512, 1024, 2048, 4096, 8192)
GPU_D = (64, 128)
GPU_TOKENS = 16384
GPU_MODEL_WIDTH = 2048
CPU_T = (128, 256, 512)
CPU_D = (64,)
CPU_BATCH, CPU_HEADS = 1, 4
# Competitors beyond the engine's backends, timed when named in --backends: PyTorch's SDPA pinned to
# one backend each, so a run can report SDPA's best backend on the card ("torch" is SDPA's own pick).
SDPA_BACKENDS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION",
                 "sdpa-efficient": "EFFICIENT_ATTENTION", "sdpa-math": "MATH"}


def attention_flop(shape: dict) -> dict[str, float]:
    forward = 4.0 * shape["B"] * shape["H"] * shape["T"] * shape["T"] * shape["D"]
    if shape["causal"]:
        forward /= 2
    return {"fwd": forward, "bwd": 2.5 * forward, "fwd+bwd": 3.5 * forward}


def make_inputs(shape: dict, dtype: torch.dtype, device: torch.device) -> harness.Inputs:
    size = (shape["B"], shape["H"], shape["T"], shape["D"])
    q, k, v = (torch.randn(size, dtype=dtype, device=device, requires_grad=True) for _ in range(3))
    return harness.Inputs((q, k, v), {"causal": shape["causal"]})


def sdpa_with(backend_name: str) -> Callable:
    """PyTorch's SDPA restricted to one of its backends (torch.nn.attention.SDPBackend member name)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def attend(q, k, v, *, causal=True):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return attend


SPEC = harness.OpBench("attention", make_inputs, flop=attention_flop, x_axis="T", series_keys=("D",),
                       extra={name: functools.partial(sdpa_with, member) for name, member in SDPA_BACKENDS.items()})


def build_parser() -> argparse.ArgumentParser:
    parser = harness.build_parser("python -m bench.attention", "Attention forward/backward per backend against T.")
    parser.add_argument("--T", type=lambda s: harness.parse_list(s, int), default=None,
                        help=f"sequence lengths (default: {GPU_T} on a GPU, {CPU_T} on a CPU)")
    parser.add_argument("--D", type=lambda s: harness.parse_list(s, int), default=None,
                        help=f"head sizes (default: {GPU_D} on a GPU, {CPU_D} on a CPU)")
    parser.add_argument("--batch", type=int, default=None,
                        help=f"batch size B (default: {GPU_TOKENS} // T on a GPU, {CPU_BATCH} on a CPU)")
    parser.add_argument("--heads", type=int, default=None,
                        help=f"heads H (default: {GPU_MODEL_WIDTH} // D on a GPU, {CPU_HEADS} on a CPU)")
    parser.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True, help="causal mask (default)")
    return parser


def shapes(args: argparse.Namespace, device: torch.device) -> list[dict]:
    gpu = device.type == "cuda"
    result = []
    for head_dim in args.D or (GPU_D if gpu else CPU_D):
        for seq_len in args.T or (GPU_T if gpu else CPU_T):
            batch = args.batch or (max(1, GPU_TOKENS // seq_len) if gpu else CPU_BATCH)
            heads = args.heads or (max(1, GPU_MODEL_WIDTH // head_dim) if gpu else CPU_HEADS)
            result.append({"B": batch, "H": heads, "T": seq_len, "D": head_dim, "causal": args.causal})
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return harness.run_cli([SPEC], lambda spec, device: shapes(args, device), args, compile_by_default=False)


if __name__ == "__main__":
    sys.exit(main())
