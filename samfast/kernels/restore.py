"""SAM's descent for an SGD base: w <- backup, then torch.optim.SGD's update, in one pass.

Order of operations as torch.optim.SGD:  d = g + wd * w;
buf = started ? momentum * buf + (1 - dampening) * d : d;  d = nesterov ? d + momentum * buf : buf;
w = w - lr * d.  With the device flag ``skip`` set, only the restore happens and the momentum
buffer is not written. ``backup`` may be ``w`` itself: a plain SGD step (the base phase).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import NO_FMA, NUM_WARPS, block_for, constants, grid, to_storage, upcast


@triton.jit
def _restore_sgd_kernel(w_ptr, g_ptr, backup_ptr, buf_ptr, skip_ptr, lr_ptr, started_ptr, n,
                        hyper_ptr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                        FP64: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    skip = tl.load(skip_ptr) != 0
    b0 = tl.load(backup_ptr + offs, mask=mask, other=0.0)
    w0 = upcast(b0, FP64)
    lr = tl.load(lr_ptr)  # float64 on the device, rounded once to opmath as the C++ kernels do
    if not FP64:
        lr = lr.to(tl.float32)
    # hyper: float64 [momentum, dampening, weight_decay], each rounded once to opmath
    d = upcast(tl.load(g_ptr + offs, mask=mask, other=0.0), FP64) + \
        upcast(tl.load(hyper_ptr + 2), FP64) * w0
    if MOMENTUM:
        momentum = upcast(tl.load(hyper_ptr), FP64)
        started = tl.load(started_ptr) != 0
        # a uniform predicate: before the buffer has started it is not read at all
        old = upcast(tl.load(buf_ptr + offs, mask=mask & started, other=0.0), FP64)
        dampening = upcast(tl.load(hyper_ptr + 1), FP64)
        b = tl.where(started, old * momentum + (1 - dampening) * d, d)
        stored = to_storage(b, buf_ptr)
        tl.store(buf_ptr + offs, stored, mask=mask & (skip == 0))
        b = upcast(stored, FP64)  # torch steps with the buffer as stored
        if NESTEROV:
            d = d + momentum * b
        else:
            d = b
    new = to_storage(w0 - lr * d, w_ptr)
    tl.store(w_ptr + offs, tl.where(skip, b0, new), mask=mask)


def restore_sgd_(w: torch.Tensor, g: torch.Tensor, backup: torch.Tensor, buf: torch.Tensor,
                 skip: torch.Tensor, lr: torch.Tensor, momentum: float, dampening: float,
                 weight_decay: float, nesterov: bool, started: torch.Tensor) -> None:
    """``lr``: a one-element float64 tensor, ``skip``/``started`` one-element bool tensors, all
    on w's device (read by the kernel)."""
    n, block = w.numel(), block_for(w.dtype)
    _restore_sgd_kernel[grid(n, block)](
        w, g, backup, buf, skip.view(torch.uint8), lr, started.view(torch.uint8), n,
        constants(w.device, momentum, dampening, weight_decay), MOMENTUM=momentum != 0, NESTEROV=nesterov, FP64=w.dtype == torch.float64,
        BLOCK=block, num_warps=NUM_WARPS, **NO_FMA)
