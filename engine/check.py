"""`python -m engine.check`: does every backend compute every op correctly on this device?

Kernels are tested on few GPUs; users run them on many, with other shared-memory sizes, drivers
and Triton builds. This module runs, for every op and every backend available here, the forward
and the gradient of every input against the `reference` backend on odd shapes (ragged lengths,
each head dimension a backend supports, decoding with T_q != T_k) in the training dtype, under
autocast the way the trainer calls them, and judges each result by the precision contract's 2x
rule (engine/ops/tolerance.py). It then times each op once against `torch` on a typical training
shape. Output: a table (op x backend: ok / FAIL / n/a, the worst error as a fraction of the rule's
bound, the speed ratio), the same as JSON with --json, exit status 1 if anything fails.

    python -m engine.check [--device cuda|cpu] [--dtype bf16|fp16|fp32[,...]] [--backends a,b]
                           [--json FILE] [--no-speed] [--clear-cache]

The same check, on small shapes taken from the model, is `auto`'s self-check (`prepare_backends`,
called by engine.train, engine.sample and the benchmarks before the first step): each op's chosen
backend is checked once per device, dtype and versions, the verdict cached on disk (ENGINE_CACHE_DIR,
self-check.json). A failing backend is passed over with one warning line; an explicit --backend that
fails is an error (exit 2). `--no-self-check` skips it; `--clear-cache` here forgets the verdicts.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

import engine
from engine import ops
from engine.data import cache_dir
from engine.ops import registry, tolerance
from engine.ops.backend import DTYPE_NAMES, DTYPES, OP_NAMES, Call

# Ops the model calls with fp32 tensors under autocast: the residual stream and the weights stay
# fp32 and the matmuls run in the autocast dtype. Attention and the loss get low-precision tensors;
# LayerNorm gets the fp32 residual stream and computes in fp32 (no matmul for autocast to cast).
FP32_INPUT_OPS = ("ffn", "layer_norm", "linear_cross_entropy")
FP32_COMPUTE_OPS = ("layer_norm",)
# Head dimensions the device check tries; a backend is checked on those it declares.
HEAD_DIMS = (16, 32, 64, 96, 128)
# Rows (tokens) in every case: odd, so no kernel sees only whole blocks.
ROWS = 37
CACHE_NAME = "self-check.json"


# ----------------------------------------------------------------------------------- cases

@dataclass(frozen=True)
class Case:
    """One op call to check: fp32 CPU inputs (made from a fixed seed), keyword arguments, what it needs."""

    op: str
    label: str
    make_inputs: Callable[[], list] = field(compare=False)
    kwargs: dict = field(default_factory=dict, compare=False)
    head_dim: int | None = None
    decode: bool = False

    def call(self, device_type: str, dtype: torch.dtype) -> Call:
        return Call(self.op, device_type, dtype, False, self.head_dim, self.decode)


def attention_case(B: int, H: int, T_q: int, D: int, causal: bool = True, T_k: int | None = None) -> Case:
    T_k = T_q if T_k is None else T_k
    label = f"B={B} H={H} T={T_q} D={D} " + ("causal" if causal else f"T_k={T_k}" if T_k != T_q else "non-causal")
    return Case("attention", label,
                lambda: [torch.randn(B, H, T_q, D), torch.randn(B, H, T_k, D), torch.randn(B, H, T_k, D)],
                {"causal": causal}, D, T_q != T_k)


def ffn_case(rows: int, d_model: int, d_ff: int, bias: bool, activation: str) -> Case:
    def make():
        return [torch.randn(rows, d_model), torch.randn(d_ff, d_model) * d_model ** -0.5,
                torch.randn(d_ff) if bias else None, torch.randn(d_model, d_ff) * d_ff ** -0.5,
                torch.randn(d_model) if bias else None, torch.randn(rows, d_model)]
    return Case("ffn", f"N={rows} d={d_model} d_ff={d_ff} {activation}{'' if bias else ' no bias'}", make,
                {"activation": activation})


def layer_norm_case(rows: int, hidden: int, bias: bool) -> Case:
    return Case("layer_norm", f"N={rows} C={hidden}{'' if bias else ' no bias'}",
                lambda: [torch.randn(rows, hidden) * 3 + 1, torch.randn(hidden), torch.randn(hidden) if bias else None])


def _targets(rows: int, vocab: int) -> torch.Tensor:
    targets = torch.randint(0, vocab, (rows,))
    targets[::5] = -1  # some ignored rows, as padding would be
    return targets


def cross_entropy_case(rows: int, vocab: int) -> Case:
    return Case("cross_entropy", f"N={rows} V={vocab}", lambda: [torch.randn(rows, vocab) * 2, _targets(rows, vocab)])


def linear_cross_entropy_case(rows: int, d_model: int, vocab: int) -> Case:
    return Case("linear_cross_entropy", f"N={rows} d={d_model} V={vocab}",
                lambda: [torch.randn(rows, d_model), torch.randn(vocab, d_model) * d_model ** -0.5,
                         _targets(rows, vocab)])


def device_check_cases() -> list[Case]:
    """The full check: ragged lengths, every head dimension, causal, non-causal and decode attention."""
    return [
        *(attention_case(1, 2, ROWS, D) for D in HEAD_DIMS),
        attention_case(2, 1, 1, 64),
        attention_case(1, 2, 67, 32, causal=False),
        attention_case(1, 2, 1, 64, causal=False, T_k=77),
        attention_case(1, 2, 5, 128, causal=False, T_k=130),
        ffn_case(ROWS, 96, 200, True, "gelu_tanh"),
        ffn_case(5, 64, 256, False, "gelu"),
        layer_norm_case(ROWS, 96, True),
        layer_norm_case(1, 200, False),
        cross_entropy_case(ROWS, 300),
        linear_cross_entropy_case(ROWS, 48, 300),
    ]


def model_cases(config) -> list[Case]:
    """The self-check: each op once at the model's sizes (few rows; the vocabulary capped at 4096)."""
    head_dim = config.d_model // config.n_heads
    T = min(ROWS, config.max_seq_len)
    vocab = min(config.vocab_size, 4096)
    return [
        attention_case(1, 2, T, head_dim),
        attention_case(1, 2, 1, head_dim, causal=False, T_k=T),  # generation's decode step
        ffn_case(T, config.d_model, config.d_ff, config.bias, config.activation),
        layer_norm_case(T, config.d_model, config.bias),
        cross_entropy_case(T, vocab),
        linear_cross_entropy_case(T, config.d_model, vocab),
    ]


