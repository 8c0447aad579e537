"""Profiling hooks: NVTX ranges for Nsight, and a torch.profiler Chrome trace of a few steps.

NVTX ranges name regions of the timeline (each layer's attention and FFN, the step's forward,
backward and optimizer) so that Nsight Compute can select kernels by range:
`ncu --nvtx --nvtx-include "block0.attention/" ...` (the trailing slash means a push/pop range).

Ranges are off by default and then cost one flag check per call: `nvtx_range` returns a shared
do-nothing context manager. `enable_nvtx(True)` (the `--nvtx` flag) turns them on using, in order:
torch.cuda.nvtx when this PyTorch sees a CUDA GPU, else the `nvtx` package (a no-op until a
profiler attaches, so enabling on a CPU changes nothing), else nothing, with a warning. With a
CPU-only PyTorch, torch.cuda.nvtx raises "NVTX functions not installed", so it is never used there.

Under torch.compile the ranges are skipped while tracing (a compiled graph has no Python
boundaries to mark); profile the eager model to see them.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger("engine.profiling")

_NO_RANGE = contextlib.nullcontext()
_enabled = False
_push: Callable[[str], object] | None = None
_pop: Callable[[], object] | None = None


def _find_nvtx() -> tuple[Callable[[str], object], Callable[[], object], str] | None:
    """(push, pop, provider name) of the first NVTX implementation usable in this process."""
    if torch.cuda.is_available():
        return torch.cuda.nvtx.range_push, torch.cuda.nvtx.range_pop, "torch.cuda.nvtx"
    try:
        import nvtx
    except ImportError:
        return None
    return nvtx.push_range, nvtx.pop_range, "nvtx package"


def enable_nvtx(enabled: bool = True) -> bool:
    """Turn NVTX ranges on or off for the whole process; returns whether they are now on."""
    global _enabled, _push, _pop
    if not enabled:
        _enabled = False
        return False
    found = _find_nvtx()
    if found is None:
        log.warning("NVTX ranges requested, but neither a CUDA PyTorch nor the `nvtx` package is present: "
                    "ranges stay off")
        _enabled = False
        return False
    _push, _pop, provider = found
    log.info("NVTX ranges on (%s)", provider)
    _enabled = True
    return True


def nvtx_enabled() -> bool:
    return _enabled


class _Range:
    """Pushes an NVTX range on enter and pops it on exit."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        _push(self.name)

    def __exit__(self, *exc_info) -> None:
        _pop()


def nvtx_range(name: str):
    """A context manager marking `name` on the NVTX timeline; a shared no-op when ranges are off."""
    if not _enabled or torch.compiler.is_compiling():
        return _NO_RANGE
    return _Range(name)


class StepProfiler:
    """Records a torch.profiler Chrome trace of a few training steps (the `--profile` flag).

    Call `step()` after every training step and `close()` when the loop ends. The first `skip`
    steps are left out (they hold one-time costs: compilation, autotuning, allocator growth);
    the next `steps` are recorded and written to `path`, which chrome://tracing and
    https://ui.perfetto.dev open. A loop that ends early writes the steps it recorded.
    """

    def __init__(self, path: Path, enabled: bool, *, skip: int = 1, steps: int = 3, cuda: bool = False,
                 log: Callable[[str], object] = print) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self.skip = skip
        self.steps = steps
        self.cuda = cuda
        self.log = log
        self._seen = 0
        self._profiler: torch.profiler.profile | None = None
        if enabled and skip == 0:
            self._start()

    def _start(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._profiler = torch.profiler.profile(activities=activities)
        self._profiler.start()
        self._recorded = 0

    def _finish(self) -> None:
        self._profiler.stop()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._profiler.export_chrome_trace(str(self.path))
        self._profiler = None
        self.log(f"profile: Chrome trace of {self._recorded} step(s) written to {self.path}")

    def step(self) -> None:
        if not self.enabled:
            return
        self._seen += 1
        if self._profiler is not None:
            self._recorded += 1
            if self._recorded == self.steps:
                self._finish()
                self.enabled = False
        elif self._seen == self.skip:
            self._start()

    def close(self) -> None:
        if self._profiler is not None:
            if self._recorded:
                self._finish()
            else:
                self._profiler.stop()
                self._profiler = None
        self.enabled = False
