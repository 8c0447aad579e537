"""Non-finite steps: skipped on the device, counted, and the run stopped after too many in a row.

A step whose loss or gradient norm is not finite (an overflow, a bad batch, too high a learning rate)
changes no weights and no optimizer state: the fused AdamW skips its update where its `found_inf`
tensor is 1, on the device, so no step waits for the host. The counters are device scalars as well,
read at log steps in the metrics logger's one host sync (engine/metrics.py): the steps skipped in all,
the current streak of consecutive ones and the step where it began, and the longest streak since the
last log step, so that a streak which ended between two log steps is still seen there. A streak of
max_bad_steps stops the run at that log step.
"""
from __future__ import annotations

import torch


class NonFiniteGuard:
    """The trainer's non-finite-step bookkeeping; `distributed`: the step runs under torchrun."""

    def __init__(self, device: torch.device, max_bad_steps: int, distributed: bool) -> None:
        self.max_bad_steps = max_bad_steps
        self.distributed = distributed
        self.skipped_steps = torch.zeros((), dtype=torch.long, device=device)
        self.bad_streak = torch.zeros((), dtype=torch.long, device=device)
        self.bad_streak_start = torch.zeros((), dtype=torch.long, device=device)
        self.worst_streak = torch.zeros((), dtype=torch.long, device=device)
        self.worst_streak_start = torch.zeros((), dtype=torch.long, device=device)

    def is_finite(self, grad_norm: torch.Tensor, mean_loss: torch.Tensor) -> torch.Tensor:
        """Whether the step may be applied, as a device scalar. Under torchrun only the gradient norm decides:
        it is global (the gradients are reduced), so every rank skips the same steps; a non-finite local
        loss gives non-finite gradients anyway."""
        finite = torch.isfinite(grad_norm)
        if not self.distributed:
            finite = finite & torch.isfinite(mean_loss)
        return finite

    def skip_unless(self, finite: torch.Tensor, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler) -> None:
        """Make the optimizer step that follows a no-op where `finite` is false, without a host sync."""
        if not scaler.is_enabled():
            # The fused AdamW skips its update where found_inf is 1, on the device: no host sync.
            # (With fp16, GradScaler does the same for its own inf checks.)
            optimizer.found_inf = (~finite).float()

    def record(self, finite: torch.Tensor, step: int) -> None:
        """Count the step numbered `step` (1-based), finite or not."""
        bad = (~finite).long()
        self.skipped_steps += bad
        self.bad_streak_start = torch.where(self.bad_streak == 0, step, self.bad_streak_start)
        self.bad_streak = (self.bad_streak + 1) * bad
        longer = self.bad_streak > self.worst_streak
        self.worst_streak = torch.where(longer, self.bad_streak, self.worst_streak)
        self.worst_streak_start = torch.where(longer, self.bad_streak_start, self.worst_streak_start)

    def log_counts(self) -> list[torch.Tensor]:
        """What a log step reads, as float device scalars: skipped steps, the longest streak since the last log
        step and the step where it began."""
        return [self.skipped_steps.float(), self.worst_streak.float(), self.worst_streak_start.float()]

    def end_window(self, streak: float, streak_start: float) -> str | None:
        """At a log step, given what log_counts read: start the next window's longest streak from the current
        one, and return why the run must stop, or None."""
        self.worst_streak.copy_(self.bad_streak)
        self.worst_streak_start.copy_(self.bad_streak_start)
        if streak < self.max_bad_steps:
            return None
        return (f"stopping: the loss or gradient norm was not finite for {int(streak)} consecutive steps since "
                f"step {int(streak_start)} (each was skipped); lower --lr or check the data")

    def state_dict(self) -> dict:
        """The counters a checkpoint keeps at its top level (besides the open window's, see window())."""
        return {"skipped_steps": int(self.skipped_steps.item()),
                "bad_streak": [int(self.bad_streak.item()), int(self.bad_streak_start.item())]}

    def load_state_dict(self, checkpoint: dict) -> None:
        self.skipped_steps.fill_(checkpoint.get("skipped_steps", 0))
        streak, streak_start = checkpoint.get("bad_streak", (0, 0))
        self.bad_streak.fill_(streak)
        self.bad_streak_start.fill_(streak_start)

    def window(self) -> list[float]:
        """This rank's part of the open log window: the longest streak since the last log step and its start."""
        return [float(self.worst_streak.item()), float(self.worst_streak_start.item())]

    def load_window(self, streak: float, streak_start: float) -> None:
        self.worst_streak.fill_(int(streak))
        self.worst_streak_start.fill_(int(streak_start))
