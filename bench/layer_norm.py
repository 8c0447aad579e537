"""python -m bench.layer_norm: LayerNorm bandwidth per backend and torch.compile, against the width C.

LayerNorm is memory-bound, so the figure of merit is GB/s: the minimum bytes a pass must move
(each tensor read or written once; e = bytes per element) over its time.
    forward  = read x, write y (2 * N * C * e) + read weight, bias (2 * C * e)
    backward = read x and dy, write dx (3 * N * C * e) + read weight, write dweight, dbias (3 * C * e)
Statistics a backend saves for its backward (mean, 1/std) are not counted: a kernel may recompute them.

The ceiling is measured beside it (on by default on a GPU, `--copy`): `copy`, a plain device copy
y = x.clone() of the same (N, C) input, forward only, whose GB/s counts the same bytes as LayerNorm's
forward (read x, write y; the 2 C weight and bias bytes are noise). LayerNorm's GB/s over the copy's
is the fraction of attainable bandwidth.

Default sweep: on a GPU bf16, N = 16384 rows, C in {768, 1024, 2048, 4096, 8192};
on a CPU fp32, N = 1024, C in {256, 512, 1024, 2048}.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

import torch

from bench import harness

GPU_ROWS, GPU_WIDTHS = 16384, (768, 1024, 2048, 4096, 8192)
CPU_ROWS, CPU_WIDTHS = 1024, (256, 512, 1024, 2048)


def layer_norm_bytes(shape: dict, dtype: torch.dtype) -> dict[str, float]:
    e = torch.empty((), dtype=dtype).element_size()
    n, c = shape["N"], shape["C"]
    forward = (2 * n * c + 2 * c) * e
    backward = (3 * n * c + 3 * c) * e
    return {"fwd": float(forward), "bwd": float(backward), "fwd+bwd": float(forward + backward)}


def make_inputs(shape: dict, dtype: torch.dtype, device: torch.device) -> harness.Inputs:
    n, c = shape["N"], shape["C"]
    x = torch.randn(n, c, device=device).to(dtype).requires_grad_()
    weight = (1 + 0.1 * torch.randn(c, device=device)).to(dtype).requires_grad_()
    bias = (0.1 * torch.randn(c, device=device)).to(dtype).requires_grad_()
    return harness.Inputs((x, weight, bias))


def copy_bytes(shape: dict, dtype: torch.dtype) -> dict[str, float]:
    return {"fwd": float(2 * shape["N"] * shape["C"] * torch.empty((), dtype=dtype).element_size())}


def make_copy_inputs(shape: dict, dtype: torch.dtype, device: torch.device) -> harness.Inputs:
    return harness.Inputs((torch.randn(shape["N"], shape["C"], device=device).to(dtype),))


def clone() -> Callable[[torch.Tensor], torch.Tensor]:
    return torch.clone


SPEC = harness.OpBench("layer_norm", make_inputs, bytes=layer_norm_bytes, x_axis="C", metric="gbps")
COPY_SPEC = harness.OpBench("copy", make_copy_inputs, bytes=copy_bytes, x_axis="C", metric="gbps",
                            extra={"copy": clone}, passes=("fwd",))


def build_parser() -> argparse.ArgumentParser:
    parser = harness.build_parser("python -m bench.layer_norm", "LayerNorm bandwidth per backend against width.")
    parser.add_argument("--rows", type=int, default=None,
                        help=f"rows N (default: {GPU_ROWS} on a GPU, {CPU_ROWS} on a CPU)")
    parser.add_argument("--C", type=lambda s: harness.parse_list(s, int), default=None,
                        help=f"widths (default: {GPU_WIDTHS} on a GPU, {CPU_WIDTHS} on a CPU)")
    parser.add_argument("--copy", action=argparse.BooleanOptionalAction, default=None,
                        help="also time a plain copy of the same input, the bandwidth ceiling (default: on a GPU)")
    return parser


def shapes(args: argparse.Namespace, device: torch.device) -> list[dict]:
    gpu = device.type == "cuda"
    rows = args.rows or (GPU_ROWS if gpu else CPU_ROWS)
    return [{"N": rows, "C": c} for c in args.C or (GPU_WIDTHS if gpu else CPU_WIDTHS)]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with_copy = args.copy if args.copy is not None else harness.resolve_device(args.device).type == "cuda"
    return harness.run_cli([SPEC, COPY_SPEC] if with_copy else [SPEC], lambda spec, device: shapes(args, device), args,
                           compile_by_default=True)


if __name__ == "__main__":
    sys.exit(main())
