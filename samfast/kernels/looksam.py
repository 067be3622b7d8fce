"""LookSAM's ops over the flat buffers (Liu et al., CVPR 2022; see samfast/policies.py).

* ``looksam_dots(g, gs)``: [sum g * gs, sum g^2] in one read of both streams;
* ``looksam_project_(gv, gs, coef, skip)``: gv <- gs - coef * gv (gv holds g on entry: the
  component of the SAM gradient gs orthogonal to g) and the sum of squares of the stored
  result, in one pass (read gv, gs; write gv);
* ``looksam_reuse_(g, gv, coef, skip)``: g <- g + coef * gv (read g, gv; write g).

Reductions as in norm.py: each program writes its block's partial sums, which one
``torch.sum`` adds (no atomics: deterministic). ``coef`` and ``skip`` are read on the device
(no host sync); with ``skip`` set nothing is written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import NO_FMA, NUM_WARPS, block_for, grid, to_storage, upcast


@triton.jit
def _looksam_dots_kernel(g_ptr, gs_ptr, partial_ptr, n, FP64: tl.constexpr,
                         BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = upcast(tl.load(g_ptr + offs, mask=mask, other=0.0), FP64)
    gs = upcast(tl.load(gs_ptr + offs, mask=mask, other=0.0), FP64)
    # partial sums: [dot of program 0..P-1, then squares of program 0..P-1]
    tl.store(partial_ptr + pid, tl.sum(g * gs, axis=0))
    tl.store(partial_ptr + tl.num_programs(0) + pid, tl.sum(g * g, axis=0))


@triton.jit
def _looksam_project_kernel(gv_ptr, gs_ptr, coef_ptr, skip_ptr, partial_ptr, n,
                            FP64: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    skip = tl.load(skip_ptr) != 0
    coef = tl.load(coef_ptr)
    gv = tl.load(gv_ptr + offs, mask=mask, other=0.0)
    gs = upcast(tl.load(gs_ptr + offs, mask=mask, other=0.0), FP64)
    stored = tl.where(skip, gv, to_storage(gs - coef * upcast(gv, FP64), gv_ptr))
    tl.store(gv_ptr + offs, stored, mask=mask & (skip == 0))
    x = upcast(stored, FP64)  # the squares of the values as stored
    tl.store(partial_ptr + pid, tl.sum(x * x, axis=0))


@triton.jit
def _looksam_reuse_kernel(g_ptr, gv_ptr, coef_ptr, skip_ptr, n, FP64: tl.constexpr,
                          BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    skip = tl.load(skip_ptr) != 0
    coef = tl.load(coef_ptr)
    g = upcast(tl.load(g_ptr + offs, mask=mask, other=0.0), FP64)
    gv = upcast(tl.load(gv_ptr + offs, mask=mask, other=0.0), FP64)
    tl.store(g_ptr + offs, to_storage(g + coef * gv, g_ptr), mask=mask & (skip == 0))


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def looksam_dots(g: torch.Tensor, gs: torch.Tensor) -> torch.Tensor:
    """[sum(g * gs), sum(g * g)] as a 1-D tensor of 2 (fp32; fp64 for fp64 buffers)."""
    n, block = g.numel(), block_for(g.dtype)
    programs = grid(n, block)[0]
    partial = torch.empty(2, programs, dtype=_acc(g), device=g.device)
    _looksam_dots_kernel[(programs,)](g, gs, partial, n, FP64=g.dtype == torch.float64,
                                      BLOCK=block, num_warps=NUM_WARPS)
    return partial.sum(dim=1)


def looksam_project_(gv: torch.Tensor, gs: torch.Tensor, coef: torch.Tensor,
                     skip: torch.Tensor) -> torch.Tensor:
    """gv <- gs - coef * gv unless ``skip``; returns sum(gv^2) of gv as it then is."""
    n, block = gv.numel(), block_for(gv.dtype)
    programs = grid(n, block)[0]
    partial = torch.empty(programs, dtype=_acc(gv), device=gv.device)
    _looksam_project_kernel[(programs,)](gv, gs, coef, skip.view(torch.uint8), partial, n,
                                         FP64=gv.dtype == torch.float64, BLOCK=block,
                                         num_warps=NUM_WARPS, **NO_FMA)
    return partial.sum()


def looksam_reuse_(g: torch.Tensor, gv: torch.Tensor, coef: torch.Tensor,
                   skip: torch.Tensor) -> None:
    """g <- g + coef * gv unless ``skip``."""
    n, block = g.numel(), block_for(g.dtype)
    _looksam_reuse_kernel[grid(n, block)](g, gv, coef, skip.view(torch.uint8), n,
                                          FP64=g.dtype == torch.float64, BLOCK=block,
                                          num_warps=NUM_WARPS, **NO_FMA)
