"""python -m bench.train: training throughput per backend: tokens/s, MFU, step time, peak memory.

For each (preset, backend) this builds engine.trainer.Trainer on random tokens (no corpus needed)
and times its real `train_step` (batch sampling, forward, loss, backward, gradient clipping,
AdamW): `warmup` untimed steps (compilation, autotuning, allocator growth), then `steps` timed
ones between two synchronizations, with no synchronization in between, as in training.

Backends: every available backend that runs on the device, `auto` (per op the fastest available
backend, reference for ops none implements), and `compile` = the torch backend with the model's
loss wrapped in torch.compile (the trainer's --compile). A backend that lacks an op the model
needs fails with the registry's error, and the row says so. The baseline (default torch) runs first.

MFU, the convention of PaLM (Chowdhery et al. 2022, appendix B), as nanoGPT's estimate_mfu:
    FLOP per token = 6 * N + 12 * L * T * d
    N: parameters without the position embedding (a lookup, not a matmul); the tied token
       embedding counts once, as the LM head. 6 = 2 (forward) + 4 (backward) per weight.
    12 * L * T * d: attention's Q K^T and P V, forward and backward, over the full T x T
       (not halved for the causal mask, as the convention has it).
    MFU = achieved FLOP/s / the GPU's dense bf16/fp16 tensor-core peak (PEAK_TFLOPS, by name);
    none for fp32 or an unknown device. "MFU vs matmul" divides by the FLOP/s of a large matmul
    measured here in the same dtype (the attainable peak); it is given on CPUs too.
Peak memory: torch.cuda.max_memory_allocated over the timed steps (weights, gradients, AdamW
state, activations); not measured on a CPU.

`--baseline plain` compares instead the engine with a plain PyTorch GPT (bench/plain_gpt.py) on the
built-in Shakespeare corpus in the preset's tokenizer (characters; BPE for `default`), same config,
recipe, initial weights and batches: each run is its own process (`--pairs`
pairs, engine and plain alternating, the order flipping every pair, so that a load change on a shared
machine hits both sides alike). The engine side is `engine.trainer.Trainer.run()` (the loop of
`python -m engine.train`, metrics and checkpoint included) evaluating once, at the end; the plain side
is a minimal loop and the same evaluation. Per pair: tokens per second and per CPU-second of the
training loop, the whole process's wall time and CPU time (Python start, imports, data, model, steps,
evaluation) and the validation loss after --steps steps; the ratios per pair (> 1: the engine is
faster), and their median and range. On a loaded machine CPU time is the steadier measure, and
`--threads 1` avoids the OpenMP thread waiting for a core that a second thread there costs.
"""
from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench import harness, report
from engine import ops
from engine.data import IdTokenizer, TokenData, load_token_data
from engine.model import PRESETS, GPT, preset
from engine.ops.backend import OP_NAMES
from engine.trainer import TrainConfig, Trainer

# Dense (no sparsity) bf16/fp16 tensor-core peaks in TFLOP/s from NVIDIA's data sheets; the
# first name contained in torch.cuda.get_device_name() wins, so specific names come first.
PEAK_TFLOPS = (
    ("H200 NVL", 835.5),
    ("H200", 989.5),
    ("H100 NVL", 835.5),
    ("H100 PCIe", 756.5),
    ("H100", 989.5),
    ("A100", 312.0),
)
GPU_PRESETS, CPU_PRESETS = ("toy", "default", "gpt2"), ("toy", "default")
# Batch sizes per preset: 8192 tokens per step on a GPU; a few hundred on a CPU.
GPU_BATCH = {"toy": 64, "default": 32, "gpt2": 8}
CPU_BATCH = {"toy": 8, "default": 1, "gpt2": 1}
GPU_STEPS, GPU_WARMUP = 10, 3
CPU_STEPS, CPU_WARMUP = 2, 1
AUTO, COMPILE = "auto", harness.COMPILE
PLAIN = "plain"  # --baseline plain: the engine against bench/plain_gpt.py
# --baseline plain: the presets compared and the batch size of each on a CPU (nanogpt-cpu and toy train
# with these; default's own 64 x 256 would take minutes a step on a small CPU), and the steps of a run.
PLAIN_PRESETS = ("nanogpt-cpu", "toy", "default")
PLAIN_CPU_BATCH = {"toy": 32, "nanogpt-cpu": 12, "default": 2, "gpt2": 1}
PLAIN_STEPS, PLAIN_PAIRS = 200, 2


