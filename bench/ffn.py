"""python -m bench.ffn: the FFN block (residual + act(x W1^T + b1) W2^T + b2), per backend and torch.compile.

FLOP count (matmuls only; bias, GELU and the residual add are not counted):
    forward  = 2 matmuls x 2 * N * d_model * d_ff = 4 * N * d_model * d_ff
    backward = 4 matmuls (dX and dW of each)      = 8 * N * d_model * d_ff

`compile` is torch.compile of the reference FFN (plain PyTorch, fused by Inductor), the
competitor a user gets for free; it is on by default on a GPU.

Default sweep: on a GPU bf16, d_model 768, d_ff 3072 (GPT-2 small), N = 2048 ... 16384 tokens;
on a CPU fp32, d_model 256, d_ff 1024, N in {128, 256, 512}.
"""
from __future__ import annotations

import argparse
import sys

import torch

from bench import harness

GPU_TOKENS = (2048, 4096, 8192, 16384)
GPU_D_MODEL, GPU_D_FF = 768, 3072
CPU_TOKENS = (128, 256, 512)
CPU_D_MODEL, CPU_D_FF = 256, 1024


def ffn_flop(shape: dict) -> dict[str, float]:
    matmul = 2.0 * shape["N"] * shape["d_model"] * shape["d_ff"]
    return {"fwd": 2 * matmul, "bwd": 4 * matmul, "fwd+bwd": 6 * matmul}


def make_inputs(shape: dict, dtype: torch.dtype, device: torch.device) -> harness.Inputs:
    n, d_model, d_ff = shape["N"], shape["d_model"], shape["d_ff"]

    def leaf(*size: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(size, dtype=torch.float32, device=device) * scale).to(dtype).requires_grad_()

    x, residual = leaf(n, d_model), leaf(n, d_model)
    w1, b1 = leaf(d_ff, d_model, scale=d_model ** -0.5), leaf(d_ff, scale=0.02)  # nn.Linear layout (out, in)
    w2, b2 = leaf(d_model, d_ff, scale=d_ff ** -0.5), leaf(d_model, scale=0.02)
    return harness.Inputs((x, w1, b1, w2, b2, residual), {"activation": shape["activation"]})


SPEC = harness.OpBench("ffn", make_inputs, flop=ffn_flop, x_axis="N", series_keys=("d_model", "d_ff"))


def build_parser() -> argparse.ArgumentParser:
    parser = harness.build_parser("python -m bench.ffn", "FFN block forward/backward per backend against tokens.")
    parser.add_argument("--tokens", type=lambda s: harness.parse_list(s, int), default=None,
                        help=f"rows N (default: {GPU_TOKENS} on a GPU, {CPU_TOKENS} on a CPU)")
    parser.add_argument("--d-model", type=int, default=None,
                        help=f"model width (default: {GPU_D_MODEL} on a GPU, {CPU_D_MODEL} on a CPU)")
    parser.add_argument("--d-ff", type=int, default=None,
                        help=f"hidden width (default: {GPU_D_FF} on a GPU, {CPU_D_FF} on a CPU)")
    parser.add_argument("--activation", choices=("gelu", "gelu_tanh"), default="gelu")
    return parser


def shapes(args: argparse.Namespace, device: torch.device) -> list[dict]:
    gpu = device.type == "cuda"
    d_model = args.d_model or (GPU_D_MODEL if gpu else CPU_D_MODEL)
    d_ff = args.d_ff or (GPU_D_FF if gpu else CPU_D_FF)
    return [{"N": n, "d_model": d_model, "d_ff": d_ff, "activation": args.activation}
            for n in args.tokens or (GPU_TOKENS if gpu else CPU_TOKENS)]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return harness.run_cli([SPEC], lambda spec, device: shapes(args, device), args, compile_by_default=True)


if __name__ == "__main__":
    sys.exit(main())
