"""Backend registry: which implementations of the SAM step exist, and which one ``"auto"`` picks.

A backend implements ``bind(optimizer)``, ``add_group(index)``, ``zero_grad(set_to_none)`` and
``first_step / second_step / base_step``, each returning whether the step was skipped (a bool,
or a device flag on CUDA). :class:`samfast.SAM` owns the API, the validation and the step state
machine; a backend owns the arithmetic and the memory layout.

| backend     | devices                         | what it is                                   |
|-------------|---------------------------------|----------------------------------------------|
| reference   | any                             | pure PyTorch on the model's tensors: the spec |
| native      | CPU, CUDA (samfast._C built)    | C++ / CUDA C++ kernels over flat buffers     |
| triton      | CUDA; CPU under TRITON_INTERPRET | Triton kernels over flat buffers             |
"""

from __future__ import annotations

import torch

from . import native, triton_backend
from .reference import ReferenceBackend

_ALL = ("reference", "native", "triton")
# "auto": fastest first, per device type. CPU: the C++ kernels (the interpreter is for tests
# only). CUDA: native until bench/gpu_check.sh has measured Triton against it on a GPU.
_PREFERENCE = {"cpu": ["native", "reference"], "cuda": ["native", "triton", "reference"]}


def _unavailable_reason(name: str, device: torch.device) -> str | None:
    """None when ``name`` can run on ``device``, else why not."""
    if name == "reference":
        return None
    if name == "native":
        return native.unavailable_reason(device)
    if name == "triton":
        return triton_backend.unavailable_reason(device)
    return f"unknown backend {name!r} (known: {', '.join(_ALL)})"


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Backends usable for parameters on ``device`` (default: the CPU). Always has "reference"."""
    dev = torch.device("cpu" if device is None else device)
    return [name for name in _ALL if _unavailable_reason(name, dev) is None]


def resolve_backend(name: str, devices: set[torch.device]):
    """A new instance of the backend ``name`` ("auto" allowed) for params on ``devices``."""
    if not isinstance(name, str):
        raise TypeError(f"Invalid backend: must be a string, got {type(name).__name__}")
    if name == "auto":
        main = "cuda" if any(d.type == "cuda" for d in devices) else "cpu"
        name = next(c for c in _PREFERENCE[main]
                    if all(_unavailable_reason(c, d) is None for d in devices))
    for dev in devices:
        reason = _unavailable_reason(name, dev)
        if reason is not None:
            raise ValueError(f"Invalid backend: {name!r} is not available on {dev}: {reason}")
    if name == "reference":
        return ReferenceBackend()
    from .fused import FusedBackend
    return FusedBackend(name, native.ops() if name == "native" else triton_backend.ops())
