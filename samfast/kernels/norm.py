"""Reductions: sum of (T(w) g)^2 for SAM's N, and the count of non-finite gradient entries.

Deterministic by construction: each program reduces one fixed block and writes its partial
sum; the partials are then added by one ``torch.sum`` (a single-output reduction whose order
is fixed for a given length). No atomics, so N is bit-identical run to run. The result stays
on the device: no host sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import NUM_WARPS, block_for, constants, grid, upcast


@triton.jit
def _sq_norm_kernel(g_ptr, w_ptr, partial_ptr, n, eta_ptr,
                    ADAPTIVE: tl.constexpr, FP64: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = upcast(tl.load(g_ptr + offs, mask=mask, other=0.0), FP64)
    if ADAPTIVE:
        w = upcast(tl.load(w_ptr + offs, mask=mask, other=0.0), FP64)
        x = x * (tl.abs(w) + upcast(tl.load(eta_ptr), FP64))  # eta: float64 on the device
    tl.store(partial_ptr + pid, tl.sum(x * x, axis=0))


@triton.jit
def _nonfinite_kernel(g_ptr, partial_ptr, n, FP64: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    # fp64 is tested as fp64: cast to fp32, a finite 1e300 would count as inf
    x = upcast(tl.load(g_ptr + offs, mask=mask, other=0.0), FP64)
    # !(|x| < inf) holds exactly for +-inf and NaN (every comparison with NaN is false).
    bad = tl.where(tl.abs(x) < float("inf"), 0.0, 1.0)
    tl.store(partial_ptr + pid, tl.sum(bad, axis=0))


def sq_norm(g: torch.Tensor, w: torch.Tensor, adaptive: bool, eta: float) -> torch.Tensor:
    """sum((T(w) * g)^2) as a 0-d tensor: fp32, fp64 for fp64 buffers."""
    fp64 = g.dtype == torch.float64
    n, block = g.numel(), block_for(g.dtype)
    partial = torch.empty(grid(n, block)[0], dtype=torch.float64 if fp64 else torch.float32,
                          device=g.device)
    _sq_norm_kernel[grid(n, block)](g, w, partial, n, constants(g.device, eta),
                                    ADAPTIVE=adaptive, FP64=fp64, BLOCK=block,
                                    num_warps=NUM_WARPS)
    return partial.sum()


def nonfinite(g: torch.Tensor) -> torch.Tensor:
    """How many entries of g are +-inf or NaN, as a 0-d fp32 tensor."""
    n, block = g.numel(), block_for(g.dtype)
    partial = torch.empty(grid(n, block)[0], dtype=torch.float32, device=g.device)
    _nonfinite_kernel[grid(n, block)](g, partial, n, FP64=g.dtype == torch.float64,
                                      BLOCK=block, num_warps=NUM_WARPS)
    return partial.sum()
