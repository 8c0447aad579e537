"""The benchmark harness: times an op's forward, backward and forward+backward on every backend.

Each op module (bench/attention.py, ...) describes its op with an `OpBench`: how to build inputs
for a shape, and the FLOP and byte counts of each pass (the formulas live there, beside the
inputs they count). This module runs any such description on any backend that engine.ops
reports available, through the public functional API (`engine.ops.<op>(..., backend=name)`), so
a new backend is benchmarked as soon as the registry knows it. One extra competitor, `compile`,
is torch.compile of the op's `reference` implementation (plain PyTorch, fused by Inductor).

Method
- GPU: warm-up until at least 2 calls and 25 ms have run (the first call pays for compilation and
  autotuning). Then batches of k back-to-back calls, one CUDA event pair around each batch, k
  chosen so that a batch holds about 1 ms of work (at most 100 calls): one event pair per call
  would time the 30-60 us of Python and dispatch of a 10 us kernel, not the kernel. Before each
  batch a short `torch.cuda._sleep` keeps the device busy while the host issues the batch's k
  calls, so the events time the queued kernels back to back, not the host. Enough batches for
  about 100 ms of work (at least 10, at most 200) unless `--repeats` fixes the count; the median
  per call is reported. The host time to issue one call while the device is busy is reported
  apart as `launch_us` (launch overhead: Python, dispatcher, launches): an op whose launch_us
  exceeds its device time is bound by the host when called eagerly.
  Inputs rotate over several copies that together exceed twice the L2 cache, so no call finds
  its inputs left in cache by the previous one.
- CPU: one warm-up call, then the median of `repeats` batches (default 5) of k calls (default 1,
  `--calls-per-batch`) timed with perf_counter. Inputs are not rotated.
- Compilations after warm-up: Triton binaries loaded, new autotuning keys and torch.compile
  graphs during the timed calls are counted (bench.autotune) and recorded per row as
  `after_warmup`; all must be zero, or the timing includes compile work.
- `fwd` runs with autograd on, as in training (the op saves what its backward needs).
  `bwd` replays each input copy's saved graph (retain_graph) with one fixed random output
  gradient; `fwd+bwd` runs both. Gradients are reset to None outside the timed region.
- Peak memory (GPU only): torch.cuda.max_memory_allocated during one call, minus what was
  allocated just before it (the inputs; for `bwd` also the saved graph): the pass's working
  memory. On the CPU it is left empty (None): no per-call high-water mark exists there.
- Throughput: TFLOP/s = the op's FLOP count for the pass / median time; GB/s = the minimum bytes
  the pass must move (read inputs once, write outputs once) / median time, given for the
  memory-bound ops. `speedup` = baseline ms / this backend's ms, measured in the same run.

With `--nvtx`, every timed call sits in an NVTX range named `<op>.<backend>.<pass>`
(e.g. `attention.triton.fwd`) for Nsight Compute's `--nvtx-include "attention.triton.fwd/"`.
"""
from __future__ import annotations

import argparse
import functools
import importlib.metadata
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from engine import config, ops
from engine.check import failing_backends
from engine.errors import UsageError
from engine.ops import reference
from engine.ops.backend import DTYPE_NAMES, DTYPES
from engine.profiling import enable_nvtx, nvtx_range

PASSES = ("fwd", "bwd", "fwd+bwd")
COMPILE = "compile"  # the torch.compile(reference) competitor
REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"

MAX_INPUT_SETS = 8          # copies of the inputs rotated on a GPU
WARMUP_MS = 25.0            # GPU warm-up: at least this long ...
MIN_WARMUP_CALLS = 2        # ... and at least this many calls
TARGET_MS = 100.0           # GPU: batches chosen to fill about this much time ...
MIN_BATCHES, MAX_BATCHES = 10, 200
BATCH_MS = 1.0              # ... each batch of k back-to-back calls about this long
MAX_CALLS_PER_BATCH = 100
MAX_QUEUE_AHEAD_MS = 50.0   # the longest sleep queued before a batch
CPU_REPEATS = 5


