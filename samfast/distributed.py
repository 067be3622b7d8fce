"""SAM under torch.distributed / DistributedDataParallel, with the ascent made explicit.

Two semantics for the ascent (first) pass of a SAM step on R replicas, each with its shard of
the global batch:

* ``"global"`` — the ascent gradient is all-reduced like any other (DDP averages it), so every
  replica perturbs with the same gradient and the same N: identical to single-process SAM on
  the concatenated batch.
* ``"local"`` — m-sharpness (Foret et al.; what the original JAX code does): each replica
  perturbs with its own shard's gradient and its own N; the forward and backward of the ascent
  pass run under ``model.no_sync()`` (no all-reduce at all), and only the descent gradient is
  all-reduced. The replicas' weights stay identical: each restores the same pre-ascent weights
  bit-exactly and applies the same averaged descent gradient.

In both modes the SGD phase of a switch schedule costs one pass and one all-reduce, like plain
DDP training. Skip decisions are the same on every replica: in ``"local"`` mode each
replica's skip flag (its local N is not finite) is all-reduced with MAX on the device before
the ascent uses it (one scalar, no host sync), so a replica that saw an inf does not skip
alone; the descent gradient is the all-reduced one, the same everywhere.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .bn import running_stats_disabled
from .sam import SAM

ASCENTS = ("global", "local")


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP (or the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def _all_replicas_skip(skip: Tensor) -> None:
    """Make a 0-d bool skip flag agree across processes (any replica skips -> all do)."""
    if dist.is_available() and dist.is_initialized():
        flag = skip.to(torch.uint8)  # all-reduce has no MAX for bool on every backend
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        skip.copy_(flag.bool())


def sam_step(model: nn.Module, optimizer: SAM, loss_fn: Callable[[], Tensor],
             ascent: str = "global", grad_scaler=None) -> Tensor:
    """One training step with or without DDP, following ``optimizer.sam_enabled``.

    ``loss_fn()`` runs the forward pass and returns the loss (no ``zero_grad``, no backward:
    this function does those). Returns the first-pass loss, detached. The second pass leaves
    BatchNorm running statistics alone. With fp16 AMP pass a ``torch.amp.GradScaler``: the
    losses are scaled, the gradients unscaled, and ``grad_scaler.update()`` is called.
    """
    if ascent not in ASCENTS:
        raise ValueError(f"Invalid ascent: {ascent!r} (choose from {', '.join(ASCENTS)})")
    ddp = isinstance(model, DistributedDataParallel)
    if ddp and ascent == "local" and grad_scaler is not None:
        raise ValueError("Invalid grad_scaler: fp16 loss scaling with ascent='local' is not "
                         "supported yet (the replicas would have to agree on overflows of "
                         "their own ascent gradients); use bf16 autocast or ascent='global'")

    def backward(loss: Tensor) -> None:
        (grad_scaler.scale(loss) if grad_scaler is not None else loss).backward()

    optimizer.zero_grad()
    if not optimizer.sam_enabled:
        loss = loss_fn()
        backward(loss)
        optimizer.base_step(grad_scaler=grad_scaler)
        if grad_scaler is not None:
            grad_scaler.update()
        return loss.detach()
    local = ddp and ascent == "local"
    with model.no_sync() if local else contextlib.nullcontext():
        loss = loss_fn()
        backward(loss)
    optimizer.first_step(zero_grad=True, grad_scaler=grad_scaler,
                         agree_skip=_all_replicas_skip if local else None)
    try:
        with running_stats_disabled(unwrap(model), enabled=optimizer.perturbed):
            loss2 = loss_fn()
        backward(loss2)
    except BaseException:  # the weights hold w + e: put w back before propagating
        optimizer.abort_step()
        raise
    optimizer.second_step(zero_grad=True, grad_scaler=grad_scaler)
    if grad_scaler is not None:
        grad_scaler.update()
    return loss.detach()
