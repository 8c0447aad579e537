"""What a training run's checkpoint holds, and how a run continues from one exactly where it stopped.

The state is the model and optimizer (full, unsharded), the loss scaler, the step and token counts,
the configs, tokenizer and data fingerprint, the random-number generators, the non-finite guard's
counters and the open log window. Under torchrun gathering it is a collective: every rank gives its
generators and its log window, and rank 0 writes the file (engine/checkpoint.py: atomic save, safe
load). Resumed with the same world size, every rank gets its own streams and window back; with
another, the data order is kept (one generator serves all ranks) and the dropout streams and log
windows start afresh.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from engine import distributed

if TYPE_CHECKING:
    from engine.trainer import Trainer


def run_state(trainer: Trainer) -> dict:
    """Everything a resume needs (a collective under torchrun: every rank must call it)."""
    model_state, optimizer_state = distributed.full_state(trainer.model, trainer.optimizer)
    local_rng = {"torch": torch.get_rng_state()}
    if trainer.device.type == "cuda":
        local_rng["cuda"] = torch.cuda.get_rng_state(trainer.device)
    rng = {"data": trainer.data_generator.get_state(),
           "per_rank": distributed.gather_objects(local_rng, trainer.context)}
    return {
        "model": model_state,
        "optimizer": optimizer_state,
        "scaler": trainer.scaler.state_dict(),
        "step": trainer.step,
        "tokens_seen": trainer.tokens_seen,
        "elapsed": trainer.metrics.elapsed,
        "model_config": trainer.model_config.to_dict(),
        "train_config": trainer.config.to_dict(),
        "tokenizer": trainer.data.tokenizer.to_dict(),
        "data_source": trainer.data.source,
        "data_fingerprint": trainer.data.fingerprint,
        "rng": rng,
        **trainer.guard.state_dict(),
        "log_window": distributed.gather_objects(trainer.metrics.window() + trainer.guard.window(),
                                                 trainer.context),  # one per rank
    }


def restore_run_state(trainer: Trainer, checkpoint: dict) -> None:
    """Continue from `checkpoint` (run_state's dict, or engine.hf's weights-only one); drops the metrics rows
    logged after it."""
    optimizer_state = checkpoint["optimizer"]
    if optimizer_state.get("state"):
        distributed.load_full_state(trainer.model, trainer.optimizer, checkpoint["model"], optimizer_state)
    else:  # a fresh optimizer (e.g. a model imported from Hugging Face): only the weights to load
        distributed.load_full_model_state(trainer.model, checkpoint["model"])
    if checkpoint.get("scaler"):
        trainer.scaler.load_state_dict(checkpoint["scaler"])
    trainer.step = checkpoint["step"]
    trainer.tokens_seen = checkpoint.get("tokens_seen", 0)
    trainer.metrics.elapsed = checkpoint.get("elapsed", 0.0)
    trainer.guard.load_state_dict(checkpoint)
    trainer.data_generator.set_state(checkpoint["rng"]["data"])
    context = trainer.context
    windows = checkpoint.get("log_window", [])
    if len(windows) == context.world_size:  # another world size starts a fresh window
        loss, grad_norm, finite, streak, streak_start = windows[context.rank]
        trainer.metrics.load_window(loss, grad_norm, finite)
        trainer.guard.load_window(streak, streak_start)
    per_rank = checkpoint["rng"].get("per_rank", [])
    if len(per_rank) == context.world_size:  # same world size: every rank continues its own stream
        local = per_rank[context.rank]
        torch.set_rng_state(local["torch"])
        if "cuda" in local and trainer.device.type == "cuda":
            torch.cuda.set_rng_state(local["cuda"], trainer.device)
    else:  # another world size: the data order is unchanged, dropout streams start afresh per rank
        torch.manual_seed(trainer.config.seed + 1000 * trainer.step + context.rank)
    trainer.metrics.truncate(trainer.step)