# ------------------------------------------------------------------------------ checking

@dataclass
class CaseResult:
    """status: "ok", "FAIL" or "n/a" (the backend cannot run this call here: message says why)."""

    label: str
    status: str
    ratio: float | None = None  # the worst max-error / bound over the output and gradients
    message: str = ""


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"


@contextlib.contextmanager
def _seeded(device: torch.device):
    """Seed 0 inside, so every run draws the same inputs; the caller's random streams stay as they were."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        yield


def _dtypes(op: str, dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    """(the dtype of the tensors the trainer hands `op`, the dtype `op` computes in) when it trains in `dtype`."""
    return (torch.float32 if op in FP32_INPUT_OPS else dtype), (torch.float32 if op in FP32_COMPUTE_OPS else dtype)


def run_case(case: Case, backend: str, device: torch.device, dtype: torch.dtype) -> CaseResult:
    """Forward and every gradient of one case on `backend`, judged against `reference` by the 2x rule."""
    input_dtype, compute_dtype = _dtypes(case.op, dtype)
    reason = registry.why_not(backend, case.call(device.type, compute_dtype))
    if reason is not None:
        return CaseResult(case.label, "n/a", message=f"{backend} {reason}")
    try:
        with _seeded(device):
            verdicts = tolerance.compare_with_reference(case.op, case.make_inputs, compute_dtype, backend, device,
                                                        case.kwargs, input_dtype=input_dtype,
                                                        autocast=compute_dtype != torch.float32)
    except Exception as exc:  # noqa: BLE001 - a backend that raises fails its check; the message says how
        return CaseResult(case.label, "FAIL", message=_first_line(exc))
    failed = [verdict for verdict in verdicts if not verdict.ok]
    ratio = max((v.ratio for v in verdicts if v.ok), default=None) if not failed else None
    return CaseResult(case.label, "FAIL" if failed else "ok", ratio, failed[0].problem[:300] if failed else "")


@dataclass
class OpResult:
    op: str
    backend: str
    status: str  # "FAIL" if any case fails, "n/a" if none could run, else "ok"
    ratio: float | None
    speed: float | None = None  # torch's time / this backend's, forward + backward on a training shape
    speed_note: str = ""
    cases: list[CaseResult] = field(default_factory=list)

    @property
    def note(self) -> str:
        failed = [c for c in self.cases if c.status == "FAIL"]
        if failed:
            return f"{failed[0].label}: {failed[0].message}"
        skipped = [c for c in self.cases if c.status == "n/a"]
        if skipped and len(skipped) < len(self.cases):
            return f"n/a for {len(skipped)} of {len(self.cases)} cases: {skipped[0].message}"
        return skipped[0].message if skipped else self.speed_note


def check_op(op: str, backend: str, device: torch.device, dtype: torch.dtype, cases: list[Case]) -> OpResult:
    results = [run_case(case, backend, device, dtype) for case in cases if case.op == op]
    statuses = {result.status for result in results}
    status = "FAIL" if "FAIL" in statuses else "ok" if "ok" in statuses else "n/a"
    ratios = [result.ratio for result in results if result.ratio is not None]
    return OpResult(op, backend, status, max(ratios) if ratios and status == "ok" else None, cases=results)


# --------------------------------------------------------------------------------- speed

# A typical training micro-batch per device type: GPT-2 small's on a GPU, the toy preset's on a CPU.
TYPICAL = {
    "cuda": {"B": 8, "T": 1024, "H": 12, "D": 64, "d_model": 768, "d_ff": 3072, "vocab": 50304},
    "cpu": {"B": 32, "T": 128, "H": 4, "D": 16, "d_model": 64, "d_ff": 256, "vocab": 65},
}


def typical_case(op: str, device_type: str) -> Case:
    s = TYPICAL[device_type]
    rows = s["B"] * s["T"]
    return {
        "attention": lambda: attention_case(s["B"], s["H"], s["T"], s["D"]),
        "ffn": lambda: ffn_case(rows, s["d_model"], s["d_ff"], True, "gelu_tanh"),
        "layer_norm": lambda: layer_norm_case(rows, s["d_model"], True),
        "cross_entropy": lambda: cross_entropy_case(rows, s["vocab"]),
        "linear_cross_entropy": lambda: linear_cross_entropy_case(rows, s["d_model"], s["vocab"]),
    }[op]()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_case(case: Case, backend: str, device: torch.device, dtype: torch.dtype, repeats: int) -> float:
    """Seconds of one forward + backward: the best of `repeats` after one untimed call (compilation,
    autotuning). The best, not the median: on a shared machine the other processes only add time."""
    input_dtype, compute_dtype = _dtypes(case.op, dtype)
    autocast = compute_dtype != torch.float32
    with _seeded(torch.device("cpu")):
        inputs = [t.to(device=device, dtype=input_dtype).requires_grad_() if t is not None and t.is_floating_point()
                  else (t.to(device) if t is not None else None) for t in case.make_inputs()]
    differentiable = [t for t in inputs if t is not None and t.requires_grad]
    function = getattr(ops, case.op)
    times = []
    for _ in range(repeats + 1):
        _synchronize(device)
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=compute_dtype, enabled=autocast):
            out = function(*inputs, backend=backend, **case.kwargs)
        torch.autograd.grad(out, differentiable, torch.ones_like(out))
        _synchronize(device)
        times.append(time.perf_counter() - started)
    return min(times[1:])


def add_speed(results: list[OpResult], device: torch.device, dtype: torch.dtype) -> None:
    """Fill each passing result's speed ratio against `torch` on the typical training shape."""
    repeats = 10 if device.type == "cuda" else 5
    baseline: dict[str, float] = {}
    for result in sorted(results, key=lambda r: r.backend != "torch"):  # torch first: the others divide by it
        if result.status != "ok":
            continue
        if result.backend == "triton" and device.type == "cpu":
            result.speed_note = "not timed (Triton's interpreter)"
            continue
        case = typical_case(result.op, device.type)
        try:
            seconds = time_case(case, result.backend, device, dtype, repeats)
        except Exception as exc:  # noqa: BLE001 - a shape the small cases did not cover: say so, do not stop
            result.speed_note = f"timing failed: {_first_line(exc)}"
            continue
        if result.backend == "torch":
            baseline[result.op] = seconds
        if result.op in baseline:
            result.speed = baseline[result.op] / seconds


