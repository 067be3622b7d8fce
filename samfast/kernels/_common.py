"""Launch helpers shared by the Triton kernels."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements per program. Memory-bound streams want a few thousand elements per program on a
# GPU; under the CPU interpreter (~0.5 ms per program) fewer, larger programs keep tests fast.
# A thread holds BLOCK / (32 * NUM_WARPS) = 16 elements of each stream in registers, and an fp64
# value takes two registers, so fp64 programs take half as many elements (block_for):
# tests/test_compile.py reports, for restore + SGD with Nesterov momentum on sm_90, 160
# registers per thread at 4096 fp64 elements (one 8-warp program fits an SM's 64K registers)
# and 76 at 2048 (three fit), against 74 for fp32 at 4096.
BLOCK = 4096
NUM_WARPS = 8
# Launch option of the elementwise kernels: no a + b * c -> FMA contraction, so their rounding
# is that of the CPU kernels (-ffp-contract=off), the CUDA kernels (-fmad=false) and the
# reference backend's separate torch ops.
NO_FMA = dict(enable_fp_fusion=False)


def block_for(dtype: torch.dtype) -> int:
    """Elements per program for buffers of ``dtype`` (see BLOCK)."""
    return BLOCK // 2 if dtype == torch.float64 else BLOCK


def grid(n: int, block: int = BLOCK) -> tuple[int]:
    return (triton.cdiv(n, block),)


_CONSTANTS: dict[tuple, torch.Tensor] = {}


def constants(device: torch.device, *values: float) -> torch.Tensor:
    """``values`` as a float64 tensor on ``device``, which a kernel reads and rounds to its
    opmath once, as the C++ kernels round their double arguments. Triton passes Python floats
    as fp32, which would round the hyper-parameters of fp64 buffers (0.9 -> 0.899999976).
    Cached by value (no work per launch) and made by fills, not a copy from the host, which a
    CUDA graph capture would not allow. Entries are kept for the life of the process, since a
    captured graph holds their addresses; even a momentum schedule that changes every step
    for 65,536 steps keeps only ~2 MiB, after which the cache starts over."""
    key = (device, values)
    t = _CONSTANTS.get(key)
    if t is None:
        if len(_CONSTANTS) >= 1 << 16:
            _CONSTANTS.clear()
        t = torch.empty(len(values), dtype=torch.float64, device=device)
        for i, v in enumerate(values):
            t[i].fill_(v)
        _CONSTANTS[key] = t
    return t


# One return per jit function: Triton's code generator requires every return of a function to
# have one type, even under a constexpr condition (two returns, fp64 and fp32, do not compile
# for a GPU; the interpreter does not notice). A constexpr if/else that assigns one variable
# emits only the taken branch.
@triton.jit
def upcast(x, FP64: tl.constexpr):
    """fp16/bf16/fp32 -> fp32, fp64 stays fp64 (the "opmath" type)."""
    if FP64:
        y = x.to(tl.float64)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def to_storage(x, ptr):
    """Round an fp32/fp64 value to the element type of ``ptr`` (round to nearest even).

    bf16 is rounded by hand: Triton's CPU interpreter truncates fp32 -> bf16 (measured: 1 ulp
    off on about half the elements), which biases every update; with the rounding done in
    integer arithmetic the final cast is exact, so interpreter and GPU agree bit for bit.
    """
    if ptr.dtype.element_ty == tl.bfloat16:
        f = x.to(tl.float32)
        bits = f.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        rounded = bits.to(tl.float32, bitcast=True)
        y = tl.where(f != f, f, rounded).to(tl.bfloat16)
    else:
        y = x.to(ptr.dtype.element_ty)
    return y
