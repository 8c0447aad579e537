"""python -m bench.sanitize_ops: every op of the compiled extension once, on tiny ragged shapes.

Made to run under NVIDIA's compute-sanitizer, which checks every kernel launch of the process:

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python -m bench.sanitize_ops
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool racecheck python -m bench.sanitize_ops --ops attention

(without PyTorch's caching allocator every tensor is its own allocation, so a read past a tensor's
end leaves it and memcheck sees it; inside one cached block it would not).

The shapes are small and ragged on purpose: T = 129 (one row past a multiple of 64, so every
kernel has a partial tile), 7 rows, V = 1000 and widths of 129, and head sizes that the CUDA
attention pads (40 -> 64, 96 -> 128) besides 64 and 128; fp32, fp16 and bf16; causal and not.
Each op's outputs are also checked against the `reference` backend in float64 on the CPU (loose
tolerances: the sanitizer is the point, but a wrong result is worth a line too), so the sanitizer
itself sees only the extension's kernels and the copies to and from the device.

Calls torch.ops.engine.* directly (forward and backward ops by name; `ffn` is the whole FFN op, its
matmuls included), on CUDA tensors, or on CPU tensors with --device cpu (the `cpp` backend's kernels;
what the CPU dry run of gpu_check.sh uses). One line per case; exit status 1 if any case failed, 2 if
the extension is missing.
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Callable

import torch

from engine.ops import reference
from engine.ops.backend import DTYPE_NAMES, DTYPES

OPS = ("attention", "ffn_epilogues", "ffn", "layer_norm", "cross_entropy")
T, ROWS, VOCAB, WIDTH = 129, 7, 1000, 129
HEAD_DIMS = (40, 64, 96, 128)
# Relative error (norm of the difference over norm of the reference) allowed per dtype.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def relative_error(value: torch.Tensor, expected: torch.Tensor) -> float:
    value, expected = value.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.isfinite(value).all():
        return math.inf
    return float((value - expected).norm() / expected.norm().clamp_min(1e-30))


def compare(name: str, pairs: list[tuple[str, torch.Tensor, torch.Tensor]], dtype: torch.dtype) -> list[str]:
    """Problems, one per tensor whose relative error exceeds the dtype's tolerance."""
    problems = []
    for label, value, expected in pairs:
        error = relative_error(value, expected)
        if not error <= TOLERANCE[dtype]:
            problems.append(f"{name}: {label} relative error {error:.3g} > {TOLERANCE[dtype]:g}")
    return problems


def reference_gradients(function: Callable, inputs: list[torch.Tensor], grad_out: torch.Tensor):
    """(output, gradients) of `function` in float64 on the CPU."""
    leaves = [t.detach().double().cpu().requires_grad_() for t in inputs]
    out = function(*leaves)
    grads = torch.autograd.grad(out, leaves, grad_out.detach().double().cpu())
    return out, grads


def random(*size: int, dtype: torch.dtype, device: str, scale: float = 1.0) -> torch.Tensor:
    """Drawn in fp32 on the CPU, then cast and copied: no random-number kernels on the device."""
    return (torch.randn(size) * scale).to(dtype).to(device)


def check_attention(dtype: torch.dtype, device: str) -> list[str]:
    problems = []
    for head_dim in HEAD_DIMS:
        for causal in (True, False):
            name = f"attention {DTYPE_NAMES[dtype]} B=1 H=2 T={T} D={head_dim} {'causal' if causal else 'full'}"
            q, k, v, grad_out = (random(1, 2, T, head_dim, dtype=dtype, device=device) for _ in range(4))
            scale = 1.0 / math.sqrt(head_dim)
            out, lse = torch.ops.engine.attention_forward(q, k, v, causal, scale)
            grad_q, grad_k, grad_v = torch.ops.engine.attention_backward(grad_out, q, k, v, out, lse, causal, scale)
            expected, grads = reference_gradients(
                lambda q_, k_, v_, causal=causal, scale=scale: reference.attention(q_, k_, v_, causal=causal, scale=scale), [q, k, v], grad_out)
            found = compare(name, [("out", out, expected), ("dq", grad_q, grads[0]), ("dk", grad_k, grads[1]),
                                   ("dv", grad_v, grads[2])], dtype)
            report(name, found)
            problems += found
    return problems


def check_ffn_epilogues(dtype: torch.dtype, device: str) -> list[str]:
    problems = []
    for tanh in (False, True):
        activation = "gelu_tanh" if tanh else "gelu"
        name = f"bias_gelu(+backward) {DTYPE_NAMES[dtype]} ({ROWS}, {WIDTH}) {activation}"
        pre, grad = (random(ROWS, WIDTH, dtype=dtype, device=device) for _ in range(2))
        bias = random(WIDTH, dtype=dtype, device=device, scale=0.1)
        hidden = torch.ops.engine.bias_gelu(pre, bias, tanh)
        grad_pre = torch.ops.engine.bias_gelu_backward(grad, pre, bias, tanh)
        expected, grads = reference_gradients(
            lambda p, b, activation=activation: reference.activation_fn(p + b, activation), [pre, bias], grad)
        found = compare(name, [("hidden", hidden, expected), ("dpre", grad_pre, grads[0])], dtype)
        report(name, found)
        problems += found
    name = f"bias_residual {DTYPE_NAMES[dtype]} ({ROWS}, {WIDTH})"
    y, residual = (random(ROWS, WIDTH, dtype=dtype, device=device) for _ in range(2))
    bias = random(WIDTH, dtype=dtype, device=device)
    out = torch.ops.engine.bias_residual(y, bias, residual)
    expected = y.double().cpu() + bias.double().cpu() + residual.double().cpu()
    found = compare(name, [("out", out, expected)], dtype)
    report(name, found)
    return problems + found