# ----------------------------------------------------------------------------- reporting

def device_identity(device: torch.device) -> dict:
    """The device's name and capability, as the self-check cache keys them."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return {"device": torch.cuda.get_device_name(device), "capability": f"sm_{major}{minor}"}
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"device": name, "capability": torch.backends.cpu.get_cpu_capability()}


@functools.cache
def _source_digest() -> str:
    """A digest of the backends' code (engine/ops, the Triton kernels, the compiled extension's size and
    time), so that an edited kernel or a rebuilt extension is checked again even at one version number."""
    root = Path(engine.__file__).parent
    digest = hashlib.sha1()
    for path in sorted([*root.glob("ops/**/*.py"), *root.glob("kernels/*.py")]):
        digest.update(path.name.encode() + path.read_bytes())
    for path in sorted(root.glob("_C*")):
        stat = path.stat()
        digest.update(f"{path.name} {stat.st_size} {stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:12]


def versions() -> dict:
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = "none"
    return {"torch": torch.__version__, "triton": triton_version, "engine": f"{engine.__version__}+{_source_digest()}"}


def _format_table(results: list[OpResult]) -> str:
    header = ("op", "backend", "result", "error/bound", "vs torch", "note")
    rows = [header]
    for r in results:
        rows.append((r.op, r.backend, r.status, "" if r.ratio is None else f"{r.ratio:.2f}",
                     "" if r.speed is None else f"{r.speed:.2f}x", r.note[:110]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1]
                     for row in rows).rstrip()


def report(results: list[OpResult], device: torch.device, dtype: torch.dtype) -> dict:
    return {"device": str(device), **device_identity(device), "dtype": DTYPE_NAMES[dtype], **versions(),
            "ok": all(r.status != "FAIL" for r in results), "results": [asdict(r) for r in results]}


def default_backends(device: torch.device) -> list[str]:
    """Every backend available here that runs on the device's tensors."""
    return [name for name, (ok, _) in ops.available_backends().items()
            if ok and any(registry.why_not(name, Call(op, device.type, None)) is None for op in OP_NAMES)]


