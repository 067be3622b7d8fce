"""SAM's ascent: backup <- w; w <- w + scale * T(w)^2 * g, one pass over the flat buffers.

``scale`` (rho / (N + eps), or rho for unnormalized SAM) and ``skip`` (N not finite) are read
from device memory, so the launch needs no host sync; with ``skip`` set the weights are left
as they are (the backup is still written, so the restore is a no-op either way).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import NO_FMA, NUM_WARPS, block_for, constants, grid, to_storage, upcast


@triton.jit
def _ascent_kernel(w_ptr, g_ptr, backup_ptr, scale_ptr, skip_ptr, n, eta_ptr,
                   ADAPTIVE: tl.constexpr, FP64: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    tl.store(backup_ptr + offs, w, mask=mask)
    skip = tl.load(skip_ptr) != 0
    scale = tl.load(scale_ptr)
    wf = upcast(w, FP64)
    e = upcast(tl.load(g_ptr + offs, mask=mask, other=0.0), FP64)
    if ADAPTIVE:
        t = tl.abs(wf) + upcast(tl.load(eta_ptr), FP64)  # eta: float64 on the device
        e = (t * t) * e
    new = to_storage(wf + e * scale, w_ptr)
    tl.store(w_ptr + offs, tl.where(skip, w, new), mask=mask)


def ascent_(w: torch.Tensor, g: torch.Tensor, backup: torch.Tensor, scale: torch.Tensor,
            skip: torch.Tensor, adaptive: bool, eta: float) -> None:
    n, block = w.numel(), block_for(w.dtype)
    _ascent_kernel[grid(n, block)](w, g, backup, scale, skip.view(torch.uint8), n,
                                   constants(w.device, eta), ADAPTIVE=adaptive,
                                   FP64=w.dtype == torch.float64, BLOCK=block,
                                   num_warps=NUM_WARPS, **NO_FMA)
