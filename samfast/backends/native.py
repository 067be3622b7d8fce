"""The ``"native"`` backend: the ``samfast._C`` extension (C++ CPU kernels, CUDA C++ kernels).

The extension is built by ``pip install --no-build-isolation .``; where the package was
installed without it (``SAMFAST_NO_EXT=1``, or another torch than the one it was built for),
``SAMFAST_JIT=1`` builds it on first use with ``torch.utils.cpp_extension.load`` (needs ninja
and, for CUDA, nvcc).
"""

from __future__ import annotations

import functools
import glob
import os

import torch


@functools.lru_cache(maxsize=None)
def load_error() -> str | None:
    """None once the ops are registered, else why they are not."""
    try:
        from .. import _C  # noqa: F401  (registers torch.ops.samfast.*)
        _register_fakes()
        return None
    except ImportError as exc:
        error = f"the samfast._C extension is not built ({exc})"
    if os.environ.get("SAMFAST_JIT") != "1":
        return error + "; reinstall with `pip install --no-build-isolation .` or set SAMFAST_JIT=1"
    try:
        _jit_build()
        _register_fakes()
        return None
    except Exception as exc:  # noqa: BLE001 - report any build failure as the reason
        return f"{error}; the JIT build failed: {exc}"


def _register_fakes() -> None:
    """Shape/dtype rules, so the ops trace under torch.compile and FakeTensor."""

    @torch.library.register_fake("samfast::sq_norm")
    def _(g, w, adaptive, eta):
        return g.new_empty((), dtype=torch.float64 if g.dtype == torch.float64 else torch.float32)

    @torch.library.register_fake("samfast::nonfinite")
    def _(g):
        return g.new_empty((), dtype=torch.float32)

    @torch.library.register_fake("samfast::ascent_")
    def _(w, g, backup, scale, skip, adaptive, eta):
        return None

    @torch.library.register_fake("samfast::restore_sgd_")
    def _(w, g, backup, buf, skip, lr, momentum, dampening, weight_decay, nesterov, first):
        return None


def _jit_build() -> None:
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
    if not torch._C._dispatch_has_kernel_for_dispatch_key("samfast::sq_norm", key):
        return f"samfast._C was built without {key} kernels"
    return None


class NativeOps:
    """The four kernels of samfast/backends/fused.py, from the extension."""

    @staticmethod
    def sq_norm(g, w, adaptive, eta):
        return torch.ops.samfast.sq_norm(g, w, adaptive, eta)

    @staticmethod
    def nonfinite(g):
        return torch.ops.samfast.nonfinite(g)

    @staticmethod
    def ascent_(w, g, backup, scale, skip, adaptive, eta):
        torch.ops.samfast.ascent_(w, g, backup, scale, skip, adaptive, eta)

    @staticmethod
    def restore_sgd_(w, g, backup, buf, skip, lr, momentum, dampening, weight_decay, nesterov,
                     first):
        torch.ops.samfast.restore_sgd_(w, g, backup, buf, skip, lr, momentum, dampening,
                                       weight_decay, nesterov, first)
