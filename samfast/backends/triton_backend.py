"""The ``"triton"`` backend: the Triton kernels of ``samfast.kernels``, registered as the
``samfast_triton`` implementation of the op contract in ``samfast/ops.py``.

On CUDA tensors they run compiled kernels; with ``TRITON_INTERPRET=1`` set before triton is
imported they run on CPU tensors under Triton's interpreter (slow: for tests).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

NAMESPACE = "samfast_triton"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _on_device(launch):
    """Launch under the tensors' own CUDA device: Triton launches on the current device, so a
    param on cuda:1 with cuda:0 current would otherwise be read at the wrong address."""
    @functools.wraps(launch)
    def guarded(first, *args):
        if first.is_cuda:
            with torch.cuda.device(first.device):
                return launch(first, *args)
        return launch(first, *args)
    return guarded


@functools.lru_cache(maxsize=None)
def _import_error() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    try:
        _register()
    except Exception as exc:  # noqa: BLE001 - report any import failure as the reason
        return f"importing the Triton kernels failed: {type(exc).__name__}: {exc}"
    return None


def _register() -> None:
    from .. import ops
    from ..kernels import ascent, looksam, norm, pgd, restore

    lib = ops.define(NAMESPACE, ops.STEP_OPS + ("pgd_step",))
    impls = {"sq_norm": norm.sq_norm, "nonfinite": norm.nonfinite, "ascent_": ascent.ascent_,
             "restore_sgd_": restore.restore_sgd_, "looksam_dots": looksam.looksam_dots,
             "looksam_project_": looksam.looksam_project_,
             "looksam_reuse_": looksam.looksam_reuse_, "pgd_step": pgd.pgd_step}
    keys = ["CUDA"] + (["CPU"] if interpreting() else [])
    for name, fn in impls.items():
        for key in keys:
            lib.impl(name, _on_device(fn), key)


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


def ops():
    """The op namespace (``torch.ops.samfast_triton``), registering it on first use."""
    error = _import_error()
    if error is not None:
        raise RuntimeError(error)
    return getattr(torch.ops, NAMESPACE)