@dataclass
class Inputs:
    """Positional and keyword arguments of one op call; tensors needing gradients are the leaves."""

    args: tuple
    kwargs: dict = field(default_factory=dict)

    def tensors(self) -> list[torch.Tensor]:
        return [a for a in self.args if isinstance(a, torch.Tensor)]

    def leaves(self) -> list[torch.Tensor]:
        return [t for t in self.tensors() if t.requires_grad]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def clear_grads(self) -> None:
        for t in self.leaves():
            t.grad = None


@dataclass(frozen=True)
class OpBench:
    """How to benchmark one engine.ops function.

    name:        the engine.ops function (and the reference implementation compiled for `compile`).
    make_inputs: (shape, dtype, device) -> Inputs; shape is a dict such as {"B": 4, "T": 1024, ...}.
    flop:        shape -> {pass: floating-point operations}, or None where FLOPs are not the limit.
    bytes:       (shape, dtype) -> {pass: minimum bytes moved}, or None where bandwidth is not the limit.
    x_axis:      the shape key the plot puts on its x axis.
    series_keys: shape keys that tell the plot's lines apart besides the backend (e.g. ("D",)).
    metric:      what the plot shows: "tflops" or "gbps".
    extra:       further competitors by name, each a factory of the callable to time (same arguments as
                 the engine.ops function); timed only when named in --backends (e.g. an SDPA backend).
                 A spec whose name is no engine.ops function (e.g. a plain copy) times its extras only.
    passes:      the passes the op has (a copy has no backward).
    """

    name: str
    make_inputs: Callable[[dict, torch.dtype, torch.device], Inputs]
    flop: Callable[[dict], dict[str, float]] | None = None
    bytes: Callable[[dict, torch.dtype], dict[str, float]] | None = None
    x_axis: str = "T"
    series_keys: tuple[str, ...] = ()
    metric: str = "tflops"
    extra: dict[str, Callable[[], Callable]] = field(default_factory=dict)
    passes: tuple[str, ...] = PASSES

    def implementation(self, backend: str) -> Callable:
        """The callable timed for `backend`: engine.ops.<name>(..., backend=...) or compiled reference."""
        if backend in self.extra:
            return self.extra[backend]()
        if backend == COMPILE:
            torch._dynamo.reset()  # a fresh compile per shape: never the silent eager fallback after recompiles
            return torch.compile(getattr(reference, self.name), dynamic=False)
        return functools.partial(getattr(ops, self.name), backend=backend)


# ----------------------------------------------------------------------------- environment

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model} ({torch.get_num_threads()} threads)"


def git_commit() -> str:
    """The checkout's commit (with +dirty for uncommitted changes), BENCH_COMMIT if set, else 'unknown'."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict:
    """What every row records about where it was measured."""
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "commit": git_commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def default_out_dir(device: torch.device) -> Path:
    """GPU: bench/results/<date>-<device>/ (results worth committing); CPU: bench/results/tmp-cpu/ (ignored)."""
    if device.type == "cuda":
        return RESULTS_DIR / f"{time.strftime('%Y%m%d')}-{slug(torch.cuda.get_device_name(device))}"
    return RESULTS_DIR / "tmp-cpu"


# ----------------------------------------------------------------------------- timing

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class HostClock:
    """Clock marks from perf_counter: right for work that is done when the call returns (CPU)."""

    def mark(self) -> float:
        return time.perf_counter()

    def finish(self) -> None:
        pass

    def elapsed_ms(self, start: float, end: float) -> float:
        return (end - start) * 1e3


class DeviceClock:
    """Clock marks as CUDA events on the current stream: time on the device, read after finish()."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def finish(self) -> None:
        synchronize(self.device)

    def elapsed_ms(self, start: torch.cuda.Event, end: torch.cuda.Event) -> float:
        return start.elapsed_time(end)


