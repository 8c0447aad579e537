"""The training loop: data -> model -> loss -> backward -> optimizer, with evaluation,
metrics, checkpoints and clean interruption.

Host syncs: the loop keeps the running loss on the device and reads it (`.item()`) only every
`log_interval` steps, so a GPU is never stalled by logging between those points.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from engine import distributed, ops
from engine.checkpoint import CHECKPOINT_NAME, save_checkpoint
from engine.distributed import Context
from engine.data import BPE_MIN_VOCAB, TOKENIZERS, TokenData, is_tokenizer_file
from engine.model import GPT, GPTConfig, option
from engine.ops.backend import DTYPES
from engine.profiling import StepProfiler, enable_nvtx, nvtx_range


@dataclass
class TrainConfig:
    """How to train. Every field is also a `python -m engine.train` flag (--batch-size, ...)."""

    data: str | None = option(None, "Text file, folder of .txt/.md files, or nanoGPT folder; default: Shakespeare.")
    tokenizer: str = option("char", "'char' (one id per character of the corpus), 'byte' (UTF-8 bytes), 'bpe' "
                                    "(byte-level BPE trained on the corpus) or a Hugging Face tokenizer.json file.")
    bpe_vocab: int = option(8192, "Vocabulary size of --tokenizer bpe (256 bytes + 1 special token + merges).")
    batch_size: int = option(32, "Sequences per micro-batch.")
    grad_accum: int = option(1, "Micro-batches accumulated per optimizer step.")
    max_steps: int = option(2000, "Optimizer steps to train for.")
    max_time: float | None = option(None, "Stop (and save) after this many seconds; accepts 90, 90s, 15m, 2h.")
    lr: float = option(1e-3, "Peak learning rate.")
    min_lr: float | None = option(None, "Learning rate at the end of the cosine decay; default lr / 10.")
    warmup_steps: int = option(100, "Steps of linear warm-up from 0 to lr.")
    lr_decay_steps: int | None = option(None, "Step at which the cosine decay reaches min_lr; default max_steps.")
    weight_decay: float = option(0.1, "AdamW weight decay (not applied to biases, norms).")
    beta1: float = option(0.9, "AdamW beta1.")
    beta2: float = option(0.99, "AdamW beta2.")
    grad_clip: float = option(1.0, "Clip the global gradient norm to this (0 disables).")
    eval_interval: int = option(250, "Steps between validation-loss evaluations and checkpoints.")
    eval_iters: int = option(20, "Batches per validation-loss evaluation.")
    log_interval: int = option(10, "Steps between metrics.jsonl rows (and log lines without a terminal).")
    seed: int = option(1337, "Seed for initialization, data sampling and dropout.")
    backend: str = option("auto", "Kernel backend: auto, reference, torch, ... (see --list-backends).")
    device: str = option("auto", "'auto' (CUDA if present), 'cpu', 'cuda' or 'cuda:N'.")
    dtype: str = option("auto", "'auto' (bf16 autocast on CUDA and on CPUs with native bf16, else fp32), "
                                "'fp32', 'bf16' or 'fp16'.")
    compile: bool = option(False, "Wrap the model in torch.compile.")
    nvtx: bool = option(False, "NVTX ranges for Nsight: forward, backward, optimizer, each layer's attention and FFN.")
    profile: bool = option(False, "Write a torch.profiler Chrome trace of steps 2 to 4 to <run folder>/trace.json.")
    tensorboard: bool = option(False, "Mirror metrics.jsonl's scalars (losses, lr, tokens/s, grad norm) to "
                                      "<run folder>/tensorboard; needs the tensorboard package.")
    sample_tokens: int = option(300, "Tokens of generated text printed at the end (0: none).")
    fsdp: bool = option(False, "Shard parameters, gradients and optimizer state with FSDP2 (under torchrun).")
    max_bad_steps: int = option(20, "Stop after this many consecutive steps with a non-finite loss or gradient "
                                    "norm (each is skipped, not applied).")

    def __post_init__(self) -> None:
        # First, so that nan and inf, which compare false with everything, are named as such.
        for name in ("lr", "min_lr", "weight_decay", "beta1", "beta2", "grad_clip", "max_time"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        positive = ("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_iters", "log_interval",
                    "max_bad_steps")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "sample_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        if self.lr_decay_steps is not None and self.lr_decay_steps < 1:
            raise ValueError(f"lr_decay_steps must be positive, got {self.lr_decay_steps}")
        if self.max_time is not None and not self.max_time > 0:
            raise ValueError(f"max_time must be positive, got {self.max_time}")
        for name in ("weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.tokenizer not in TOKENIZERS and not is_tokenizer_file(self.tokenizer):
            raise ValueError(f"tokenizer must be one of {TOKENIZERS} or a tokenizer.json file, got {self.tokenizer!r}")
        if isinstance(self.bpe_vocab, bool) or not isinstance(self.bpe_vocab, int) or self.bpe_vocab < BPE_MIN_VOCAB:
            raise ValueError(f"bpe_vocab must be an integer >= {BPE_MIN_VOCAB} (256 bytes and <|endoftext|>), "
                             f"got {self.bpe_vocab!r}")
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ValueError("tensorboard logging was requested but the tensorboard package is not installed "
                             "(pip install tensorboard)")
        if self.dtype not in ("auto", *DTYPES):
            raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {self.dtype!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up to lr over warmup_steps, then cosine decay to min_lr at lr_decay_steps."""
    min_lr = config.lr / 10 if config.min_lr is None else config.min_lr
    decay_steps = config.lr_decay_steps or config.max_steps
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if step >= decay_steps:
        return min_lr
    progress = (step - config.warmup_steps) / max(1, decay_steps - config.warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.lr - min_lr)


