"""The record of a run: metrics.jsonl, its TensorBoard mirror, the progress bar and the log lines.

Each step adds its loss and gradient norm to running sums on the device, so logging never stalls a
GPU between log steps. A log step reads the sums, with the non-finite guard's counters, in the one
host sync of its interval (under torchrun also the one all_reduce), writes a row and opens the next
window. Checkpoints keep the open window (`window`, `load_window`), so a run stopped and resumed
between two log steps writes the rows an uninterrupted run writes.

Time: a row's tokens/s counts the window's training only (evaluations and checkpoints are left out,
see `outside_window`); `elapsed` is the run's time over all its invocations, kept in the checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from engine import distributed
from engine.distributed import Context
from engine.guard import NonFiniteGuard


def bits_per_char(loss_per_token: float, tokens_per_char: float | None) -> float | None:
    """A loss in nats per token -> bits per character: / ln 2 turns nats into bits, * tokens per
    character spreads each token's bits over the characters it spells."""
    if tokens_per_char is None or not math.isfinite(loss_per_token):
        return None
    return loss_per_token / math.log(2) * tokens_per_char


def _row_step(line: str) -> float:
    """The step of a metrics.jsonl line; a line torn by a crash mid-write counts as after any step."""
    try:
        return json.loads(line).get("step", 0)
    except ValueError:
        return float("inf")