def check_device(device: torch.device, dtype: torch.dtype, backends: list[str], speed: bool = True) -> list[OpResult]:
    cases = device_check_cases()
    results = [check_op(op, backend, device, dtype, cases) for op in OP_NAMES for backend in backends]
    if speed:
        add_speed(results, device, dtype)
    return results


# ------------------------------------------------------------------- auto's self-check

def cache_path() -> Path:
    return cache_dir() / CACHE_NAME


def clear_cache() -> bool:
    """Forget every cached self-check verdict; True if there were any."""
    try:
        cache_path().unlink()
        return True
    except FileNotFoundError:
        return False


def _load_cache() -> dict:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _save_cache(entries: dict) -> None:
    """Atomically (a temporary file renamed over the old one: concurrent ranks never see half a file).
    A cache that cannot be written only costs a check at the next start."""
    path = cache_path()
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text(json.dumps(entries, indent=1, sort_keys=True) + "\n")
        os.replace(temporary, path)
    except OSError:
        temporary.unlink(missing_ok=True)


def _cache_key(op: str, backend: str, device: torch.device, dtype: torch.dtype, cases: list[Case]) -> str:
    return json.dumps({**device_identity(device), **versions(), "backend": backend, "op": op,
                       "dtype": DTYPE_NAMES[dtype], "cases": [c.label for c in cases if c.op == op]},
                      sort_keys=True)