def bits_per_char(loss_per_token: float, tokens_per_char: float | None) -> float | None:
    """A loss in nats per token -> bits per character: / ln 2 turns nats into bits, * tokens per
    character spreads each token's bits over the characters it spells."""
    if tokens_per_char is None or not math.isfinite(loss_per_token):
        return None
    return loss_per_token / math.log(2) * tokens_per_char


def make_optimizer(model: GPT, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases and LayerNorm parameters).

    The fused implementation (CPU and CUDA) is used: it is the fastest, and it can skip a step on the
    device through its `found_inf` tensor, which is how non-finite steps are dropped without a host sync.
    """
    parameters = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in parameters if p.dim() >= 2]
    no_decay = [p for p in parameters if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        groups, lr=config.lr, betas=(config.beta1, config.beta2), fused=device.type in ("cpu", "cuda")
    )


class StopRequest:
    """Turns the first SIGINT/SIGTERM into a flag the loop checks between steps; a second one kills."""

    def __init__(self) -> None:
        self.signal_number: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signal_number, frame) -> None:
        if self.signal_number is not None:
            signal.signal(signal_number, signal.SIG_DFL)
            os.kill(os.getpid(), signal_number)
        self.signal_number = signal_number

    def __enter__(self) -> "StopRequest":
        for number in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: leave handlers alone
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)


def _row_step(line: str) -> float:
    """The step of a metrics.jsonl line; a line torn by a crash mid-write counts as after any step."""
    try:
        return json.loads(line).get("step", 0)
    except ValueError:
        return float("inf")


class Trainer:
    """Owns the model, optimizer, data and run folder; `run()` trains and returns an exit status."""

    def __init__(self, model_config: GPTConfig, config: TrainConfig, data: TokenData, out_dir: Path,
                 device: torch.device, dtype: torch.dtype, checkpoint: dict | None = None,
                 log=print, context: Context = Context()) -> None:
        self.model_config = model_config
        self.config = config
        self.data = data
        self.out_dir = out_dir
        self.device = device
        self.dtype = dtype
        self.context = context
        self.log = log if context.is_main else (lambda *args, **kwargs: None)
        enable_nvtx(config.nvtx)

        torch.manual_seed(config.seed)  # the same initial weights on every rank
        self.model = GPT(model_config).to(device)
        self.train_module = distributed.wrap(self.model, context, device, config.fsdp)
        self.optimizer = make_optimizer(self.model, config, device)
        torch.manual_seed(config.seed + context.rank)  # dropout differs across ranks
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        self.data_generator = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.tokens_seen = 0
        self.elapsed = 0.0
        self.grad_norm = torch.zeros((), device=device)  # the last step's gradient norm, before clipping
        # Non-finite steps, counted on the device and read at log intervals: the total skipped, the
        # current run of consecutive ones and the step where it began, and the longest run since the
        # last log step.
        self.skipped_steps = torch.zeros((), dtype=torch.long, device=device)
        self.bad_streak = torch.zeros((), dtype=torch.long, device=device)
        self.bad_streak_start = torch.zeros((), dtype=torch.long, device=device)
        self.worst_streak = torch.zeros((), dtype=torch.long, device=device)
        self.worst_streak_start = torch.zeros((), dtype=torch.long, device=device)
        # The open log window (sums since the last metrics row, on the device). Checkpoints keep it, so a run
        # stopped and resumed between two log steps writes the rows an uninterrupted run writes.
        self.running_loss = torch.zeros((), device=device)
        self.running_grad_norm = torch.zeros((), device=device)
        self.finite_steps = torch.zeros((), device=device)
        if checkpoint is not None:
            self._restore(checkpoint)
        # The loss (forward, LM head and cross-entropy) is what each step runs; compile that.
        self.loss_fn = torch.compile(self.train_module) if config.compile else self.train_module
        self.tokens_per_step = config.batch_size * config.grad_accum * model_config.max_seq_len * context.world_size
        self.metrics_path = out_dir / "metrics.jsonl"
        # Converts the validation loss (nats per token) to bits per character; None for opaque ids.
        self.val_tokens_per_char = data.val_tokens_per_char()
        self.tensorboard = None  # a SummaryWriter while run() trains with config.tensorboard

    # ------------------------------------------------------------------ state

    def state(self) -> dict:
        """Everything a resume needs (a collective under torchrun: every rank must call it)."""
        model_state, optimizer_state = distributed.full_state(self.model, self.optimizer)
        local_rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            local_rng["cuda"] = torch.cuda.get_rng_state(self.device)
        rng = {"data": self.data_generator.get_state(), "per_rank": distributed.gather_objects(local_rng, self.context)}
        return {
            "model": model_state,
            "optimizer": optimizer_state,
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "elapsed": self.elapsed,
            "model_config": self.model_config.to_dict(),
            "train_config": self.config.to_dict(),
            "tokenizer": self.data.tokenizer.to_dict(),
            "data_source": self.data.source,
            "data_fingerprint": self.data.fingerprint,
            "rng": rng,
            "skipped_steps": int(self.skipped_steps.item()),
            "bad_streak": [int(self.bad_streak.item()), int(self.bad_streak_start.item())],
            "log_window": distributed.gather_objects(self._log_window(), self.context),  # one per rank
        }

    def _log_window(self) -> list[float]:
        """This rank's open log window as plain numbers (exact: float32 values fit a Python float)."""
        return [self.running_loss.item(), self.running_grad_norm.item(), self.finite_steps.item(),
                float(self.worst_streak.item()), float(self.worst_streak_start.item())]

    def _restore(self, checkpoint: dict) -> None:
        optimizer_state = checkpoint["optimizer"]
        if optimizer_state.get("state"):
            distributed.load_full_state(self.model, self.optimizer, checkpoint["model"], optimizer_state)
        else:  # a fresh optimizer (e.g. a model imported from Hugging Face): only the weights to load
            distributed.load_full_model_state(self.model, checkpoint["model"])
        if checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.step = checkpoint["step"]
        self.tokens_seen = checkpoint.get("tokens_seen", 0)
        self.elapsed = checkpoint.get("elapsed", 0.0)
        self.skipped_steps.fill_(checkpoint.get("skipped_steps", 0))
        streak, streak_start = checkpoint.get("bad_streak", (0, 0))
        self.bad_streak.fill_(streak)
        self.bad_streak_start.fill_(streak_start)
        self.data_generator.set_state(checkpoint["rng"]["data"])
        windows = checkpoint.get("log_window", [])
        if len(windows) == self.context.world_size:  # another world size starts a fresh window
            loss, grad_norm, finite, streak, streak_start = windows[self.context.rank]
            self.running_loss.fill_(loss)
            self.running_grad_norm.fill_(grad_norm)
            self.finite_steps.fill_(finite)
            self.worst_streak.fill_(int(streak))
            self.worst_streak_start.fill_(int(streak_start))
        per_rank = checkpoint["rng"].get("per_rank", [])
        if len(per_rank) == self.context.world_size:  # same world size: every rank continues its own stream
            local = per_rank[self.context.rank]
            torch.set_rng_state(local["torch"])
            if "cuda" in local and self.device.type == "cuda":
                torch.cuda.set_rng_state(local["cuda"], self.device)
        else:  # another world size: the data order is unchanged, dropout streams start afresh per rank
            torch.manual_seed(self.config.seed + 1000 * self.step + self.context.rank)
        if self.context.is_main:
            self._truncate_metrics(self.step)

    def save(self) -> None:
        state = self.state()  # every rank takes part in gathering; rank 0 writes
        if self.context.is_main:
            save_checkpoint(state, self.out_dir / CHECKPOINT_NAME)

    def _truncate_metrics(self, step: int) -> None:
        """Drop metrics rows logged after the checkpoint we resume from (they will be logged again)."""
        path = self.out_dir / "metrics.jsonl"
        if not path.exists():
            return
        rows = [line for line in path.read_text().splitlines() if line.strip()]
        kept = [line for line in rows if _row_step(line) <= step]
        if len(kept) != len(rows):
            temporary = path.with_name(".metrics.jsonl.tmp")
            temporary.write_text("".join(line + "\n" for line in kept))
            os.replace(temporary, path)

    def _write_metrics(self, row: dict) -> None:
        """Append a row to metrics.jsonl (the record of the run) and mirror it to TensorBoard if enabled."""
        if not self.context.is_main:
            return
        # JSON has no NaN or Infinity: a non-finite value (an evaluation that overflowed) is written as null.
        row = {name: None if isinstance(value, float) and not math.isfinite(value) else value
               for name, value in row.items()}
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(row, allow_nan=False) + "\n")
        if self.tensorboard is not None:
            for name, value in row.items():
                if name != "step" and value is not None:
                    self.tensorboard.add_scalar(name, value, row["step"])

    # ------------------------------------------------------------------ steps

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _batch(self, split: str, generator: torch.Generator):
        windows = self.data.windows(split, self.config.batch_size, self.model_config.max_seq_len, generator,
                                    self.context.rank, self.context.world_size)  # (B, T + 1)
        if self.device.type == "cuda":  # one pinned, asynchronous copy; inputs and targets are views of it
            windows = windows.pin_memory().to(self.device, non_blocking=True)
        return windows[:, :-1], windows[:, 1:]

    def _gradient_sync(self, enabled: bool):
        """DDP: no_sync() on all but the last micro-step. FSDP2: its own switch for the same thing."""
        if hasattr(self.train_module, "set_requires_gradient_sync"):
            self.train_module.set_requires_gradient_sync(enabled)
        elif not enabled and hasattr(self.train_module, "no_sync"):
            return self.train_module.no_sync()
        return contextlib.nullcontext()

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over grad_accum micro-batches.

        Returns (loss, finite) on the device: the mean loss (0 for a skipped step) and whether the loss
        and gradient norm were finite. A non-finite step changes no weights and no optimizer state.
        """
        lr = learning_rate(self.step, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        total = torch.zeros((), device=self.device)
        for micro_step in range(self.config.grad_accum):
            x, y = self._batch("train", self.data_generator)
            # Under DDP gradients are all-reduced on the last micro-step only.
            last = micro_step == self.config.grad_accum - 1
            with self._gradient_sync(last):
                with nvtx_range("forward"), self.autocast():
                    loss = self.loss_fn(x, y)
                with nvtx_range("backward"):
                    self.scaler.scale(loss / self.config.grad_accum).backward()
            total += loss.detach()
        with nvtx_range("optimizer"):
            self.scaler.unscale_(self.optimizer)  # a no-op without fp16 loss scaling; the norm is of true gradients
            if self.config.grad_clip > 0:
                self.grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
            else:
                self.grad_norm = torch.nn.utils.get_total_norm(
                    [p.grad for p in self.model.parameters() if p.grad is not None])
            self.grad_norm = distributed.plain_tensor(self.grad_norm)
            mean_loss = total / self.config.grad_accum
            # Stays on the device. Under torchrun only the gradient norm decides: it is global (the
            # gradients are reduced), so every rank skips the same steps; a non-finite local loss
            # gives non-finite gradients anyway.
            finite = torch.isfinite(self.grad_norm)
            if not self.context.enabled:
                finite = finite & torch.isfinite(mean_loss)
            if not self.scaler.is_enabled():
                # The fused AdamW skips its update where found_inf is 1, on the device: no host sync.
                # (With fp16, GradScaler does the same for its own inf checks.)
                self.optimizer.found_inf = (~finite).float()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
        bad = (~finite).long()
        self.skipped_steps += bad
        self.bad_streak_start = torch.where(self.bad_streak == 0, self.step + 1, self.bad_streak_start)
        self.bad_streak = (self.bad_streak + 1) * bad
        # The longest streak since the last log step, so a streak that ended between two log
        # steps is still seen there.
        longer = self.bad_streak > self.worst_streak
        self.worst_streak = torch.where(longer, self.bad_streak, self.worst_streak)
        self.worst_streak_start = torch.where(longer, self.bad_streak_start, self.worst_streak_start)
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        return torch.where(finite, mean_loss, torch.zeros_like(mean_loss)), finite

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over eval_iters batches of each split, from a fixed generator (same batches each time)."""
        self.model.eval()
        means = []
        for split in ("train", "val"):
            generator = torch.Generator().manual_seed(self.config.seed + 1)
            losses = torch.zeros(self.config.eval_iters, device=self.device)
            for i in range(self.config.eval_iters):
                x, y = self._batch(split, generator)
                with self.autocast():
                    losses[i] = self.train_module(x, y)
            means.append(losses.mean())
        self.model.train()
        train, val = distributed.mean_across_ranks(torch.stack(means), self.context).tolist()
        return {"train": train, "val": val}

    # ------------------------------------------------------------------ loop

    def run(self) -> int:
        """Train until max_steps, max_time or a signal; returns the process exit status."""
        config = self.config
        start_step = self.step
        if start_step >= config.max_steps:
            self.log(f"checkpoint is at step {start_step}, max_steps is {config.max_steps}: nothing to train")
            return 0
        interactive = sys.stderr.isatty() and self.context.is_main
        progress = tqdm(total=config.max_steps, initial=start_step, disable=not interactive, unit="step",
                        dynamic_ncols=True, leave=True)
        started = run_started = time.perf_counter()
        window_start, window_steps = started, 0
        out_of_time = False
        # Updated in place, so that checkpoints (state()) hold the open window.
        running_loss, running_grad_norm, finite_steps = self.running_loss, self.running_grad_norm, self.finite_steps
        stop_reason = None
        if config.tensorboard and self.context.is_main:
            from torch.utils.tensorboard import SummaryWriter  # optional dependency, imported only when asked for
            # purge_step drops events a previous attempt logged after the checkpoint we resume from.
            self.tensorboard = SummaryWriter(self.out_dir / "tensorboard", purge_step=start_step or None)
        say = progress.write if interactive else self.log  # a line that does not break the progress bar
        profiler = StepProfiler(self.out_dir / "trace.json", config.profile and self.context.is_main,
                                cuda=self.device.type == "cuda", log=say)
        last_saved_step = start_step
        exit_status = 0
        with StopRequest() as stop:
            while self.step < config.max_steps:
                with torch.profiler.record_function("train_step"):
                    loss, finite = self.train_step()
                    running_loss += loss
                    running_grad_norm += torch.where(finite, self.grad_norm, torch.zeros_like(self.grad_norm))
                    finite_steps += finite
                profiler.step()
                window_steps += 1
                progress.update(1)
                # max_time counts this invocation's training, so a resumed run gets the budget again.
                out_of_time = config.max_time is not None and time.perf_counter() - run_started >= config.max_time
                wants_stop = stop.signal_number is not None or out_of_time
                log_step = self.step % config.log_interval == 0 or self.step == config.max_steps
                # A single process stops at once (the checkpoint keeps the open log window); under torchrun
                # the ranks agree at log steps.
                check_stop = log_step or (wants_stop and not self.context.enabled)
                if log_step:
                    # The one host sync per log interval (and, under torchrun, one all_reduce).
                    sums = distributed.mean_across_ranks(torch.stack([running_loss, running_grad_norm]), self.context)
                    counts = torch.stack([finite_steps, self.skipped_steps.float(), self.worst_streak.float(),
                                          self.worst_streak_start.float()])
                    (loss_sum, grad_norm_sum), (good, skipped, streak, streak_start) = sums.tolist(), counts.tolist()
                    now = time.perf_counter()  # after the sync: the window's GPU work is done
                    loss = loss_sum / good if good else None  # None (JSON null) when every step was skipped
                    grad_norm = grad_norm_sum / good if good else None
                    tokens_per_s = window_steps * self.tokens_per_step / max(now - window_start, 1e-9)
                    row = {"step": self.step, "loss": loss, "lr": learning_rate(self.step - 1, config),
                           "tokens_per_s": tokens_per_s, "tokens": self.tokens_seen,
                           "elapsed_s": self.elapsed + now - started, "grad_norm": grad_norm,
                           "skipped_steps": int(skipped)}
                    self.worst_streak.copy_(self.bad_streak)
                    self.worst_streak_start.copy_(self.bad_streak_start)
                    if streak >= config.max_bad_steps:
                        stop_reason = (f"stopping: the loss or gradient norm was not finite for {int(streak)} "
                                       f"consecutive steps since step {int(streak_start)} (each was skipped); "
                                       f"lower --lr or check the data")
                    self._write_metrics(row)
                    shown = "skipped" if loss is None else f"{loss:.4f}"
                    progress.set_postfix(loss=shown, lr=f"{row['lr']:.2e}", tok_s=f"{tokens_per_s:,.0f}")
                    if not interactive:
                        self.log(f"step {self.step}/{config.max_steps} | loss {shown} | lr {row['lr']:.2e} | "
                                 f"{tokens_per_s:,.0f} tok/s")
                    running_loss.zero_()
                    running_grad_norm.zero_()
                    finite_steps.zero_()
                    window_start, window_steps = time.perf_counter(), 0
                if self.step % config.eval_interval == 0 or self.step == config.max_steps:
                    eval_started = time.perf_counter()
                    losses = self.evaluate()
                    val_bpc = bits_per_char(losses["val"], self.val_tokens_per_char)
                    self._write_metrics({"step": self.step, "train_loss": losses["train"], "val_loss": losses["val"],
                                         "val_bits_per_char": val_bpc, "tokens": self.tokens_seen})
                    shown_bpc = "" if val_bpc is None else f" ({val_bpc:.3f} bits/char)"
                    say(f"step {self.step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}{shown_bpc}")
                    self.elapsed += time.perf_counter() - started
                    started = time.perf_counter()
                    self.save()
                    last_saved_step = self.step
                    window_start += time.perf_counter() - eval_started  # tokens/s counts training time only
                stopping = wants_stop or stop_reason is not None
                if check_stop and distributed.any_rank(stopping, self.context, self.device):
                    break
            self.elapsed += time.perf_counter() - started
            profiler.close()
            if self.step != last_saved_step:
                self.save()
            progress.close()
            if self.tensorboard is not None:
                self.tensorboard.close()
                self.tensorboard = None
            if stop_reason is not None:
                self.log(f"{stop_reason}; the checkpoint at step {self.step} holds the last good weights")
                exit_status = 1
            elif stop.signal_number is not None:
                name = signal.Signals(stop.signal_number).name
                self.log(f"{name} received: saved the checkpoint at step {self.step}; "
                         f"continue with --resume {self.out_dir}")
                exit_status = 128 + stop.signal_number
            elif self.step < config.max_steps and out_of_time:
                self.log(f"max_time reached at step {self.step}: checkpoint saved; continue with --resume {self.out_dir}")
        return exit_status

    def sample(self, num_tokens: int, temperature: float = 0.8, top_k: int | None = 40) -> str:
        """Generate text from a newline (or token 0) prompt with the run's seed."""
        tokenizer = self.data.tokenizer
        start = tokenizer.encode("\n") if getattr(tokenizer, "kind", "") in ("char", "byte", "bpe") and (
            tokenizer.kind != "char" or "\n" in tokenizer.chars) else [0]
        idx = torch.tensor([start], dtype=torch.long, device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(self.config.seed)
        self.model.eval()
        with self.autocast():
            out = self.model.generate(idx, num_tokens, temperature=temperature, top_k=top_k, generator=generator)
        return tokenizer.decode(out[0, len(start):].tolist())


def describe_backends(device_type: str, dropout: bool = False) -> str:
    """Resolve every op for the device now (so the first training step, possibly under torch.compile,
    finds them resolved) and name the backend of each, for the start-up banner."""
    parts = []
    for op in ("attention", "ffn", "layer_norm", "linear_cross_entropy"):
        with_dropout = dropout and op in ("attention", "ffn")
        ops.resolve(op, device_type, dropout=with_dropout)
        parts.append(f"{op}={ops.resolve_name(op, device_type, dropout=with_dropout)}")
    return ", ".join(parts)
