"""Compile every Triton kernel the engine launches for a real GPU target, on a machine without one.

Run as a script in a process WITHOUT TRITON_INTERPRET (tests/test_preflight.py starts it):

    python tests/preflight.py --capability 90 --sweep quick --out report.json

How: a stand-in Triton driver reports GPUTarget("cuda", capability, 32) and launches nothing, and
every JITFunction launch is turned into a compile-only one (`warmup=True`). The real launchers in
engine.kernels then run on CPU tensors of the model's shapes, so every compile sees exactly the
specialization a GPU launch gets: argument dtypes, 16-byte pointer alignment, integers equal to 1
or divisible by 16, the constexprs the launcher picks. The autotuner's benchmark function compiles
each candidate instead of timing it, and the tuner forgets its choice before every launch (its key
leaves out the constexpr flags), so every candidate is built for every variant; nothing executes.

For every compiled kernel the report holds its shared memory (Triton's metadata), and its
registers and spills (ptxas -v run on its PTX; the result is cached next to the kernel in Triton's
cache, so a warm run costs almost nothing). Workloads that fail to compile are reported with the
error's first line. A canary kernel that reads a module-level Python float (refused by a real
compile, accepted by the interpreter) must fail: it proves that this is a real compile.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field

# The checkout's engine, not an installed one (as for the tests, which run from the repository root).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from engine.kernels._interpreter import interpreting  # noqa: E402 (imports nothing, not even triton)

if interpreting():
    raise SystemExit("preflight: run without TRITON_INTERPRET=1 (the interpreter compiles nothing)")
os.environ.pop("TRITON_ALLOW_NON_CONSTEXPR_GLOBALS", None)  # what a GPU refuses, refuse here too

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.driver import DriverBase  # noqa: E402
from triton.backends.nvidia.compiler import sm_arch_from_capability  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.cache import get_cache_manager  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

# Shared memory a block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin), by compute capability.
SHARED_MEMORY_LIMIT = {90: 232448, 80: 166912}  # 227 KB on H100/H200, 163 KB on A100


class CompileOnlyDriver(DriverBase):
    """A Triton driver for a CUDA target that is not here: compiles for it, never launches."""

    def __init__(self, capability: int) -> None:
        super().__init__()
        self.target = GPUTarget("cuda", capability, 32)

    @classmethod
    def is_active(cls) -> bool:
        return False  # never picked by Triton's own driver discovery

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise NotImplementedError("the compile-only driver builds no launcher")

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")  # the launchers' tensors live on the CPU

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_benchmarker(self):
        return _compile_instead_of_timing


@dataclass
class Compiled:
    workload: str
    kernel: str
    config: dict  # the launch's tunables and constexprs (block sizes, flags)
    num_warps: int
    num_stages: int
    shared: int  # bytes of shared memory per block
    registers: int
    spill_stores: int
    spill_loads: int
    atomics: bool  # atomic instructions in the PTX (their order, and the result's last bits, vary per run)
    operand: str  # the first pointer argument's element type (fp32, bf16, ...)
    hash: str


@dataclass
class Report:
    capability: int
    sweep: str
    compiled: list[Compiled] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)  # {"workload", "error"}
    compile_failures: list[dict] = field(default_factory=list)  # {"workload", "kernel", "config", "error"}
    kernels: list[str] = field(default_factory=list)  # every kernel engine.kernels defines
    autotuners: list[dict] = field(default_factory=list)  # {"name", "kernel", "key", "cache_results", "restore_value"}
    canary_failed_to_compile: bool = False
    seconds: float = 0.0


_report: Report | None = None
_workload = ""
_seen: set[tuple[str, str]] = set()


def _ptxas_usage(kernel) -> dict:
    """{"registers", "spill_stores", "spill_loads"} from `ptxas -v` on the kernel's PTX, cached by its hash."""
    cache = get_cache_manager(kernel.hash)
    cached = cache.get_file("preflight-ptxas.json")
    if cached:
        with open(cached) as f:
            return json.load(f)
    capability = kernel.metadata.target.arch
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        command = [knobs.nvidia.ptxas.path, "-lineinfo", "-v", f"--gpu-name={sm_arch_from_capability(capability)}",
                   ptx, "-o", os.path.join(tmp, "kernel.o")]
        log = subprocess.run(command, capture_output=True, text=True, check=True).stderr
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    usage = {"registers": int(registers.group(1)), "spill_stores": int(spills.group(1)),
             "spill_loads": int(spills.group(2))}
    cache.put(json.dumps(usage), "preflight-ptxas.json", binary=False)
    return usage


