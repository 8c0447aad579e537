"""Autotuning switches and compile counters for the GPU check, applied from outside the kernels.

The Triton kernels (engine.kernels.*) autotune over candidate lists of several configurations;
with cold caches a Triton sm_90 compile takes 2 to 9 s per configuration, and the autotuner
compiles them one after another. This module changes, at run time and without editing the
kernels, which candidates an autotuner tries, according to ENGINE_AUTOTUNE:

    ENGINE_AUTOTUNE=quick     the first candidate only (after the kernel's own pruning, so each
                              kind of input, e.g. attention's D = 128, keeps its own first one)
    ENGINE_AUTOTUNE=shard:I/N candidates I, I+N, I+2N, ... (the first if that leaves none): N processes,
                              one per shard, running the same workload compile every candidate
                              between them in parallel into the shared Triton cache, so that a later
                              run with the full list finds every binary compiled
    unset, "full" or ""       the kernels' own lists

It also counts what compiles while a program runs: Triton binaries loaded by the JIT (fresh or
from the disk cache), autotuner tuning keys (each new one benchmarks every candidate) and
graphs compiled by torch.compile (torch._dynamo's unique_graphs counter).

    python -m bench.autotune [--steps-log FILE] MODULE [ARGS...]
        run `python -m MODULE ARGS...` with ENGINE_AUTOTUNE applied; with --steps-log, append one
        JSON line per engine.trainer.Trainer.train_step with the counts so far, so that the
        check can tell whether anything compiled or autotuned after the warm-up steps.
    python -m pytest -p bench.autotune ...
        the same switch inside a pytest run (applied once the tests are collected).
"""
from __future__ import annotations

import importlib
import json
import os
import re
import runpy
import sys
import time
from pathlib import Path

KERNEL_MODULES = ("engine.kernels.attention", "engine.kernels.ffn", "engine.kernels.layer_norm",
                  "engine.kernels.cross_entropy")
ENV = "ENGINE_AUTOTUNE"

_compiles = 0  # Triton binaries loaded into this process since install_counters()
_counters_installed = False


def parse_mode(text: str | None) -> tuple[str, int, int]:
    """ENGINE_AUTOTUNE's value -> ("full" | "quick" | "shard", shard index, shard count)."""
    text = (text or "").strip()
    if text in ("", "full"):
        return "full", 0, 1
    if text == "quick":
        return "quick", 0, 1
    match = re.fullmatch(r"shard:(\d+)/(\d+)", text)
    if match and 0 <= int(match.group(1)) < int(match.group(2)):
        return "shard", int(match.group(1)), int(match.group(2))
    raise ValueError(f"{ENV}={text!r} is not one of: full, quick, shard:I/N (0 <= I < N)")


def select(candidates: list, mode: str, index: int = 0, count: int = 1) -> list:
    """The candidates an autotuner keeps under a mode (never none)."""
    if mode == "quick":
        return candidates[:1]
    if mode == "shard":
        return candidates[index::count] or candidates[:1]
    return candidates


def _triton_loaded() -> bool:
    """Whether the kernel modules can be imported here: a GPU, or the interpreter chosen (tests' conftest)."""
    from engine.kernels._interpreter import interpreting  # imports nothing, not even triton

    if interpreting():
        return True
    import torch

    return torch.cuda.is_available()


def autotuners(import_modules: bool = True) -> dict[str, object]:
    """Every triton Autotuner defined at the top level of the kernel modules, by 'module.name'.

    import_modules=False looks only at kernel modules already imported (counting must not add an
    import to a program that never uses the kernels)."""
    if not _triton_loaded():
        return {}
    found = {}
    for module_name in KERNEL_MODULES:
        if not import_modules and module_name not in sys.modules:
            continue
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        from triton.runtime.autotuner import Autotuner

        for name, value in vars(module).items():
            while value is not None and not isinstance(value, Autotuner) and hasattr(value, "fn"):
                value = value.fn  # e.g. a triton.heuristics wrapper around the autotuner
            if isinstance(value, Autotuner):
                found[f"{module_name.rsplit('.', 1)[-1]}.{name}"] = value
    return found


def apply(text: str | None = None) -> str:
    """Apply ENGINE_AUTOTUNE (or `text`) to every kernel autotuner; returns a one-line description."""
    mode, index, count = parse_mode(os.environ.get(ENV) if text is None else text)
    if mode == "full":
        return "autotune: the kernels' full candidate lists"
    tuners = autotuners()
    for tuner in tuners.values():
        prune = tuner.early_config_prune

        def narrowed(configs, named_args, _prune=prune, **kwargs):
            kept = _prune(configs, named_args, **kwargs) if _prune else configs
            return select(list(kept), mode, index, count)

        # The autotuner calls early_config_prune before benchmarking; its own list stays whole, so it
        # still prunes by kind and benchmarks (cheaply) what is left.
        tuner.early_config_prune = narrowed
    label = "the first candidate" if mode == "quick" else f"candidates {index}::{count}"
    return f"autotune: {label} of each of {len(tuners)} autotuned kernels ({ENV}={os.environ.get(ENV, text)})"


def install_counters() -> None:
    """Count Triton compiles from now on (chains any post-compile hook already set)."""
    global _counters_installed
    if _counters_installed or not _triton_loaded():
        return
    from triton import knobs

    previous = knobs.runtime.jit_post_compile_hook

    def counted(*args, **kwargs):
        global _compiles
        _compiles += 1
        return previous(*args, **kwargs) if previous else None

    knobs.runtime.jit_post_compile_hook = counted
    _counters_installed = True


def counts() -> dict[str, int]:
    """{'triton_compiles', 'autotune_keys', 'dynamo_graphs'} so far in this process."""
    import torch

    keys = sum(len(tuner.cache) for tuner in autotuners(import_modules=False).values())
    graphs = 0
    if "torch._dynamo" in sys.modules:
        graphs = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    return {"triton_compiles": _compiles, "autotune_keys": keys, "dynamo_graphs": graphs}


def difference(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {name: after[name] - before.get(name, 0) for name in after}


def log_train_steps(path: Path) -> None:
    """Wrap Trainer.train_step to append {step, seconds, counts} per step to `path` (JSON lines).

    `seconds` is the host time of the call, synchronized at its end: the first step's compile and
    autotuning time shows there, separate from the rest."""
    import torch

    from engine import trainer as trainer_module

    original = trainer_module.Trainer.train_step

    def train_step(self):
        started = time.perf_counter()
        result = original(self)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        row = {"step": self.step, "seconds": time.perf_counter() - started, **counts()}
        with open(path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        return result

    trainer_module.Trainer.train_step = train_step


# ----------------------------------------------------------------------------- pytest plugin

def pytest_collection_finish(session) -> None:
    """After collection (tests/conftest.py has chosen the interpreter or the GPU), apply the switch."""
    print(apply())


# ----------------------------------------------------------------------------- runner

def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    steps_log = None
    if argv[:1] == ["--steps-log"] and len(argv) >= 2:
        steps_log, argv = Path(argv[1]), argv[2:]
    if not argv or argv[0].startswith("-"):
        print("usage: python -m bench.autotune [--steps-log FILE] MODULE [ARGS...]", file=sys.stderr)
        return 2
    try:
        print(apply(), flush=True)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    install_counters()
    if steps_log is not None:
        log_train_steps(steps_log)
    module, sys.argv = argv[0], argv
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