def peak_tflops(device: torch.device, dtype: torch.dtype) -> float | None:
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul in `dtype` on `device` (median of several), in TFLOP/s."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    times = []
    for i in range(13 if device.type == "cuda" else 4):
        harness.synchronize(device)
        started = time.perf_counter()
        torch.mm(a, b)
        harness.synchronize(device)
        if i >= (3 if device.type == "cuda" else 1):  # warm-up calls are not counted
            times.append(time.perf_counter() - started)
    return 2 * n**3 / statistics.median(times) / 1e12


def flop_per_token(model: GPT, seq_len: int) -> float:
    config = model.config
    parameters = model.num_parameters()
    if config.pos_encoding == "learned":
        parameters -= model.position_embedding.weight.numel()
    return 6.0 * parameters + 12.0 * config.n_layers * seq_len * config.d_model


def random_token_data(vocab_size: int, seq_len: int, batch_size: int, seed: int = 0) -> TokenData:
    """Uniform random tokens, enough for distinct windows; the throughput does not depend on the text."""
    count = max(64 * (seq_len + 1), 4 * batch_size * (seq_len + 1))
    tokens = np.random.default_rng(seed).integers(0, vocab_size, size=count).astype(np.int32)
    split = count * 9 // 10
    return TokenData(train=tokens[:split], val=tokens[split:], tokenizer=IdTokenizer(vocab_size),
                     source="random tokens")


def train_backends(device: torch.device, requested: list[str] | None, with_compile: bool,
                   baseline: str) -> tuple[list[str], dict[str, str]]:
    """Backends that run on the device (any op resolves there), auto and compile; and skipped ones with why."""
    if requested is not None:
        names = list(dict.fromkeys(requested))
    else:
        names = [*ops.available_backends(), AUTO] + ([COMPILE] if with_compile else [])
    chosen, skipped = [], {}
    for name in names:
        if name in (AUTO, COMPILE):
            chosen.append(name)
            continue
        reasons = []
        for op in OP_NAMES:
            try:
                ops.resolve_name(op, device.type, name)
                break
            except ValueError as exc:
                reasons.append(str(exc))
        else:
            skipped[name] = reasons[0]
            continue
        chosen.append(name)
    return sorted(chosen, key=lambda name: name != baseline), skipped


def time_steps(trainer: Trainer, device: torch.device, warmup: int,
               steps: int) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """Run `warmup` untimed steps, then `steps` timed ones; returns the warm-up's seconds, the seconds per timed
    step, and the last step's (loss, finite) as train_step gives them."""
    started = time.perf_counter()
    for _ in range(warmup):
        trainer.train_step()
    harness.synchronize(device)
    warmup_s = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for _ in range(steps):
        loss, finite = trainer.train_step()
    harness.synchronize(device)
    return warmup_s, (time.perf_counter() - started) / steps, loss, finite