@dataclass
class Timing:
    """What time_calls measured: median per call, and how."""

    ms: float                     # median per call: device time (GPU) or wall time (CPU)
    repeats: int                  # batches timed
    calls_per_batch: int          # k calls between one pair of clock marks
    launch_us: float | None       # GPU: host time to issue one call while the device is busy
    after_warmup: dict[str, int]  # compiles / autotuning keys / compiled graphs during the timed batches


def time_batches(work: Callable[[int], None], prepare: Callable[[int], None], n_sets: int, calls_per_batch: int,
                 batches: int, clock, before_batch: Callable[[float], None] | None = None
                 ) -> tuple[list[float], list[float]]:
    """Time `batches` batches of `calls_per_batch` back-to-back calls work(i), i rotating over n_sets.

    Returns (per-call milliseconds of each batch by `clock`, per-call host seconds spent issuing each
    batch). before_batch(previous batch's host seconds), if given, runs before each batch's first
    mark (on a GPU it queues the sleep that hides the host's issue time)."""
    marks, issue_seconds = [], []
    call, previous_issue = 0, None
    for _ in range(batches):
        if before_batch is not None:
            before_batch(previous_issue)
        start = clock.mark()
        issue_started = time.perf_counter()
        for _ in range(calls_per_batch):
            i = call % n_sets
            prepare(i)
            work(i)
            call += 1
        previous_issue = time.perf_counter() - issue_started
        marks.append((start, clock.mark()))
        issue_seconds.append(previous_issue / calls_per_batch)
    clock.finish()
    return [clock.elapsed_ms(start, end) / calls_per_batch for start, end in marks], issue_seconds


