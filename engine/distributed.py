"""Data-parallel training on PyTorch's own distributed stack (torchrun + DDP or FSDP2).

`torchrun --nproc_per_node=N -m engine.train ...` sets RANK, LOCAL_RANK and WORLD_SIZE; `setup()`
then joins the process group (NCCL on GPUs, gloo on CPUs) and pins each rank to its GPU. There is
no communication layer of our own: gradients are all-reduced by DDP (or reduce-scattered by
FSDP), and the few scalars the trainer needs (logged loss, stop requests) go through all_reduce.

Data: every rank draws the same global batch of batch_size x world_size windows from one shared
generator and keeps its own slice, so N ranks with batch b see exactly the data of one process
with batch N*b, and a checkpoint resumes under any world size.
"""
from __future__ import annotations

import atexit
import inspect
import os
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist
import torch.nn as nn

# torch.distributed.checkpoint.state_dict, which the full-state functions below use, is imported inside
# them: it costs about as much as the rest of the engine's start-up (`--help` included) together.


@dataclass(frozen=True)
class Context:
    """Where this process sits in the job: rank 0 of 1 when not launched by torchrun."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _world_size() -> int:
    """The job's process count as torchrun sets it (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device_type: str) -> Context:
    """Join the torchrun job described by the environment (a no-op for a single process)."""
    world_size = _world_size()
    if world_size <= 1:
        return Context()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return Context(rank=rank, local_rank=local_rank, world_size=world_size)


def teardown(context: Context) -> None:
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(status: int) -> NoReturn:
    """End the process with `status`; a rank of a torchrun job without the interpreter's own teardown.

    Why: DDP keeps a C++ reference to the gloo process group, so destroy_process_group() leaves its
    worker threads running. A worker that has just finished the job's last all_reduce drops the work
    (and its Python-made tensors) once it gets the GIL; if the main thread is by then finalizing the
    interpreter, the worker is killed inside a destructor and the process aborts ("terminate called
    without an active exception", SIGABRT) after a run that succeeded: 4 of 116 two-rank CPU runs of
    the toy model did (the CI failure of stop 22), 0 of 100 since. So a worker process runs the atexit
    handlers, flushes its output and leaves with os._exit, which ends the threads without running
    anything on them. Everything the run writes (checkpoint, metrics, run files) is closed before this.
    """
    if _world_size() <= 1:
        sys.exit(status)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def mean_across_ranks(values: torch.Tensor, context: Context) -> torch.Tensor:
    """The element-wise mean of `values` over all ranks (the tensor itself for one process)."""
    if context.enabled:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= context.world_size
    return values


def any_rank(flag: bool, context: Context, device: torch.device) -> bool:
    """True if `flag` is set on any rank: how ranks agree to stop at the same step."""
    if not context.enabled:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather_objects(obj, context: Context) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not context.enabled:
        return [obj]
    gathered: list = [None] * context.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def plain_tensor(value: torch.Tensor) -> torch.Tensor:
    """A regular tensor from a DTensor (e.g. the gradient norm of FSDP-sharded parameters)."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


class LossModule(nn.Module):
    """The model's training objective as a module, so DDP and FSDP hooks see a forward() call."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.model.loss(idx, targets)


def wrap(model: nn.Module, context: Context, device: torch.device, fsdp: bool) -> nn.Module:
    """The module to train: the loss wrapped in DDP, or sharded with FSDP2 (`fully_shard`) per block."""
    objective = LossModule(model)
    if fsdp:
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch < 2.6 keeps FSDP2 under _composable
            from torch.distributed._composable.fsdp import fully_shard
        for block in model.blocks:
            fully_shard(block)
        return fully_shard(objective)
    if not context.enabled:
        return objective
    device_ids = [device.index] if device.type == "cuda" else None
    # No buffer sync before each forward: the only buffer (the sinusoidal table) is the same on every rank.
    # torch 2.13 renamed the switch (and warns on the old name); older versions only know broadcast_buffers.
    ddp = nn.parallel.DistributedDataParallel
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
                      else {"broadcast_buffers": False})
    return ddp(objective, device_ids=device_ids, **no_buffer_sync)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded model and optimizer state keyed by parameter name, the same under DDP, FSDP or
    one process (a collective under FSDP: every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                    optimizer_state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                   options=StateDictOptions(full_state_dict=True))


def load_full_model_state(model: nn.Module, model_state: dict) -> None:
    """Load weights only, leaving a fresh optimizer untouched (no state, no step taken)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True))