def check_ffn(dtype: torch.dtype, device: str) -> list[str]:
    """ffn_forward and ffn_backward: the matmuls (PyTorch's) around the epilogue kernels, with both biases."""
    name = f"ffn_forward(+backward) {DTYPE_NAMES[dtype]} ({ROWS}, {WIDTH}) -> {2 * WIDTH} -> {WIDTH}"
    x, residual, grad_out = (random(ROWS, WIDTH, dtype=dtype, device=device) for _ in range(3))
    w1 = random(2 * WIDTH, WIDTH, dtype=dtype, device=device, scale=WIDTH ** -0.5)
    w2 = random(WIDTH, 2 * WIDTH, dtype=dtype, device=device, scale=(2 * WIDTH) ** -0.5)
    b1, b2 = (random(n, dtype=dtype, device=device, scale=0.1) for n in (2 * WIDTH, WIDTH))
    out, pre, hidden = torch.ops.engine.ffn_forward(x, w1, b1, w2, b2, residual, False)
    grads = torch.ops.engine.ffn_backward(grad_out, x, w1, b1, w2, pre, hidden, False)
    expected, expected_grads = reference_gradients(reference.ffn, [x, w1, b1, w2, b2, residual], grad_out)
    labels = ("dx", "dw1", "db1", "dw2", "db2")
    found = compare(name, [("out", out, expected), *zip(labels, grads, expected_grads)], dtype)
    report(name, found)
    return found


def check_layer_norm(dtype: torch.dtype, device: str) -> list[str]:
    problems = []
    for width in (WIDTH, VOCAB):
        name = f"layer_norm(+backward) {DTYPE_NAMES[dtype]} ({ROWS}, {width})"
        x, grad_y = (random(ROWS, width, dtype=dtype, device=device) for _ in range(2))
        weight = (1 + random(width, dtype=torch.float32, device="cpu", scale=0.1)).to(dtype).to(device)
        bias = random(width, dtype=dtype, device=device, scale=0.1)
        y, mean, rstd = torch.ops.engine.layer_norm_forward(x, weight, bias, 1e-5)
        grad_x, grad_weight, grad_bias = torch.ops.engine.layer_norm_backward(grad_y, x, weight, mean, rstd)
        expected, grads = reference_gradients(lambda x_, w, b: reference.layer_norm(x_, w, b, 1e-5),
                                              [x, weight, bias], grad_y)
        found = compare(name, [("y", y, expected), ("dx", grad_x, grads[0]), ("dweight", grad_weight, grads[1]),
                               ("dbias", grad_bias, grads[2])], dtype)
        report(name, found)
        problems += found
    return problems


def check_cross_entropy(dtype: torch.dtype, device: str) -> list[str]:
    name = f"cross_entropy(+backward) {DTYPE_NAMES[dtype]} ({ROWS}, {VOCAB}), one row ignored"
    logits = random(ROWS, VOCAB, dtype=dtype, device=device, scale=2.0)
    targets = torch.randint(0, VOCAB, (ROWS,))
    targets[3] = -1  # ignore_index
    targets = targets.to(device)
    loss, lse = torch.ops.engine.cross_entropy_forward(logits, targets, -1)
    grad_loss = torch.ones((), dtype=torch.float32, device=device)
    grad_logits = torch.ops.engine.cross_entropy_backward(grad_loss, logits, targets, lse, -1)
    expected, grads = reference_gradients(lambda z: reference.cross_entropy(z, targets.cpu(), ignore_index=-1),
                                          [logits], grad_loss.cpu())
    found = compare(name, [("loss", loss, expected), ("dlogits", grad_logits, grads[0])], dtype)
    report(name, found)
    return found


CHECKS = {"attention": check_attention, "ffn_epilogues": check_ffn_epilogues, "ffn": check_ffn,
          "layer_norm": check_layer_norm, "cross_entropy": check_cross_entropy}


def report(name: str, problems: list[str]) -> None:
    print(("ok   " if not problems else "FAIL ") + name + "".join(f"\n     {p}" for p in problems), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sanitize_ops", description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated subset of fp32,fp16,bf16")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cuda or cpu")
    args = parser.parse_args(argv)
    names = [name for name in args.ops.split(",") if name]
    dtypes = [name for name in args.dtypes.split(",") if name]
    unknown = [name for name in names if name not in CHECKS] + [name for name in dtypes if name not in DTYPES]
    if unknown:
        print(f"error: unknown op or dtype {', '.join(unknown)}; ops: {', '.join(OPS)}; dtypes: "
              f"{', '.join(DTYPES)}", file=sys.stderr)
        return 2
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but this PyTorch sees no CUDA GPU", file=sys.stderr)
        return 2
    from engine.ops import extension

    module, reason = extension.load()
    if module is None or (device == "cuda" and not extension.has_cuda_kernels()):
        print(f"error: the extension's {device} kernels are not available: "
              f"{reason or 'engine._C was built without CUDA kernels'}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    problems = []
    for name in names:
        for dtype in dtypes:
            try:
                problems += CHECKS[name](DTYPES[dtype], device)
            except Exception as exc:  # noqa: BLE001 - one failing op must not hide the others' results
                message = f"{name} {dtype}: {type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
                report(message, [message])
                problems.append(message)
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"{len(problems)} problem(s) in {', '.join(names)} x {', '.join(dtypes)} on {device}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
