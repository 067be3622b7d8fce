"""The ``"native"`` backend: the ``samfast._C`` extension (C++ CPU kernels, CUDA C++ kernels),
registered as the ``samfast`` implementation of the op contract in ``samfast/ops.py``.

The extension is built by ``pip install --no-build-isolation .``. Where it is missing (installed
with ``SAMFAST_NO_EXT=1``) ``SAMFAST_JIT=1`` builds it on first use with
``torch.utils.cpp_extension.load`` (needs ninja and, for CUDA, nvcc). Where it is present but
fails to load (built against another torch: an ABI mismatch or a missing symbol), the backend
is unavailable and the reason is warned once, never swallowed.
"""

from __future__ import annotations

import functools
import glob
import importlib
import os
import warnings

import torch

NAMESPACE = "samfast"


@functools.lru_cache(maxsize=None)
def load_error() -> str | None:
    """None once the ops are registered, else why they are not."""
    from .. import ops
    ops.define(NAMESPACE)  # the schemas first: the extension registers kernels against them
    try:
        # import_module, not `from .. import _C`: a missing submodule raises
        # ModuleNotFoundError there, but a plain ImportError through `from ... import`
        importlib.import_module(f"{__package__.rpartition('.')[0]}._C")
        return None
    except ModuleNotFoundError as exc:
        error = f"the samfast._C extension is not built ({exc})"
    except ImportError as exc:  # built, but it does not load into this torch
        error = f"the samfast._C extension is built but does not load: {exc}"
        warnings.warn(f"samfast: {error}; the native backend is unavailable (rebuild with "
                      "`pip install --no-build-isolation .` against the installed torch)",
                      RuntimeWarning, stacklevel=3)
        return error
    if os.environ.get("SAMFAST_JIT") != "1":
        return error + "; reinstall with `pip install --no-build-isolation .` or set SAMFAST_JIT=1"
    try:
        _jit_build()
        return None
    except Exception as exc:  # noqa: BLE001 - report any build failure as the reason
        return f"{error}; the JIT build failed: {exc}"


def _jit_build() -> None:
    # As setup.py: torch derives CUDA_HOME from `which nvcc` when it is unset, which a
    # /usr/local/bin/nvcc link points at /usr/local (no lib64/libcudart).
    if not os.environ.get("CUDA_HOME") and os.path.isdir("/usr/local/cuda"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    from torch.utils import cpp_extension

    root = os.path.join(os.path.dirname(__file__), "..", "..", "csrc")
    sources = sorted(glob.glob(os.path.join(root, "*.cpp")))
    sources += sorted(glob.glob(os.path.join(root, "cpu", "*.cpp")))
    if torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None:
        sources += sorted(glob.glob(os.path.join(root, "cuda", "*.cu")))
    if not sources:
        raise RuntimeError(f"no sources under {root}")
    cflags = ["-O3", "-fopenmp", "-fno-wrapv", "-ffp-contract=off",  # why: see setup.py
              "-fno-tree-loop-distribute-patterns"]
    cpp_extension.load("samfast_C_jit", sources, extra_cflags=cflags,
                       extra_ldflags=["-fopenmp"], extra_cuda_cflags=["-O3", "-fmad=false"],
                       is_python_module=False)


def unavailable_reason(device: torch.device) -> str | None:
    error = load_error()
    if error is not None:
        return error
    key = "CUDA" if device.type == "cuda" else "CPU"
    if device.type not in ("cpu", "cuda"):
        return f"no native kernels for {device.type}"
    if device.type == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::sq_norm", key):
        return f"samfast._C was built without {key} kernels"
    return None


def ops():
    """The op namespace (``torch.ops.samfast``)."""
    error = load_error()
    if error is not None:
        raise RuntimeError(error)
    return getattr(torch.ops, NAMESPACE)