def measure(preset_name: str, backend: str, *, device: torch.device, dtype: torch.dtype, batch_size: int,
            seq_len: int | None, steps: int, warmup: int, nvtx: bool, env: dict, peaks: dict) -> dict:
    """One row: build the trainer for (preset, backend), run warm-up and timed steps."""
    model_config = preset(preset_name)
    if seq_len is not None:
        model_config = preset(preset_name, max_seq_len=seq_len)
    seq_len = model_config.max_seq_len
    row = {
        "op": "train", "backend": backend, "label": f"{preset_name} B={batch_size} T={seq_len}",
        "shape": {"preset": preset_name, "batch_size": batch_size, "seq_len": seq_len},
        "dtype": harness.DTYPE_NAMES[dtype], "pass": "step", "status": "ok", "ms": None, "tokens_per_s": None,
        "tflops": None, "mfu": None, "mfu_vs_matmul": None, "matmul_tflops": peaks["matmul"],
        "peak_tflops": peaks["table"], "peak_mem_mb": None, "speedup": None, "baseline": None,
        "warmup_s": None, "steps": steps, "ops": None, "loss": None, **env,
    }
    ops.set_backend("torch" if backend == COMPILE else backend)
    config = TrainConfig(batch_size=batch_size, max_steps=warmup + steps, device=str(device),
                         dtype=harness.DTYPE_NAMES[dtype], backend="torch" if backend == COMPILE else backend,
                         compile=backend == COMPILE, nvtx=nvtx, sample_tokens=0)
    trainer = None
    try:
        with tempfile.TemporaryDirectory(prefix="bench-train-") as run_dir:
            data = random_token_data(model_config.vocab_size, seq_len, batch_size)
            trainer = Trainer(model_config, config, data, Path(run_dir), device, dtype, log=lambda message: None)
            row["shape"]["params"] = trainer.model.num_parameters()
            row["ops"] = ops.describe_choices(ops.check_model_support(model_config, device.type, dtype))
            row["warmup_s"], step_s, loss, finite = time_steps(trainer, device, warmup, steps)
            row["loss"] = loss.item()
            if not finite.item():  # a non-finite step is skipped by the trainer and reports loss 0
                raise FloatingPointError("non-finite loss or gradient norm in the last timed step")
            achieved = flop_per_token(trainer.model, seq_len) * trainer.tokens_per_step / step_s
            row.update(ms=step_s * 1e3, tokens_per_s=trainer.tokens_per_step / step_s, tflops=achieved / 1e12,
                       flop_per_token=flop_per_token(trainer.model, seq_len))
            if peaks["table"]:
                row["mfu"] = achieved / (peaks["table"] * 1e12)
            row["mfu_vs_matmul"] = achieved / (peaks["matmul"] * 1e12)
            if device.type == "cuda":
                row["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    except Exception as exc:  # noqa: BLE001 - one failing backend must not end the comparison; the row says why
        row["status"] = harness.error_status(exc)
        print(f"  {row['label']} {backend}: {row['status']}", file=sys.stderr)
    finally:
        del trainer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if backend == COMPILE:
            torch._dynamo.reset()
    return row


def plain_run(spec: dict) -> dict:
    """One side of a --baseline plain pair, in this process: train spec["steps"] steps on Shakespeare.

    spec: kind ("engine" or "plain"), preset, batch_size, steps, dtype (a DTYPES name or auto), seed,
    eval_iters, compile (the engine's --compile), backend, threads. Returns train_s and train_cpu_s (wall and
    CPU time of the loop and the final evaluation), tokens per second of each, the last training loss,
    val_loss and the dtype trained in.
    """
    from bench import plain_gpt
    from engine.config import resolve_dtype
    from engine.train import PRESET_TRAINING

    device = torch.device("cpu")
    training = PRESET_TRAINING.get(spec["preset"], {})
    data = load_token_data(None, training.get("tokenizer", "char"))  # default: the BPE vocabulary it trains on
    model_config = preset(spec["preset"], vocab_size=data.tokenizer.vocab_size)
    config = TrainConfig(**training | {
        "batch_size": spec["batch_size"], "max_steps": spec["steps"], "eval_interval": spec["steps"],
        "eval_iters": spec["eval_iters"], "seed": spec["seed"], "dtype": spec["dtype"], "device": "cpu",
        "backend": spec["backend"], "compile": spec["compile"], "sample_tokens": 0})
    dtype = resolve_dtype(config.dtype, device)
    tokens_per_step = config.batch_size * model_config.max_seq_len
    if spec["kind"] == "engine":
        ops.set_backend(config.backend)
        ops.check_model_support(model_config, device.type, dtype)  # resolve every op before the clock starts
        with tempfile.TemporaryDirectory(prefix="bench-plain-") as run_dir:
            trainer = Trainer(model_config, config, data, Path(run_dir), device, dtype, log=lambda *a, **k: None)
            started, cpu_started = time.perf_counter(), time.process_time()
            if trainer.run() != 0:
                raise RuntimeError("the engine's run did not finish")
            train_s, train_cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
            rows = report.load_rows(Path(run_dir) / "metrics.jsonl")
        loss = next(row["loss"] for row in reversed(rows) if "loss" in row)
        val_loss = next(row["val_loss"] for row in reversed(rows) if "val_loss" in row)
    else:
        model = plain_gpt.PlainGPT(model_config)
        # The engine's initial weights: the same initialization, which the plain model draws in another
        # order. Both sides then start from the same point and see the same batches, so their losses differ
        # by what they compute, not by the draw (a few hundredths at 2000 steps from seed to seed).
        torch.manual_seed(config.seed)
        model.load_state_dict(GPT(model_config).state_dict())
        optimizer = plain_gpt.make_optimizer(model, config)
        generator = torch.Generator().manual_seed(config.seed)
        started, cpu_started = time.perf_counter(), time.process_time()
        for step in range(config.max_steps):
            x, y = data.batch("train", config.batch_size, model_config.max_seq_len, generator)
            loss = plain_gpt.train_step(model, optimizer, x, y, step, config, dtype)
        loss = loss.item()
        plain_gpt.evaluate(model, data, "train", config, dtype)  # the engine evaluates both splits too
        val_loss = plain_gpt.evaluate(model, data, "val", config, dtype)
        train_s, train_cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    tokens = config.max_steps * tokens_per_step
    return {"train_s": train_s, "train_cpu_s": train_cpu_s, "tokens_per_s": tokens / train_s,
            "tokens_per_cpu_s": tokens / train_cpu_s, "loss": loss, "val_loss": val_loss,
            "dtype": harness.DTYPE_NAMES[dtype]}


def run_plain_pair_side(spec: dict) -> dict:
    """plain_run in a fresh Python process; adds process_s and process_cpu_s, the process's whole wall time and
    CPU time (user + system, its own subprocesses included: on a loaded machine the steadier of the two)."""
    started, children = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    finished = subprocess.run([sys.executable, "-m", "bench.train", "--worker", json.dumps(spec)],
                              cwd=harness.REPO_ROOT, capture_output=True, text=True, check=False)
    process_s, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN)
    process_cpu_s = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
    if finished.returncode != 0:
        raise RuntimeError(f"the {spec['kind']} run failed:\n{finished.stderr[-2000:]}")
    return {**json.loads(finished.stdout.strip().splitlines()[-1]), "process_s": process_s,
            "process_cpu_s": process_cpu_s}