def _launch_config(kwargs: dict) -> dict:
    """The launch's tunables and constexprs (block sizes, flags) from its keyword arguments."""
    return {name: value for name, value in kwargs.items()
            if name not in ("debug", "instrumentation_mode") and isinstance(value, (bool, int, str))}


def _compile_only_run(self, *args, grid, warmup, **kwargs):
    """JITFunction.run with every launch turned into a compile (warmup=True); records what it built
    and what failed to build."""
    try:
        kernel = _original_run(self, *args, grid=grid, warmup=True, **kwargs)
    except Exception as error:
        if _report is not None:
            _report.compile_failures.append({"workload": _workload, "kernel": self.fn.__name__,
                                             "config": _launch_config(kwargs), "error": _first_line(error)})
        raise
    key = (_workload, kernel.hash)
    if _report is not None and key not in _seen:
        _seen.add(key)
        config = {k: v for k, v in _launch_config(kwargs).items() if k not in ("num_warps", "num_stages")}
        _report.compiled.append(Compiled(
            _workload, self.fn.__name__, config, kernel.metadata.num_warps, kernel.metadata.num_stages,
            kernel.metadata.shared, atomics=bool(re.search(r"\b(atom|red)\.", kernel.asm["ptx"])),
            operand=next(t[1:] for t in kernel.src.signature.values() if isinstance(t, str) and t.startswith("*")),
            hash=kernel.hash, **_ptxas_usage(kernel)))
    return kernel


def _compile_instead_of_timing(kernel_call, quantiles, **kwargs):
    """The autotuner's benchmark: compile the candidate (the launch is compile-only) and report a
    constant time. A candidate that fails to compile is in the report (the autotuner would skip it)."""
    try:
        kernel_call()
    except Exception:  # noqa: BLE001 (recorded by _compile_only_run)
        return [float("inf")] * len(quantiles)
    return [1.0] * len(quantiles)


def _tune_every_launch(self, *args, **kwargs):
    """Autotuner.run that forgets earlier choices first: its key leaves out the constexpr flags (bias,
    activation, dropout), so otherwise only the first launch of a key would compile every candidate."""
    self.cache.clear()
    return _original_tuner_run(self, *args, **kwargs)


def _no_disk_cache(self, tuning_key, configs, bench_fn):
    """Never read or write autotune results on disk here: the constant timings are not timings."""
    bench_fn()
    return False


_original_run = JITFunction.run
_original_tuner_run = Autotuner.run


@contextlib.contextmanager
def compile_only(capability: int):
    previous = driver._active  # None unless a driver was already chosen
    driver.set_active(CompileOnlyDriver(capability))
    JITFunction.run = _compile_only_run
    check_disk_cache = Autotuner.check_disk_cache
    Autotuner.check_disk_cache = _no_disk_cache
    Autotuner.run = _tune_every_launch
    try:
        yield
    finally:
        Autotuner.run = _original_tuner_run
        Autotuner.check_disk_cache = check_disk_cache
        JITFunction.run = _original_run
        driver._active = previous


def _first_line(error: BaseException) -> str:
    while error.__cause__ is not None:  # a CompilationError inside a called @jit function: the inner one says why
        error = error.__cause__
    message = getattr(error, "error_message", None) or str(error)
    text = f"{type(error).__name__}: {message}".strip()
    lines = [line for line in text.splitlines() if line.strip()]
    # Triton's CompilationError puts the source first and the message last.
    return " | ".join(lines[:1] + lines[-1:]) if len(lines) > 1 else text


# ----------------------------------------------------------------------------- the canary

_CANARY_CONSTANT = 0.5


@triton.jit
def _canary_kernel(x_ptr):
    tl.store(x_ptr, tl.load(x_ptr) * _CANARY_CONSTANT)


def _canary_fails() -> bool:
    try:
        _canary_kernel[(1,)](torch.empty(16))
    except Exception:  # noqa: BLE001
        return True
    return False


# ----------------------------------------------------------------------------- workloads

def _empty(*shape, dtype):
    return torch.empty(shape, dtype=dtype)


def _model_qkv(B: int, T: int, H: int, D: int, dtype):
    """q, k, v (B, H, T, D) as the model makes them: views of one (B, T, 3C) projection."""
    C = H * D
    q, k, v = _empty(B, T, 3 * C, dtype=dtype).split(C, dim=2)
    return [t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v)]