class MetricsLogger:
    """Writes a run's metrics (rank 0) and keeps the open log window's sums (every rank).

    log: the trainer's line printer (silent off rank 0); tokens_per_step: tokens of one optimizer step over
    all ranks; val_tokens_per_char: converts the validation loss to bits per character (None: opaque ids).
    """

    def __init__(self, out_dir: Path, device: torch.device, context: Context, log: Callable[[str], None],
                 tokens_per_step: int, val_tokens_per_char: float | None) -> None:
        self.path = out_dir / "metrics.jsonl"
        self.tensorboard_dir = out_dir / "tensorboard"
        self.context = context
        self.log = log
        self.tokens_per_step = tokens_per_step
        self.val_tokens_per_char = val_tokens_per_char
        self.running_loss = torch.zeros((), device=device)
        self.running_grad_norm = torch.zeros((), device=device)
        self.finite_steps = torch.zeros((), device=device)
        self.elapsed = 0.0
        self.interactive = False
        self.progress: tqdm | None = None
        self.tensorboard = None  # a SummaryWriter between open() and close() with tensorboard=True
        self._started = self._window_start = time.perf_counter()
        self._window_steps = 0

    def open(self, start_step: int, max_steps: int, tensorboard: bool) -> None:
        """Start logging a run (or its continuation) at start_step: the progress bar, TensorBoard, the clocks."""
        self.interactive = sys.stderr.isatty() and self.context.is_main
        self.progress = tqdm(total=max_steps, initial=start_step, disable=not self.interactive, unit="step",
                             dynamic_ncols=True, leave=True)
        if tensorboard and self.context.is_main:
            from torch.utils.tensorboard import SummaryWriter  # optional dependency, imported only when asked for
            # purge_step drops events a previous attempt logged after the checkpoint we resume from.
            self.tensorboard = SummaryWriter(self.tensorboard_dir, purge_step=start_step or None)
        self._started = self._window_start = time.perf_counter()
        self._window_steps = 0

    def say(self, message: str) -> None:
        """A log line that does not break the progress bar."""
        (self.progress.write if self.interactive else self.log)(message)

    def add_step(self, loss: torch.Tensor, grad_norm: torch.Tensor, finite: torch.Tensor) -> None:
        """Add a step to the open window, on the device; a skipped step adds its loss of 0 and no gradient norm."""
        self.running_loss += loss
        self.running_grad_norm += torch.where(finite, grad_norm, torch.zeros_like(grad_norm))
        self.finite_steps += finite
        self._window_steps += 1
        self.progress.update(1)

    def log_step(self, step: int, max_steps: int, lr: float, tokens: int, guard: NonFiniteGuard) -> str | None:
        """Write the window's row and open the next window; returns the guard's reason to stop, or None."""
        # The one host sync per log interval (and, under torchrun, one all_reduce).
        sums = distributed.mean_across_ranks(torch.stack([self.running_loss, self.running_grad_norm]), self.context)
        counts = torch.stack([self.finite_steps, *guard.log_counts()])
        (loss_sum, grad_norm_sum), (good, skipped, streak, streak_start) = sums.tolist(), counts.tolist()
        now = time.perf_counter()  # after the sync: the window's GPU work is done
        loss = loss_sum / good if good else None  # None (JSON null) when every step was skipped
        tokens_per_s = self._window_steps * self.tokens_per_step / max(now - self._window_start, 1e-9)
        row = {"step": step, "loss": loss, "lr": lr, "tokens_per_s": tokens_per_s, "tokens": tokens,
               "elapsed_s": self.elapsed + now - self._started, "grad_norm": grad_norm_sum / good if good else None,
               "skipped_steps": int(skipped)}
        stop_reason = guard.end_window(streak, streak_start)
        self.write(row)
        shown = "skipped" if loss is None else f"{loss:.4f}"
        self.progress.set_postfix(loss=shown, lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
        if not self.interactive:
            self.log(f"step {step}/{max_steps} | loss {shown} | lr {lr:.2e} | {tokens_per_s:,.0f} tok/s")
        self.running_loss.zero_()
        self.running_grad_norm.zero_()
        self.finite_steps.zero_()
        self._window_start, self._window_steps = time.perf_counter(), 0
        return stop_reason

    def log_evaluation(self, step: int, losses: dict[str, float], tokens: int) -> None:
        """The evaluation's row (losses per token, and the validation loss in bits per character) and line."""
        val_bpc = bits_per_char(losses["val"], self.val_tokens_per_char)
        self.write({"step": step, "train_loss": losses["train"], "val_loss": losses["val"],
                    "val_bits_per_char": val_bpc, "tokens": tokens})
        shown_bpc = "" if val_bpc is None else f" ({val_bpc:.3f} bits/char)"
        self.say(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}{shown_bpc}")

    @contextlib.contextmanager
    def outside_window(self):
        """Time spent in the block (an evaluation, a checkpoint) does not count in the window's tokens/s."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self._window_start += time.perf_counter() - started

    def add_elapsed(self) -> None:
        """Add the time since open() or the last call to `elapsed` (before a checkpoint records it)."""
        now = time.perf_counter()
        self.elapsed += now - self._started
        self._started = now

    def close(self) -> None:
        self.progress.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None

    def write(self, row: dict) -> None:
        """Append a row to metrics.jsonl (the record of the run) and mirror it to TensorBoard if enabled."""
        if not self.context.is_main:
            return
        # JSON has no NaN or Infinity: a non-finite value (an evaluation that overflowed) is written as null.
        row = {name: None if isinstance(value, float) and not math.isfinite(value) else value
               for name, value in row.items()}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(row, allow_nan=False) + "\n")
        if self.tensorboard is not None:
            for name, value in row.items():
                if name != "step" and value is not None:
                    self.tensorboard.add_scalar(name, value, row["step"])

    def truncate(self, step: int) -> None:
        """Drop rows logged after `step`, the checkpoint a run resumes from (they will be logged again)."""
        if not self.context.is_main or not self.path.exists():
            return
        rows = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = [line for line in rows if _row_step(line) <= step]
        if len(kept) != len(rows):
            temporary = self.path.with_name(".metrics.jsonl.tmp")
            temporary.write_text("".join(line + "\n" for line in kept))
            os.replace(temporary, self.path)

    def window(self) -> list[float]:
        """This rank's open window as plain numbers (exact: float32 values fit a Python float)."""
        return [self.running_loss.item(), self.running_grad_norm.item(), self.finite_steps.item()]

    def load_window(self, loss: float, grad_norm: float, finite_steps: float) -> None:
        self.running_loss.fill_(loss)
        self.running_grad_norm.fill_(grad_norm)
        self.finite_steps.fill_(finite_steps)