def verify(op: str, backend: str, device: torch.device, dtype: torch.dtype, cases: list[Case],
           cache: dict) -> tuple[str | None, bool]:
    """(None if `backend` passes the check of `op`, else the first failure; whether the verdict was cached)."""
    key = _cache_key(op, backend, device, dtype, cases)
    if key in cache:
        return cache[key]["error"], True
    result = check_op(op, backend, device, dtype, cases)
    error = None if result.status != "FAIL" else result.note
    cache[key] = {"error": error, "checked": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return error, False


def _warn(message: str) -> None:
    print(message, file=sys.stderr)


def prepare_backends(config, device: torch.device, dtype: torch.dtype, *, self_check: bool = True,
                     training: bool = True, decode: bool = True, warn: Callable[[str], None] = _warn) -> str:
    """Resolve the backend of every op the model (config: a GPTConfig) calls, check it on this device
    unless self_check is False, and return the start-up line's description of what was checked and chosen.

    Under `auto` a backend that fails is passed over (one warning line through `warn`) and the next
    candidate checked; an explicit backend (ops.set_backend) that lacks a capability the model needs
    or fails its check raises BackendError, before any training step. `reference` is never checked:
    it is what the others are checked against.
    """
    chosen = ops.check_model_support(config, device.type, dtype, training=training, decode=decode)
    if not self_check:
        return f"{ops.describe_choices(chosen)} (self-check skipped)"
    explicit = ops.get_backend() != "auto"
    cases = model_cases(config)
    cache = _load_cache()
    started = time.perf_counter()
    checked, passed, from_cache = set(), [], 0
    while pending := [(call.op, name) for call, name in chosen.items()
                      if name != "reference" and (call.op, name) not in checked]:
        op, name = pending[0]
        error, cached = verify(op, name, device, dtype, cases, cache)
        checked.add((op, name))
        from_cache += cached
        if error is None:
            passed.append(name)
            continue
        registry.record_self_check_failure(op, device.type, name, error)
        if explicit:
            _save_cache(cache)
            raise ops.BackendError(f"backend {name!r} failed its self-check of {op!r} on this {device.type} device "
                                   f"({error}); see python -m engine.check, or choose another --backend")
        warn(f"warning: self-check: {op} on {name} failed ({error}); using the next candidate")
        chosen = ops.check_model_support(config, device.type, dtype, training=training, decode=decode)
    _save_cache(cache)
    seconds = time.perf_counter() - started
    counts = ", ".join(f"{name} x{passed.count(name)}" for name in dict.fromkeys(passed)) or "nothing"
    return (f"{ops.describe_choices(chosen)} (self-check in {DTYPE_NAMES[dtype]}: {counts} ok, "
            f"{from_cache} of {len(checked)} cached, {seconds:.1f} s)")


def failing_backends(op: str, backends: list[str], device: torch.device, dtype: torch.dtype,
                     config=None) -> dict[str, str]:
    """The backends among `backends` whose self-check of `op` fails here (name -> error), at the sizes
    of `config` (default: the `default` preset); cached like `auto`'s. For benchmarks, which must not
    time a wrong kernel."""
    from engine.model import preset

    cases = model_cases(config or preset("default"))
    cache = _load_cache()
    failures = {}
    for name in backends:
        if name in registry.BACKEND_LOCATIONS and name != "reference":
            error, _ = verify(op, name, device, dtype, cases, cache)
            if error is not None:
                failures[name] = error
    _save_cache(cache)
    return failures


# ------------------------------------------------------------------------------------ CLI

def build_parser() -> argparse.ArgumentParser:
    from engine.config import ArgumentParser

    parser = ArgumentParser(prog="python -m engine.check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="'auto' (CUDA if present), 'cpu', 'cuda' or 'cuda:N'")
    parser.add_argument("--dtype", default="auto",
                        help="comma-separated among fp32, bf16, fp16 (default: the dtype training uses on the device)")
    parser.add_argument("--backends", default=None,
                        help="comma-separated backends (default: every available one that runs on the device)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--no-speed", action="store_true", help="skip the speed ratios against torch")
    parser.add_argument("--clear-cache", action="store_true", help="forget auto's cached self-check verdicts and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    from engine.config import resolve_device, resolve_dtype
    from engine.errors import UsageError

    args = build_parser().parse_args(argv)
    if args.clear_cache:
        print(f"{'cleared' if clear_cache() else 'no cached verdicts in'} {cache_path()}")
        return 0
    device = resolve_device(args.device)
    names = [name.strip() for name in args.dtype.split(",")]
    unknown = [name for name in names if name != "auto" and name not in DTYPES]
    if unknown:
        raise UsageError(f"unknown dtype {unknown[0]!r}; choose among {', '.join(DTYPES)}")
    dtypes = [resolve_dtype(name, device) if name == "auto" else DTYPES[name] for name in names]
    if args.backends is None:
        backends = default_backends(device)
    else:
        backends = [name.strip() for name in args.backends.split(",") if name.strip()]
        for name in backends:
            registry.check_backend_name(name)
            if name == "auto":
                raise UsageError("--backends takes backend names; 'auto' is a choice among them, not one")
    identity = device_identity(device)
    reports = []
    for dtype in dtypes:
        print(f"engine.check on {device} ({identity['device']}, {identity['capability']}) in "
              f"{DTYPE_NAMES[dtype]} | " + " | ".join(f"{k} {v}" for k, v in versions().items()))
        results = check_device(device, dtype, backends, speed=not args.no_speed)
        print(_format_table(results))
        print()
        reports.append(report(results, device, dtype))
    ok = all(entry["ok"] for entry in reports)
    if args.json is not None:
        try:
            args.json.write_text(json.dumps(reports if len(reports) > 1 else reports[0], indent=2) + "\n")
        except OSError as exc:
            raise UsageError(f"cannot write {args.json}: {exc.strerror or exc}") from None
    print("every check passed" if ok else "FAILED: see the rows marked FAIL")
    return 0 if ok else 1


def entry_point(argv: list[str] | None = None) -> int:
    """main() with bad input turned into one line on stderr and exit status 2."""
    from engine.errors import run_cli

    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(entry_point())