def attention_workload(dtype, D: int, causal: bool, backward: bool = True, T: int = 1024):
    from engine.kernels import attention

    def run():
        H = max(1, 768 // D) if D <= 64 else 8
        q, k, v = _model_qkv(1, T, H, D, dtype)
        out, lse = attention.attention_forward(q, k, v, causal, D ** -0.5)
        if backward:
            attention.attention_backward(torch.empty_like(out), q, k, v, out, lse, causal, D ** -0.5)
        if not causal:  # a decode step: one query over a KV cache of T keys (capacity 2T)
            cache = _empty(2, 1, H, 2 * T, D, dtype=dtype)
            q1 = _model_qkv(1, 1, H, D, dtype)[0]
            attention.attention_forward(q1, cache[0, :, :, :T], cache[1, :, :, :T], False, D ** -0.5)
    return run


def ffn_workload(dtype, residual_dtype, activation: str, bias: bool, dropout: bool, evaluation: bool,
                 M: int = 1024, C: int = 768, F: int = 3072):
    from engine.kernels import ffn

    def run():
        x, residual = _empty(M, C, dtype=dtype), _empty(M, C, dtype=residual_dtype)
        w1, w2 = _empty(F, C, dtype=dtype), _empty(C, F, dtype=dtype)
        b1, b2 = (_empty(F, dtype=dtype), _empty(C, dtype=dtype)) if bias else (None, None)
        p = 0.1 if dropout else 0.0
        seed = torch.zeros(1, dtype=torch.int64)
        y, pre = ffn.ffn_forward(x, w1, b1, w2, b2, residual, activation, p, seed, store_pre=True)
        ffn.ffn_backward(torch.empty_like(y), x, w1, w2, pre, activation, p, seed, bias, bias)
        if evaluation:  # no gradient: the forward keeps no activation
            ffn.ffn_forward(x, w1, b1, w2, b2, residual, activation, p, seed, store_pre=False)
    return run


def layer_norm_workload(dtype, weight_dtype, bias: bool, N: int = 1024, C: int = 768):
    from engine.kernels import layer_norm

    def run():
        x, w = _empty(N, C, dtype=dtype), _empty(C, dtype=weight_dtype)
        b = _empty(C, dtype=weight_dtype) if bias else None
        y, mean, rstd = layer_norm.layer_norm_forward(x, w, b)
        layer_norm.layer_norm_backward(torch.empty_like(y), x, w, mean, rstd, bias)
    return run


def cross_entropy_workload(dtype, V: int, N: int = 32, d: int = 768):
    """Both cross-entropy ops at GPT-2's vocabulary. Few rows: the fused op's chunk matmuls run on the CPU."""
    from engine.kernels import cross_entropy

    def run():
        targets = torch.zeros(N, dtype=torch.int64)
        logits = _empty(N, V, dtype=dtype)
        loss, lse = cross_entropy.cross_entropy_forward(logits, targets)
        cross_entropy.cross_entropy_backward(torch.ones(()), logits, targets, lse)
        x, weight = torch.zeros(N, d, dtype=dtype), torch.zeros(V, d, dtype=dtype)
        cross_entropy.linear_cross_entropy_forward(x, weight, targets)
        cross_entropy.linear_cross_entropy_forward(x, weight, targets, grad_x=False, grad_weight=False)
    return run


_BF16, _FP16, _FP32 = torch.bfloat16, torch.float16, torch.float32
_NAMES = {_BF16: "bf16", _FP16: "fp16", _FP32: "fp32"}


def workloads(sweep: str) -> dict[str, callable]:
    """Name -> workload. "quick" (the default test): every kernel, every candidate list and every
    epilogue variant training takes, at GPT-2's shapes, as training runs them: bf16 autocast (16-bit
    matmuls and attention, fp32 residual stream and LayerNorm) and fp32; both activations, bias and
    dropout on and off; D = 64 and 128 causal, D = 64 non-causal with a decode step. "full" (`slow`)
    adds fp16, D = 16 and 32, every bias/dropout combination, evaluation (no saved activation),
    16-bit LayerNorm and a 16-bit residual stream, and the non-causal D = 128 and fp32 kernels."""
    full = sweep == "full"
    out = {}
    for dtype in [_BF16, _FP16, _FP32] if full else [_BF16, _FP32]:
        name = _NAMES[dtype]
        for D in (16, 32, 64, 128) if full else (64, 128):
            for causal in (True, False):
                if full or causal or (D == 64 and dtype != _FP32):
                    out[f"attention {name} D={D} {'causal' if causal else 'non-causal + decode'}"] = \
                        attention_workload(dtype, D, causal)
        for residual in [_FP32, dtype] if full and dtype != _FP32 else [_FP32]:
            for activation in ("gelu", "gelu_tanh"):
                combos = ((True, False), (False, False), (True, True), (False, True)) if full else \
                    ((True, False), (False, True))
                for bias, dropout in combos:
                    out[f"ffn {name} residual {_NAMES[residual]} {activation} bias={bias} dropout={dropout}"] = \
                        ffn_workload(dtype, residual, activation, bias, dropout, evaluation=full)
        for ln_dtype in [_FP32, dtype] if full and dtype != _FP32 else [_FP32]:
            for bias in (True, False):
                out[f"layer_norm {_NAMES[ln_dtype]} bias={bias}"] = layer_norm_workload(ln_dtype, _FP32, bias)
        out[f"cross_entropy {name} V=50304"] = cross_entropy_workload(dtype, 50304)
    return out


def _kernel_objects():
    """(name, object) of every module-level JITFunction and Autotuner in the files of kernels/."""
    import importlib
    import pkgutil

    import engine.kernels

    for module_info in pkgutil.iter_modules(engine.kernels.__path__):
        module = importlib.import_module(f"engine.kernels.{module_info.name}")
        for name, value in vars(module).items():
            if isinstance(value, (JITFunction, Autotuner)):
                yield f"{module_info.name}.{name}", value


def defined_kernels() -> list[str]:
    """The name of every launchable Triton kernel (a module-level function named *_kernel, autotuned or
    not) in every file of kernels/."""
    names = {(value.base_fn if isinstance(value, Autotuner) else value.fn).__name__ for _, value in _kernel_objects()}
    return sorted(name for name in names if name.endswith("_kernel"))


def autotuners() -> list[dict]:
    return [{"name": name, "kernel": value.base_fn.__name__, "key": list(value.keys),
             "cache_results": value.cache_results, "restore_value": list(value.restore_value)}
            for name, value in _kernel_objects() if isinstance(value, Autotuner)]


def run(capability: int, sweep: str, only: str | None = None) -> Report:
    global _report, _workload
    report = Report(capability, sweep, kernels=defined_kernels(), autotuners=autotuners())
    start = time.perf_counter()
    torch.set_num_threads(1)
    with compile_only(capability):
        report.canary_failed_to_compile = _canary_fails()
        _report = report
        for name, workload in workloads(sweep).items():
            if only and not re.search(only, name):
                continue
            _workload = name
            try:
                workload()
            except Exception as error:  # noqa: BLE001 (every failure is reported)
                report.failures.append({"workload": name, "error": _first_line(error)})
                if os.environ.get("PREFLIGHT_TRACEBACK"):
                    traceback.print_exc()
    report.seconds = time.perf_counter() - start
    _report = None
    return report


def summary(reports: list[dict]) -> str:
    """A Markdown table per target: every kernel and candidate kept, with the most registers, shared
    memory and spills over the flag combinations the sweep compiled."""
    lines = []
    for report in reports:
        title = f"sm_{report['capability']} ({report['sweep']} sweep, {len(report['compiled'])} kernels compiled)"
        lines += [f"### {title}",
                  "", "| kernel | candidate | warps | stages | registers | shared KB | spills (bytes) | variants |",
                  "|---|---|---|---|---|---|---|---|"]
        rows: dict[tuple, list] = {}
        for c in report["compiled"]:
            blocks = "x".join(str(v) for k, v in c["config"].items() if k.startswith("BLOCK"))
            key = (c["kernel"], blocks, c["operand"], c["num_warps"], c["num_stages"])
            row = rows.setdefault(key, [0, 0, 0, 0])
            row[0] = max(row[0], c["registers"])
            row[1] = max(row[1], c["shared"])
            row[2] = max(row[2], c["spill_stores"] + c["spill_loads"])
            row[3] += 1
        for (kernel, blocks, operand, warps, stages), (registers, shared, spills, count) in sorted(rows.items()):
            candidate = f"{blocks} {operand}".strip()
            lines.append(f"| {kernel} | {candidate} | {warps} | {stages} | {registers} | {shared / 1024:.1f} | "
                         f"{spills} | {count} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capability", type=int, choices=sorted(SHARED_MEMORY_LIMIT))
    parser.add_argument("--sweep", choices=("quick", "full"), default="quick")
    parser.add_argument("--only", help="run only the workloads whose name matches this regular expression")
    parser.add_argument("--out", help="where to write the JSON report")
    parser.add_argument("--summarize", nargs="+", metavar="REPORT", help="print a Markdown table of JSON reports")
    args = parser.parse_args(argv)
    if args.summarize:
        print(summary([json.load(open(path)) for path in args.summarize]))
        return 0
    if args.capability is None or args.out is None:
        parser.error("--capability and --out are required (or --summarize)")
    report = run(args.capability, args.sweep, args.only)
    with open(args.out, "w") as f:
        json.dump(asdict(report), f, indent=1)
    print(f"sm_{args.capability}: {len(report.compiled)} kernels compiled, {len(report.failures)} workloads failed, "
          f"{report.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