@functools.cache
def _sleep_cycles_per_ms(device: torch.device) -> float:
    """GPU clock cycles of torch.cuda._sleep per millisecond, measured once."""
    cycles = 2_000_000
    torch.cuda._sleep(cycles // 10)  # wake the clocks
    clock = DeviceClock(device)
    start = clock.mark()
    torch.cuda._sleep(cycles)
    end = clock.mark()
    clock.finish()
    return cycles / max(clock.elapsed_ms(start, end), 1e-3)


def _queue_ahead(device: torch.device, first_guess_s: float) -> Callable[[float | None], None]:
    """before_batch for a GPU: sleep on the stream for 1.5x the host's last issue time (plus 20 us)."""
    cycles_per_ms = _sleep_cycles_per_ms(device)

    def before_batch(previous_issue_s: float | None) -> None:
        seconds = previous_issue_s if previous_issue_s is not None else first_guess_s
        milliseconds = min(1.5 * seconds * 1e3 + 0.02, MAX_QUEUE_AHEAD_MS)
        torch.cuda._sleep(int(milliseconds * cycles_per_ms))

    return before_batch


def time_calls(work: Callable[[int], None], prepare: Callable[[int], None], n_sets: int, device: torch.device,
               repeats: int | None = None, calls_per_batch: int | None = None) -> Timing:
    """Warm up, then time batches of k back-to-back calls work(i), i rotating over n_sets (see Method)."""
    from bench import autotune

    autotune.install_counters()
    if device.type != "cuda":
        prepare(0)
        work(0)  # warm-up
        before = autotune.counts()
        k = calls_per_batch or 1
        per_call, _ = time_batches(work, prepare, n_sets, k, repeats or CPU_REPEATS, HostClock())
        return Timing(statistics.median(per_call), len(per_call), k, None,
                      autotune.difference(autotune.counts(), before))

    calls, last_ms = 0, 0.0
    synchronize(device)
    warmup_started = time.perf_counter()
    while calls < MIN_WARMUP_CALLS or (time.perf_counter() - warmup_started) * 1e3 < WARMUP_MS:
        i = calls % n_sets
        prepare(i)
        started = time.perf_counter()
        work(i)
        synchronize(device)
        last_ms = (time.perf_counter() - started) * 1e3  # the latest call estimates one call's cost
        calls += 1
    before = autotune.counts()
    estimate = max(last_ms, 1e-3)
    k = calls_per_batch or min(MAX_CALLS_PER_BATCH, max(1, math.ceil(BATCH_MS / estimate)))
    batches = repeats or min(MAX_BATCHES, max(MIN_BATCHES, math.ceil(TARGET_MS / (k * estimate))))
    per_call, issue_seconds = time_batches(work, prepare, n_sets, k, batches, DeviceClock(device),
                                           _queue_ahead(device, k * estimate * 1e-3))
    return Timing(statistics.median(per_call), batches, k, statistics.median(issue_seconds) * 1e6,
                  autotune.difference(autotune.counts(), before))


def peak_memory_mb(work: Callable[[int], None], prepare: Callable[[int], None], device: torch.device) -> float | None:
    """Working memory of one call in MiB (GPU); None on the CPU."""
    if device.type != "cuda":
        return None
    prepare(0)
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    work(0)
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def rotation_count(inputs: Inputs, device: torch.device) -> int:
    """How many input copies to rotate so that together they exceed twice the L2 cache (GPU only)."""
    if device.type != "cuda":
        return 1
    l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
    return max(1, min(MAX_INPUT_SETS, math.ceil(2 * l2_bytes / max(inputs.nbytes(), 1))))


def _output_gradient(output: torch.Tensor) -> torch.Tensor:
    if not output.requires_grad:
        raise RuntimeError("the output does not require grad: this implementation has no backward")
    return torch.ones_like(output) if output.dim() == 0 else torch.randn_like(output)


def measure_pass(implementation: Callable, input_sets: list[Inputs], pass_name: str, device: torch.device,
                 repeats: int | None, range_name: str,
                 calls_per_batch: int | None = None) -> tuple[Timing, float | None]:
    """(timing, peak MiB) of one pass of `implementation` over the rotated input sets."""

    def call(i: int) -> torch.Tensor:
        return implementation(*input_sets[i].args, **input_sets[i].kwargs)

    def clear(i: int) -> None:
        input_sets[i].clear_grads()

    if pass_name == "fwd":
        def work(i: int) -> None:
            with nvtx_range(range_name):
                call(i)
    elif pass_name == "bwd":
        outputs = [call(i) for i in range(len(input_sets))]
        gradient = _output_gradient(outputs[0])

        def work(i: int) -> None:
            with nvtx_range(range_name):
                outputs[i].backward(gradient, retain_graph=True)
    elif pass_name == "fwd+bwd":
        gradient = _output_gradient(call(0))

        def work(i: int) -> None:
            with nvtx_range(range_name):
                call(i).backward(gradient)
    else:
        raise ValueError(f"unknown pass {pass_name!r}; expected one of {PASSES}")
    timing = time_calls(work, clear, len(input_sets), device, repeats, calls_per_batch)
    return timing, peak_memory_mb(work, clear, device)


# ----------------------------------------------------------------------------- running

def shape_label(shape: dict) -> str:
    parts = []
    for key, value in shape.items():
        if isinstance(value, bool):
            parts.append(key if value else f"non-{key}")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def select_backends(op: str, device_type: str, requested: list[str] | None,
                    with_compile: bool, extra: tuple[str, ...] = ()) -> tuple[list[str], dict[str, str]]:
    """(backends to run, {skipped backend: why}). None requested: every available one implementing op.

    `extra` names the spec's further competitors, accepted when requested."""
    names = list(dict.fromkeys(requested)) if requested is not None else list(ops.available_backends())
    chosen, skipped = [], {}
    for name in names:
        if name == COMPILE or name in extra:
            chosen.append(name)
            continue
        try:
            ops.resolve_name(op, device_type, name)
        except ValueError as exc:  # BackendError: unknown, unavailable, wrong device or op missing
            skipped[name] = str(exc)
            continue
        chosen.append(name)
    if requested is None and with_compile:
        chosen.append(COMPILE)
    return chosen, skipped


def error_status(exc: BaseException) -> str:
    if isinstance(exc, torch.cuda.OutOfMemoryError) or isinstance(exc, MemoryError):
        return "oom"
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return f"error: {type(exc).__name__}: {first_line[:200]}"


def run(spec: OpBench, shapes: list[dict], *, dtype: torch.dtype, device: torch.device, backends: list[str],
        passes: tuple[str, ...] = PASSES, baseline: str = "torch", repeats: int | None = None,
        sink: Callable[[dict], None] | None = None, env: dict | None = None,
        calls_per_batch: int | None = None) -> list[dict]:
    """Measure every (shape, backend, pass); returns the rows (and hands each to `sink` as it is made)."""
    env = env or environment(device)
    ordered = sorted(backends, key=lambda name: name != baseline)  # the baseline first: ratios need it
    rows = []
    for shape in shapes:
        torch.manual_seed(0)
        first = spec.make_inputs(shape, dtype, device)
        copies = rotation_count(first, device)
        input_sets = [first] + [spec.make_inputs(shape, dtype, device) for _ in range(copies - 1)]
        flop = spec.flop(shape) if spec.flop else {}
        nbytes = spec.bytes(shape, dtype) if spec.bytes else {}
        baseline_ms: dict[str, float] = {}
        for backend in ordered:
            implementation = spec.implementation(backend)
            for pass_name in (name for name in passes if name in spec.passes):
                row = {
                    "op": spec.name, "backend": backend, "label": shape_label(shape), "shape": shape,
                    "dtype": DTYPE_NAMES.get(dtype, str(dtype)), "pass": pass_name, "status": "ok",
                    "ms": None, "tflops": None, "gbps": None, "peak_mem_mb": None,
                    "speedup": None, "baseline": baseline,
                    "flop": flop.get(pass_name), "bytes": nbytes.get(pass_name), "repeats": None,
                    "calls_per_batch": None, "launch_us": None, "after_warmup": None,
                    "input_sets": len(input_sets), "x_axis": spec.x_axis,
                    "series": shape_label({k: shape[k] for k in spec.series_keys if k in shape}),
                    "metric": spec.metric, **env,
                }
                try:
                    timing, peak = measure_pass(implementation, input_sets, pass_name, device, repeats,
                                                f"{spec.name}.{backend}.{pass_name}", calls_per_batch)
                    ms = timing.ms
                except Exception as exc:  # noqa: BLE001 - one failing backend must not end the sweep; the row says why
                    row["status"] = error_status(exc)
                    print(f"  {backend} {pass_name} {row['label']}: {row['status']}", file=sys.stderr)
                else:
                    row.update(ms=ms, repeats=timing.repeats, calls_per_batch=timing.calls_per_batch,
                               launch_us=timing.launch_us, after_warmup=timing.after_warmup, peak_mem_mb=peak)
                    if row["flop"]:
                        row["tflops"] = row["flop"] / (ms * 1e-3) / 1e12
                    if row["bytes"]:
                        row["gbps"] = row["bytes"] / (ms * 1e-3) / 1e9
                    if backend == baseline:
                        baseline_ms[pass_name] = ms
                    if pass_name in baseline_ms:
                        row["speedup"] = baseline_ms[pass_name] / ms
                finally:
                    for inputs in input_sets:
                        inputs.clear_grads()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                if sink is not None:
                    sink(row)
                rows.append(row)
    return rows


# ----------------------------------------------------------------------------- command line

def parse_list(text: str, kind=str) -> list:
    """'a,b c' -> [kind(a), kind(b), kind(c)]."""
    return [kind(item) for item in re.split(r"[,\s]+", text.strip()) if item]


def resolve_device(name: str) -> torch.device:
    """--device as engine.config resolves it for every command; a bad one ends the benchmark with one line."""
    try:
        return config.resolve_device(name)
    except UsageError as exc:
        raise SystemExit(f"error: {exc}") from None


def set_threads(threads: int | None) -> None:
    if threads is None:
        return
    if threads < 1:
        raise SystemExit("error: --threads must be at least 1")
    torch.set_num_threads(threads)


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The flags every op benchmark shares; op modules add their shape flags."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--backends", type=lambda s: parse_list(s), default=None,
                        help="comma-separated backends (and 'compile': torch.compile of the reference op); "
                             "default: every available backend that implements the op")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="add the 'compile' competitor to the default backends (default: on a GPU for the ops "
                             "whose module says so)")
    parser.add_argument("--baseline", default="torch", help="backend the speedup column divides by (default: torch)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on a GPU, fp32 on a CPU")
    parser.add_argument("--passes", type=lambda s: tuple(parse_list(s)), default=PASSES,
                        help="comma-separated subset of fwd,bwd,fwd+bwd (default: all)")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"timed batches per measurement (default: about {TARGET_MS:.0f} ms of calls on a GPU, "
                             f"{CPU_REPEATS} on a CPU)")
    parser.add_argument("--calls-per-batch", type=int, default=None,
                        help=f"back-to-back calls per timed batch (default: about {BATCH_MS:g} ms of calls on a GPU, "
                             f"at most {MAX_CALLS_PER_BATCH}; 1 on a CPU)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for PyTorch (default: PyTorch's choice); 1 steadies timings on a "
                             "busy machine")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default: bench/results/<date>-<device>/ on a GPU, "
                             "bench/results/tmp-cpu/ on a CPU)")
    parser.add_argument("--nvtx", action="store_true", help="NVTX range <op>.<backend>.<pass> around each timed call")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    return parser


