"""python -m bench.cross_entropy: the loss, alone and fused with the LM head, per backend and torch.compile.

cross_entropy(logits (N, V), targets) is memory-bound; GB/s counts the minimum bytes moved
(e = bytes per logit, targets are int64):
    forward  = read the logits and targets            N * V * e + 8 * N
    backward = read the logits, write their gradient  2 * N * V * e + 8 * N
linear_cross_entropy(x (N, d), W (V, d), targets) = cross_entropy(x W^T, targets) is dominated by
its matmuls; TFLOP/s counts them (the softmax is not counted):
    forward  = 2 * N * d * V       (the logits)
    backward = 4 * N * d * V       (dX = dLogits W and dW = dLogits^T X)
Its headline figure is peak memory: a fused backend need never hold the (N, V) logits.

Default sweep: on a GPU bf16, N = 8192 rows; cross_entropy V in {8192, 32768, 50257, 128256};
linear_cross_entropy d = 768, V in {32768, 50304} (50304: GPT-2's padded vocabulary). On a CPU fp32,
N = 256; cross_entropy V in {1024, 4096, 16384}; linear_cross_entropy d = 64, V in {1024, 4096}. All targets are valid
(none equals ignore_index).
"""
from __future__ import annotations

import argparse
import sys

import torch

from bench import harness

OPS = ("cross_entropy", "linear_cross_entropy")
GPU_ROWS, GPU_VOCABS, GPU_LINEAR_VOCABS, GPU_D_MODEL = 8192, (8192, 32768, 50257, 128256), (32768, 50304), 768
CPU_ROWS, CPU_VOCABS, CPU_LINEAR_VOCABS, CPU_D_MODEL = 256, (1024, 4096, 16384), (1024, 4096), 64


def cross_entropy_bytes(shape: dict, dtype: torch.dtype) -> dict[str, float]:
    e = torch.empty((), dtype=dtype).element_size()
    n, v = shape["N"], shape["V"]
    forward = n * v * e + 8 * n
    backward = 2 * n * v * e + 8 * n
    return {"fwd": float(forward), "bwd": float(backward), "fwd+bwd": float(forward + backward)}


def linear_cross_entropy_flop(shape: dict) -> dict[str, float]:
    logits = 2.0 * shape["N"] * shape["d_model"] * shape["V"]
    return {"fwd": logits, "bwd": 2 * logits, "fwd+bwd": 3 * logits}


def make_cross_entropy_inputs(shape: dict, dtype: torch.dtype, device: torch.device) -> harness.Inputs:
    logits = torch.randn(shape["N"], shape["V"], device=device).to(dtype).requires_grad_()
    targets = torch.randint(0, shape["V"], (shape["N"],), device=device)
    return harness.Inputs((logits, targets))


def make_linear_cross_entropy_inputs(shape: dict, dtype: torch.dtype, device: torch.device) -> harness.Inputs:
    n, d, v = shape["N"], shape["d_model"], shape["V"]
    x = torch.randn(n, d, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(v, d, device=device) * d ** -0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), device=device)
    return harness.Inputs((x, weight, targets))


SPECS = {
    "cross_entropy": harness.OpBench("cross_entropy", make_cross_entropy_inputs, bytes=cross_entropy_bytes,
                                     x_axis="V", metric="gbps"),
    "linear_cross_entropy": harness.OpBench("linear_cross_entropy", make_linear_cross_entropy_inputs,
                                            flop=linear_cross_entropy_flop, x_axis="V", series_keys=("d_model",)),
}


def build_parser() -> argparse.ArgumentParser:
    parser = harness.build_parser("python -m bench.cross_entropy",
                                  "Cross-entropy and fused LM head + cross-entropy per backend against vocabulary.")
    parser.add_argument("--ops", type=lambda s: harness.parse_list(s), default=list(OPS),
                        help="comma-separated subset of cross_entropy,linear_cross_entropy (default: both)")
    parser.add_argument("--rows", type=int, default=None,
                        help=f"rows N (default: {GPU_ROWS} on a GPU, {CPU_ROWS} on a CPU)")
    parser.add_argument("--vocab", type=lambda s: harness.parse_list(s, int), default=None,
                        help="vocabulary sizes V (default: per op, see the module docstring)")
    parser.add_argument("--d-model", type=int, default=None,
                        help=f"linear_cross_entropy's input width (default: {GPU_D_MODEL} on a GPU, "
                             f"{CPU_D_MODEL} on a CPU)")
    return parser


def shapes(args: argparse.Namespace, spec: harness.OpBench, device: torch.device) -> list[dict]:
    gpu = device.type == "cuda"
    rows = args.rows or (GPU_ROWS if gpu else CPU_ROWS)
    if spec.name == "cross_entropy":
        return [{"N": rows, "V": v} for v in args.vocab or (GPU_VOCABS if gpu else CPU_VOCABS)]
    d_model = args.d_model or (GPU_D_MODEL if gpu else CPU_D_MODEL)
    return [{"N": rows, "d_model": d_model, "V": v}
            for v in args.vocab or (GPU_LINEAR_VOCABS if gpu else CPU_LINEAR_VOCABS)]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    unknown = [name for name in args.ops if name not in SPECS]
    if unknown:
        raise SystemExit(f"error: unknown op(s) {unknown}; choose from {', '.join(OPS)}")
    return harness.run_cli([SPECS[name] for name in args.ops], lambda spec, device: shapes(args, spec, device), args,
                           compile_by_default=True)


if __name__ == "__main__":
    sys.exit(main())
