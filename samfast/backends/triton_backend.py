"""The ``"triton"`` backend: the Triton kernels of ``samfast.kernels``.

On CUDA tensors it runs compiled kernels; with ``TRITON_INTERPRET=1`` set before triton is
imported it runs the same kernels on CPU tensors under Triton's interpreter (slow: for tests).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _import_error() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    try:
        from .. import kernels  # noqa: F401
        from ..kernels import ascent, norm, restore  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - report any import failure as the reason
        return f"importing the Triton kernels failed: {exc}"
    return None


def unavailable_reason(device: torch.device) -> str | None:
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available"
    elif device.type == "cpu":
        if not interpreting():
            return "Triton runs on CPU tensors only under its interpreter (TRITON_INTERPRET=1)"
    else:
        return f"no Triton kernels for {device.type}"
    return _import_error()


class TritonOps:
    """The four kernels of samfast/backends/fused.py, from samfast.kernels."""

    def __init__(self) -> None:
        from ..kernels import ascent, norm, restore
        self.sq_norm = norm.sq_norm
        self.nonfinite = norm.nonfinite
        self.ascent_ = ascent.ascent_
        self.restore_sgd_ = restore.restore_sgd_
