"""The training loop: data -> model -> loss -> backward -> optimizer, with evaluation and clean interruption.

The loop delegates to parts of its own: the non-finite-step guard (engine/guard.py), the metrics logger
(engine/metrics.py) and the checkpoint's state (engine/run_state.py). Host syncs: the running loss stays on
the device and is read only at log steps, every `log_interval` steps, so logging never stalls a GPU between
them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from engine import distributed
from engine.allocator import keep_freed_memory
from engine.checkpoint import CHECKPOINT_NAME, save_checkpoint
from engine.config import (DATA, DEVICE, DISTRIBUTED, EVALUATION, OPTIMIZATION, PROFILING, option, parse_duration,
                           require_finite_numbers, require_positive_integers)
from engine.data import BPE_MIN_VOCAB, TOKENIZERS, TokenData, is_tokenizer_file
from engine.distributed import Context
from engine.guard import NonFiniteGuard
from engine.metrics import MetricsLogger
from engine.model import GPT, GPTConfig
from engine.ops.backend import DTYPES
from engine.profiling import StepProfiler, enable_nvtx, nvtx_range
from engine.run_state import restore_run_state, run_state


@dataclass
class TrainConfig:
    """How to train. Every field is also a `python -m engine.train` flag (--batch-size, ...)."""

    data: str | None = option(None, "Text file, folder of .txt/.md files, or nanoGPT folder; default: Shakespeare.",
                              DATA)
    tokenizer: str = option("char", "'char' (one id per character of the corpus), 'byte' (UTF-8 bytes), 'bpe' "
                                    "(byte-level BPE trained on the corpus) or a Hugging Face tokenizer.json file.",
                            DATA)
    bpe_vocab: int = option(8192, "Vocabulary size of --tokenizer bpe (256 bytes + 1 special token + merges).", DATA)
    batch_size: int = option(32, "Sequences per micro-batch.", OPTIMIZATION)
    grad_accum: int = option(1, "Micro-batches accumulated per optimizer step.", OPTIMIZATION)
    max_steps: int = option(2000, "Optimizer steps to train for.", OPTIMIZATION)
    max_time: float | None = option(None, "Stop (and save) after this many seconds; accepts 90, 90s, 15m, 2h.",
                                    OPTIMIZATION, parse=parse_duration, metavar="SECONDS")
    lr: float = option(1e-3, "Peak learning rate.", OPTIMIZATION)
    min_lr: float | None = option(None, "Learning rate at the end of the cosine decay; default lr / 10.",
                                  OPTIMIZATION)
    warmup_steps: int = option(100, "Steps of linear warm-up from 0 to lr.", OPTIMIZATION)
    lr_decay_steps: int | None = option(None, "Step at which the cosine decay reaches min_lr; default max_steps.",
                                        OPTIMIZATION)
    weight_decay: float = option(0.1, "AdamW weight decay (not applied to biases, norms).", OPTIMIZATION)
    beta1: float = option(0.9, "AdamW beta1.", OPTIMIZATION)
    beta2: float = option(0.99, "AdamW beta2.", OPTIMIZATION)
    grad_clip: float = option(1.0, "Clip the global gradient norm to this (0 disables).", OPTIMIZATION)
    eval_interval: int = option(250, "Steps between validation-loss evaluations and checkpoints.", EVALUATION)
    eval_iters: int = option(20, "Batches per validation-loss evaluation.", EVALUATION)
    log_interval: int = option(10, "Steps between metrics.jsonl rows (and log lines without a terminal).",
                               EVALUATION)
    seed: int = option(1337, "Seed for initialization, data sampling and dropout.", OPTIMIZATION)
    backend: str = option("auto", "Kernel backend: auto, reference, torch, ... (see --list-backends).", DEVICE)
    device: str = option("auto", "'auto' (CUDA if present), 'cpu', 'cuda' or 'cuda:N'.", DEVICE)
    dtype: str = option("auto", "'auto' (bf16 autocast on CUDA and on CPUs with native bf16, else fp32), "
                                "'fp32', 'bf16' or 'fp16'.", DEVICE)
    compile: bool = option(False, "Wrap the model in torch.compile.", DEVICE)
    nvtx: bool = option(False, "NVTX ranges for Nsight: forward, backward, optimizer, each layer's attention and "
                               "FFN.", PROFILING)
    profile: bool = option(False, "Write a torch.profiler Chrome trace of steps 2 to 4 to <run folder>/trace.json.",
                           PROFILING)
    tensorboard: bool = option(False, "Mirror metrics.jsonl's scalars (losses, lr, tokens/s, grad norm) to "
                                      "<run folder>/tensorboard; needs the tensorboard package.", EVALUATION)
    sample_tokens: int = option(300, "Tokens of generated text printed at the end (0: none).", EVALUATION)
    fsdp: bool = option(False, "Shard parameters, gradients and optimizer state with FSDP2 (under torchrun).",
                        DISTRIBUTED)
    max_bad_steps: int = option(20, "Stop after this many consecutive steps with a non-finite loss or gradient "
                                    "norm (each is skipped, not applied).", OPTIMIZATION)

    def __post_init__(self) -> None:
        require_finite_numbers(self, ("lr", "min_lr", "weight_decay", "beta1", "beta2", "grad_clip", "max_time"))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        require_positive_integers(self, ("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_iters",
                                         "log_interval", "max_bad_steps"))
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
        if device.type == "cpu":
            keep_freed_memory()  # each step frees and allocates the same activations (engine/allocator.py)

        torch.manual_seed(config.seed)  # the same initial weights on every rank
        self.model = GPT(model_config).to(device)
        self.train_module = distributed.wrap(self.model, context, device, config.fsdp)
        self.optimizer = make_optimizer(self.model, config, device)
        torch.manual_seed(config.seed + context.rank)  # dropout differs across ranks
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        self.data_generator = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.tokens_seen = 0
        self.tokens_per_step = config.batch_size * config.grad_accum * model_config.max_seq_len * context.world_size
        self.grad_norm = torch.zeros((), device=device)  # the last step's gradient norm, before clipping
        self.guard = NonFiniteGuard(device, config.max_bad_steps, distributed=context.enabled)
        self.metrics = MetricsLogger(out_dir, device, context, self.log, self.tokens_per_step,
                                     data.val_tokens_per_char())
        if checkpoint is not None:
            restore_run_state(self, checkpoint)
        # The loss (forward, LM head and cross-entropy) is what each step runs; compile that.
        self.loss_fn = torch.compile(self.train_module) if config.compile else self.train_module

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> dict:
        """Everything a resume needs (a collective under torchrun: every rank must call it)."""
        return run_state(self)

    def save(self) -> None:
        state = self.state()  # every rank takes part in gathering; rank 0 writes
        if self.context.is_main:
            save_checkpoint(state, self.out_dir / CHECKPOINT_NAME)

    # ------------------------------------------------------------------ steps

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _batch(self, split: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data.batch(split, self.config.batch_size, self.model_config.max_seq_len, generator,
                               self.context.rank, self.context.world_size, device=self.device)

    def _gradient_sync(self, enabled: bool):
        """DDP: no_sync() on all but the last micro-step. FSDP2: its own switch for the same thing."""
        if hasattr(self.train_module, "set_requires_gradient_sync"):
            self.train_module.set_requires_gradient_sync(enabled)
        elif not enabled and hasattr(self.train_module, "no_sync"):
            return self.train_module.no_sync()
        return contextlib.nullcontext()

    def _gradient_norm(self) -> torch.Tensor:
        """The global norm of the true gradients (unscaled from fp16 loss scaling), then clipped to grad_clip."""
        self.scaler.unscale_(self.optimizer)  # a no-op without fp16 loss scaling
        if self.config.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        return distributed.plain_tensor(norm)

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over grad_accum micro-batches.

        Returns (loss, finite) on the device: the mean loss (0 for a skipped step) and whether the loss
        and gradient norm were finite. A non-finite step changes no weights and no optimizer state.
        """
        lr = learning_rate(self.step, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if not self.model.training:  # walking every module costs about 0.5 ms, so only after an evaluation
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
        mean_loss = total / self.config.grad_accum
        with nvtx_range("optimizer"):
            self.grad_norm = self._gradient_norm()
            finite = self.guard.is_finite(self.grad_norm, mean_loss)  # stays on the device
            self.guard.skip_unless(finite, self.optimizer, self.scaler)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.guard.record(finite, self.step)
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
        if self.step >= config.max_steps:
            self.log(f"checkpoint is at step {self.step}, max_steps is {config.max_steps}: nothing to train")
            return 0
        run_started = time.perf_counter()
        self.metrics.open(self.step, config.max_steps, config.tensorboard)
        profiler = StepProfiler(self.out_dir / "trace.json", config.profile and self.context.is_main,
                                cuda=self.device.type == "cuda", log=self.metrics.say)
        last_saved_step, stop_reason = self.step, None
        with StopRequest() as stop:
            while self.step < config.max_steps:
                with torch.profiler.record_function("train_step"):
                    loss, finite = self.train_step()
                    self.metrics.add_step(loss, self.grad_norm, finite)
                profiler.step()
                # max_time counts this invocation's training, so a resumed run gets the budget again.
                out_of_time = config.max_time is not None and time.perf_counter() - run_started >= config.max_time
                wants_stop = stop.signal_number is not None or out_of_time
                log_step = self.step % config.log_interval == 0 or self.step == config.max_steps
                if log_step:
                    lr = learning_rate(self.step - 1, config)  # the learning rate of the step just taken
                    stop_reason = self.metrics.log_step(self.step, config.max_steps, lr, self.tokens_seen, self.guard)
                if self.step % config.eval_interval == 0 or self.step == config.max_steps:
                    self._evaluate_and_save()
                    last_saved_step = self.step
                # A single process stops at once (the checkpoint keeps the open log window); under torchrun the
                # ranks agree at log steps.
                if (log_step or wants_stop and not self.context.enabled) and distributed.any_rank(
                        wants_stop or stop_reason is not None, self.context, self.device):
                    break
            self.metrics.add_elapsed()
            profiler.close()
            if self.step != last_saved_step:
                self.save()
            self.metrics.close()
            return self._exit_status(stop.signal_number, stop_reason, out_of_time)

    def _evaluate_and_save(self) -> None:
        with self.metrics.outside_window():  # tokens/s counts training time only
            self.metrics.log_evaluation(self.step, self.evaluate(), self.tokens_seen)
            self.metrics.add_elapsed()
            self.save()

    def _exit_status(self, signal_number: int | None, stop_reason: str | None, out_of_time: bool) -> int:
        """Say why the run stopped before max_steps, if it did, and return the process exit status."""
        if stop_reason is not None:
            self.log(f"{stop_reason}; the checkpoint at step {self.step} holds the last good weights")
            return 1
        if signal_number is not None:
            self.log(f"{signal.Signals(signal_number).name} received: saved the checkpoint at step {self.step}; "
                     f"continue with --resume {self.out_dir}")
            return 128 + signal_number
        if self.step < self.config.max_steps and out_of_time:
            self.log(f"max_time reached at step {self.step}: checkpoint saved; continue with --resume {self.out_dir}")
        return 0

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
