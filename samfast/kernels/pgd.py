"""One fused PGD step: gradient step, projection onto the eps-ball around x, clip to the box.

L-inf is elementwise (one pass: read x_adv, g, x; write the result). L2 needs two per-example
norms, ||g|| and then ||delta||, so one program handles one example and walks its row three
times (norm of g; norm of the stepped delta; write), all in fp32 — the row of a CIFAR image
(3,072 values) stays in cache between the walks. Same maths as
``samfast.adversarial.pgd_step_reference``, which tests compare against.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import BLOCK, NUM_WARPS, grid

ROW_BLOCK = 1024


@triton.jit
def _linf_kernel(xadv_ptr, g_ptr, x_ptr, out_ptr, n, eps, alpha, lo, hi, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    xa = tl.load(xadv_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sign = tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0))
    v = xa + alpha * sign
    v = tl.minimum(tl.maximum(v, x - eps), x + eps)
    v = tl.minimum(tl.maximum(v, lo), hi)
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _l2_kernel(xadv_ptr, g_ptr, x_ptr, out_ptr, row, eps, alpha, lo, hi,
               ROW_BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    base = pid.to(tl.int64) * row
    acc = tl.zeros((ROW_BLOCK,), dtype=tl.float32)
    for start in range(0, row, ROW_BLOCK):
        offs = start + tl.arange(0, ROW_BLOCK)
        g = tl.load(g_ptr + base + offs, mask=offs < row, other=0.0).to(tl.float32)
        acc += g * g
    g_scale = alpha / tl.maximum(tl.sqrt(tl.sum(acc, axis=0)), 1e-12)
    acc = tl.zeros((ROW_BLOCK,), dtype=tl.float32)
    for start in range(0, row, ROW_BLOCK):
        offs = start + tl.arange(0, ROW_BLOCK)
        m = offs < row
        xa = tl.load(xadv_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        d = xa + g * g_scale - x
        acc += d * d
    factor = tl.minimum(eps / tl.maximum(tl.sqrt(tl.sum(acc, axis=0)), 1e-12), 1.0)
    for start in range(0, row, ROW_BLOCK):
        offs = start + tl.arange(0, ROW_BLOCK)
        m = offs < row
        xa = tl.load(xadv_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        v = x + (xa + g * g_scale - x) * factor
        v = tl.minimum(tl.maximum(v, lo), hi)
        tl.store(out_ptr + base + offs, v.to(out_ptr.dtype.element_ty), mask=m)


def pgd_step(x_adv: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, eps: float,
             alpha: float, norm: str, lo: float, hi: float) -> torch.Tensor:
    x_adv, grad, x = x_adv.contiguous(), grad.contiguous(), x.contiguous()
    out = torch.empty_like(x_adv)
    if norm == "linf":
        n = x_adv.numel()
        _linf_kernel[grid(n)](x_adv, grad, x, out, n, float(eps), float(alpha), float(lo),
                              float(hi), BLOCK=BLOCK, num_warps=NUM_WARPS)
    else:
        row = x_adv[0].numel()
        _l2_kernel[(len(x_adv),)](x_adv, grad, x, out, row, float(eps), float(alpha),
                                  float(lo), float(hi), ROW_BLOCK=ROW_BLOCK, num_warps=4)
    return out