def spread(values: list[float]) -> str:
    """'median (min-max, n=N)' of values."""
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f}, n={len(values)})"


# --baseline plain: each ratio is engine over plain, so > 1 means the engine is faster: (name, key, higher is faster).
PLAIN_RATIOS = (("tok/s", "tokens_per_s", True), ("tok/CPU-s", "tokens_per_cpu_s", True),
                ("process s", "process_s", False), ("process CPU-s", "process_cpu_s", False))


def compare_with_plain(args, presets: list[str]) -> int:
    """--baseline plain: alternated pairs of engine and plain runs per preset; prints the ratios per pair."""
    steps = args.steps or PLAIN_STEPS
    pairs = args.pairs or PLAIN_PAIRS
    out_dir = args.out or harness.default_out_dir(torch.device("cpu"))
    writer = report.RowWriter(out_dir / "train_vs_plain.jsonl")
    env = harness.environment(torch.device("cpu"))
    threads = args.threads or torch.get_num_threads()
    print(f"engine against plain PyTorch on {env['device']}, {threads} threads, commit {env['commit']}: "
          f"{pairs} pairs of {steps} steps per preset, each run its own process")
    print("note: a shared CPU makes single timings noisy; read the per-pair ratios and their range "
          "(CPU seconds are the steadier measure on a loaded machine)")
    for preset_name in presets:
        batch_size = args.batch_size or PLAIN_CPU_BATCH[preset_name]
        spec = {"preset": preset_name, "batch_size": batch_size, "steps": steps, "seed": args.seed,
                "eval_iters": args.eval_iters, "backend": "auto", "compile": bool(args.compile),
                "threads": args.threads}
        dtypes = {"engine": args.dtype or "auto", "plain": args.plain_dtype}
        print(f"\n## {preset_name}, batch {batch_size}, {steps} steps, engine --dtype {dtypes['engine']}, "
              f"plain {dtypes['plain']}; ratios engine over plain (> 1: the engine is faster)")
        print("| pair | " + " | ".join(f"{name} ratio" for name, _, _ in PLAIN_RATIOS) +
              " | engine tok/s | plain tok/s | engine val loss | plain val loss |")
        print("|---" * (len(PLAIN_RATIOS) + 5) + "|")
        ratios = {name: [] for name, _, _ in PLAIN_RATIOS}
        losses = {"engine": [], "plain": []}
        for pair in range(pairs):
            order = ("engine", "plain") if pair % 2 == 0 else ("plain", "engine")
            # Both sides of a pair share a seed; each pair has its own, so the losses' range shows the spread
            # over initializations and data order.
            result = {kind: run_plain_pair_side({**spec, "kind": kind, "dtype": dtypes[kind], "seed": args.seed + pair})
                      for kind in order}
            engine, plain = result["engine"], result["plain"]
            for name, key, higher_is_faster in PLAIN_RATIOS:
                ratio = engine[key] / plain[key]
                ratios[name].append(ratio if higher_is_faster else 1 / ratio)
            for kind, values in losses.items():
                values.append(result[kind]["val_loss"])
            writer({"op": "train_vs_plain", "preset": preset_name, "pair": pair, "seed": args.seed + pair,
                    "order": list(order),
                    "batch_size": batch_size, "steps": steps, "threads": threads, "engine": engine, "plain": plain,
                    "ratios": {name: values[-1] for name, values in ratios.items()}, **env})
            print(f"| {pair} | " + " | ".join(f"{values[-1]:.3f}" for values in ratios.values()) +
                  f" | {engine['tokens_per_s']:,.0f} | {plain['tokens_per_s']:,.0f} | {engine['val_loss']:.4f} | "
                  f"{plain['val_loss']:.4f} |", flush=True)
        print(f"{preset_name} (engine {engine['dtype']}, plain {plain['dtype']}), median (min-max) over pairs: " +
              "; ".join(f"{name} ratio {spread(values)}" for name, values in ratios.items()) +
              f"; val loss engine {spread(losses['engine'])}, plain {spread(losses['plain'])}")
    print(f"wrote {out_dir / 'train_vs_plain.jsonl'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.splitlines()[0])
    parser.add_argument("--presets", type=lambda s: harness.parse_list(s), default=None,
                        help=f"comma-separated presets (default: {','.join(GPU_PRESETS)} on a GPU, "
                             f"{','.join(CPU_PRESETS)} on a CPU)")
    parser.add_argument("--backends", type=lambda s: harness.parse_list(s), default=None,
                        help="comma-separated backends, 'auto' and 'compile' (default: all that run here, auto, "
                             "and compile on a GPU)")
    parser.add_argument("--baseline", default="torch",
                        help="backend the speedup column divides by (default: torch), or 'plain': the engine "
                             "against a plain PyTorch GPT on Shakespeare (bench/plain_gpt.py; CPU)")
    parser.add_argument("--pairs", type=int, default=None,
                        help=f"--baseline plain: alternated engine/plain pairs per preset (default {PLAIN_PAIRS})")
    parser.add_argument("--seed", type=int, default=1337,
                        help="--baseline plain: seed of both sides of the first pair (pair i: seed + i)")
    parser.add_argument("--eval-iters", type=int, default=20,
                        help="--baseline plain: validation batches at the end of each run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # one side of a --baseline plain pair (JSON spec)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="include 'compile' (torch.compile of the torch backend; default: on a GPU only, "
                             "the first compile takes minutes on a small CPU)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"timed steps (default: {GPU_STEPS} GPU, {CPU_STEPS} CPU)")
    parser.add_argument("--warmup", type=int, default=None,
                        help=f"untimed steps first (default: {GPU_WARMUP} GPU, {CPU_WARMUP} CPU)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"sequences per step for every preset (default: per preset, GPU {GPU_BATCH}, "
                             f"CPU {CPU_BATCH})")
    parser.add_argument("--seq-len", type=int, default=None, help="sequence length (default: the preset's max_seq_len)")
    parser.add_argument("--dtype", choices=[*harness.DTYPES, "auto"], default=None,
                        help="autocast dtype (default: bf16 on a GPU, fp32 on a CPU; with --baseline plain: the "
                             "engine's, default auto as in engine.train)")
    parser.add_argument("--plain-dtype", choices=list(harness.DTYPES), default="fp32",
                        help="--baseline plain: the plain side's autocast dtype (default fp32, a user's default)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for PyTorch (default: PyTorch's choice); 1 steadies timings on a "
                             "busy machine")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default as in the op benchmarks)")
    parser.add_argument("--nvtx", action="store_true", help="NVTX ranges in the model and the step (for Nsight)")
    return parser


def measure_all(args, presets: list[str], backends: list[str], *, device: torch.device, dtype: torch.dtype,
                steps: int, warmup: int, env: dict, peaks: dict, writer: report.RowWriter) -> list[dict]:
    """A row per (preset, backend), the baseline's first, each with its speedup over the baseline; the
    process-wide backend choice is restored afterwards."""
    rows = []
    previous_backend = ops.get_backend()
    try:
        for preset_name in presets:
            batch_size = args.batch_size or (GPU_BATCH if device.type == "cuda" else CPU_BATCH)[preset_name]
            baseline_ms = None
            for backend in backends:
                row = measure(preset_name, backend, device=device, dtype=dtype, batch_size=batch_size,
                              seq_len=args.seq_len, steps=steps, warmup=warmup, nvtx=args.nvtx, env=env, peaks=peaks)
                row["baseline"] = args.baseline
                if row["status"] == "ok" and backend == args.baseline:
                    baseline_ms = row["ms"]
                if row["status"] == "ok" and baseline_ms is not None:
                    row["speedup"] = baseline_ms / row["ms"]
                writer(row)
                rows.append(row)
    finally:
        ops.set_backend(previous_backend)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker is not None:
        spec = json.loads(args.worker)
        harness.set_threads(spec["threads"])
        print(json.dumps(plain_run(spec)))
        return 0
    harness.set_threads(args.threads)
    if args.baseline == PLAIN:
        presets = args.presets or list(PLAIN_PRESETS)
        unknown = [name for name in presets if name not in PRESETS]
        if unknown or (args.pairs is not None and args.pairs < 1) or (args.steps is not None and args.steps < 1):
            raise SystemExit(f"error: unknown preset {unknown[0]!r}; choose from {', '.join(PRESETS)}" if unknown
                             else "error: --pairs and --steps must be at least 1")
        return compare_with_plain(args, presets)
    if args.dtype == "auto":
        raise SystemExit("error: --dtype auto is for --baseline plain; choose fp32, bf16 or fp16")
    device = harness.resolve_device(args.device)
    gpu = device.type == "cuda"
    dtype = harness.DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if gpu else torch.float32)
    presets = args.presets or list(GPU_PRESETS if gpu else CPU_PRESETS)
    for name in presets:
        if name not in PRESETS:
            raise SystemExit(f"error: unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    steps = args.steps or (GPU_STEPS if gpu else CPU_STEPS)
    warmup = args.warmup if args.warmup is not None else (GPU_WARMUP if gpu else CPU_WARMUP)
    if steps < 1 or warmup < 0:
        raise SystemExit("error: --steps must be at least 1 and --warmup at least 0")
    with_compile = args.compile if args.compile is not None else gpu
    backends, skipped = train_backends(device, args.backends, with_compile, args.baseline)
    out_dir = args.out or harness.default_out_dir(device)
    env = harness.environment(device)
    peaks = {"matmul": matmul_tflops(device, dtype), "table": peak_tflops(device, dtype)}
    print(f"device {env['device']} | torch {env['torch']} | commit {env['commit']} | {harness.DTYPE_NAMES[dtype]} | "
          f"matmul {peaks['matmul']:.3g} TFLOP/s measured, peak {peaks['table'] or 'unknown'} TFLOP/s from the table | "
          f"{warmup} warm-up + {steps} timed steps | results in {out_dir}")
    if not gpu:
        print("note: CPU timings on a shared machine are noisy; peak memory is not measured on the CPU")
    for name, reason in skipped.items():
        print(f"skipping backend {name}: {reason}")
    rows = measure_all(args, presets, backends, device=device, dtype=dtype, steps=steps, warmup=warmup, env=env,
                       peaks=peaks, writer=report.RowWriter(out_dir / "train.jsonl"))
    print()
    print(f"## training throughput ({env['device']}, {harness.DTYPE_NAMES[dtype]})")
    print(report.train_table(rows))
    print()
    print("MFU: 6 N + 12 L T d FLOP per token (PaLM convention) over the table peak; 'MFU vs matmul' over the "
          "measured matmul peak")
    written = report.render_op(out_dir, "train", plot=False)
    print("wrote " + ", ".join(str(path) for path in written))
    return 0 if any(row["status"] == "ok" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
