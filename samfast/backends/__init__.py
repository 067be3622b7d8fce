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

import warnings

import torch

from . import native, triton_backend
from .reference import ReferenceBackend

_ALL = ("reference", "native", "triton")
# "auto", per device type. CPU: the C++ kernels (Triton runs there only under its
# interpreter, for tests). CUDA: Triton first, because its kernels' logic is what CI executes
# (under the interpreter) while the CUDA C++ kernels are only compiled there; no GPU has yet
# measured one against the other (bench/gpu_check.sh will).
_PREFERENCE = {"cpu": ["native", "reference"], "cuda": ["triton", "native", "reference"]}
# (backend, device) -> None when its self-check passed in this process, else what failed.
_CHECKED: dict[tuple[str, str], str | None] = {}


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


def ops_namespace(name: str):
    """The ``torch.ops`` namespace implementing the op contract for a fused backend."""
    return native.ops() if name == "native" else triton_backend.ops()


def self_check_failure(name: str, device: torch.device, dtypes) -> str | None:
    """Run the quick self-check of a fused backend on ``device`` once per process (per
    dtype); None if every op matched its reference, else which ops did not."""
    from ..selfcheck import check_backend

    failures = []
    for dtype in sorted(dtypes, key=str):
        key = (name, f"{device}/{dtype}")
        if key not in _CHECKED:
            # aligned buffers of a length divisible by 16: the kernel variants training uses
            bad = [c for c in check_backend(name, device, n=16 * 257, dtypes=(dtype,),
                                            offsets=(0,)) if not c.ok]
            _CHECKED[key] = "; ".join(
                f"{c.op} ({str(c.dtype).replace('torch.', '')}{', ' + c.detail if c.detail else ''}): "
                f"max error {c.max_error:.3g} ulp" for c in bad[:3]) or None
        if _CHECKED[key] is not None:
            failures.append(_CHECKED[key])
    return "; ".join(failures) or None


def _auto(devices: set[torch.device], dtypes) -> str:
    """The first available backend of the device's preference list whose self-check passes
    on every device; a fused backend that fails it is skipped with a warning naming the op."""
    main = "cuda" if any(d.type == "cuda" for d in devices) else "cpu"
    for candidate in _PREFERENCE[main]:
        if any(_unavailable_reason(candidate, d) is not None for d in devices):
            continue
        if candidate == "reference":
            return candidate
        failure = next((f"{d}: {f}" for d in devices
                        if (f := self_check_failure(candidate, d, dtypes)) is not None), None)
        if failure is None:
            return candidate
        warnings.warn(f"samfast: backend='auto' does not use {candidate!r}: its self-check "
                      f"against the reference failed on {failure}. Falling back; run "
                      "`python -m samfast` for the full report.", RuntimeWarning, stacklevel=4)
    return "reference"


# FSDP2: what "auto" picks and why. Sharding is for models that do not fit, so memory comes
# first: the fused backends' flat mirrors of the local shards and gradients are two more
# shard-sized buffers per rank (bench/results/fsdp_memory-*: 2.060 against 1.029 MiB per rank
# for ResNet-20 on 2 ranks), for an optimizer side 1.8x faster there on the CPU.
_SHARDED_REASON = ("the fused backends run on FSDP2 too, but keep flat mirrors of the local "
                   "shards and their gradients (two more shard-sized buffers per rank); pass "
                   "backend='native' (or 'triton') for their faster optimizer step at that "
                   "memory, or backend='reference' to silence this")
_WARNED_SHARDED = False


def resolve_backend(name: str, devices: set[torch.device], dtypes=(torch.float32,),
                    sharded: bool = False):
    """A new instance of the backend ``name`` for params on ``devices`` with ``dtypes``.
    ``"auto"`` checks a fused backend on each device once per process before choosing it;
    an explicit name is used as asked. ``sharded`` params (FSDP2's DTensors) run on every
    backend (the reference on the local shards, a fused one on flat mirrors of them:
    samfast.flat.ShardedFlatBucket); ``"auto"`` picks the reference for them, saying why once
    per process."""
    global _WARNED_SHARDED
    if not isinstance(name, str):
        raise TypeError(f"Invalid backend: must be a string, got {type(name).__name__}")
    if sharded and name == "auto":
        if not _WARNED_SHARDED:
            _WARNED_SHARDED = True
            warnings.warn(f"samfast: backend='auto' uses 'reference' for FSDP2 (DTensor) params: "
                          f"{_SHARDED_REASON}.", RuntimeWarning, stacklevel=3)
        name = "reference"
    if name == "auto":
        name = _auto(devices, set(dtypes))
    for dev in devices:
        reason = _unavailable_reason(name, dev)
        if reason is not None:
            raise ValueError(f"Invalid backend: {name!r} is not available on {dev}: {reason}")
    if name == "reference":
        return ReferenceBackend()
    from .fused import FusedBackend
    return FusedBackend(name, ops_namespace(name))