def run_cli(specs: list[OpBench], shapes_for: Callable[[OpBench, torch.device], list[dict]],
            args: argparse.Namespace, *, compile_by_default: bool) -> int:
    """Run each spec over its shapes with the common flags, write rows, print tables; exit status."""
    from bench import report

    for name in args.passes:
        if name not in PASSES:
            raise SystemExit(f"error: unknown pass {name!r}; choose from {', '.join(PASSES)}")
    device = resolve_device(args.device)
    set_threads(args.threads)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.repeats is not None and args.repeats < 1:
        raise SystemExit("error: --repeats must be at least 1")
    if args.calls_per_batch is not None and args.calls_per_batch < 1:
        raise SystemExit("error: --calls-per-batch must be at least 1")
    if args.nvtx:
        enable_nvtx(True)
    out_dir = args.out or default_out_dir(device)
    env = environment(device)
    print(f"device {env['device']} | torch {env['torch']} | triton {env['triton']} | commit {env['commit']} | "
          f"{DTYPE_NAMES[dtype]} | results in {out_dir}")
    if device.type == "cpu":
        print("note: CPU timings on a shared machine are noisy; peak memory is not measured on the CPU")
    any_ok = False
    for spec in specs:
        with_compile = args.compile if args.compile is not None else compile_by_default and device.type == "cuda"
        if hasattr(ops, spec.name):
            backends, skipped = select_backends(spec.name, device.type, args.backends, with_compile, tuple(spec.extra))
            # A kernel that computes wrongly on this device is not timed (engine.check's self-check, cached).
            failing = failing_backends(spec.name, backends, device, dtype)
            skipped |= {name: f"failed its self-check ({error})" for name, error in failing.items()}
            backends = [name for name in backends if name not in failing]
        else:
            backends, skipped = list(spec.extra), {}
        for name, reason in skipped.items():
            print(f"{spec.name}: skipping backend {name}: {reason}")
        if args.baseline not in backends:
            print(f"{spec.name}: baseline {args.baseline!r} is not among {backends}: no speedup column")
        writer = report.RowWriter(out_dir / f"{spec.name}.jsonl")
        rows = run(spec, shapes_for(spec, device), dtype=dtype, device=device, backends=backends,
                   passes=args.passes, baseline=args.baseline, repeats=args.repeats, sink=writer, env=env,
                   calls_per_batch=args.calls_per_batch)
        any_ok = any_ok or any(row["status"] == "ok" for row in rows)
        print()
        print(f"## {spec.name} ({env['device']}, {DTYPE_NAMES[dtype]})")
        print(report.markdown_table(rows))
        print()
        written = report.render_op(out_dir, spec.name, plot=not args.no_plot)
        print("wrote " + ", ".join(str(path) for path in written))
    return 0 if any_ok else 1
