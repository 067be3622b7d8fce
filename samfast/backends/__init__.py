"""Backend registry: which implementations of the SAM step exist, and which one ``"auto"`` picks.

A backend implements ``first_step(groups) -> bool``, ``second_step(groups, base_step) -> bool``,
``base_step(groups, base_step) -> bool`` and ``restore()``; :class:`samfast.SAM` owns the API,
the validation and the step state machine, a backend owns only the arithmetic.
"""

from __future__ import annotations

import torch

from .reference import ReferenceBackend

# Fastest first, per device type; "auto" takes the first available one.
_PREFERENCE = {"cpu": ["reference"], "cuda": ["reference"]}
_ALL = ("reference",)


def _unavailable_reason(name: str, device: torch.device) -> str | None:
    """None when ``name`` can run on ``device``, else why not."""
    if name == "reference":
        return None
    return f"unknown backend {name!r} (known: {', '.join(_ALL)})"


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Backends usable for parameters on ``device`` (default: the CPU). Always has "reference"."""
    dev = torch.device("cpu" if device is None else device)
    return [name for name in _ALL if _unavailable_reason(name, dev) is None]


def resolve_backend(name: str, devices: set[torch.device]):
    """An instance of the backend ``name`` ("auto" allowed) for params on ``devices``."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    if name == "auto":
        for candidate in _PREFERENCE.get(_main_device_type(devices), ["reference"]):
            if all(_unavailable_reason(candidate, d) is None for d in devices):
                name = candidate
                break
    for dev in devices:
        reason = _unavailable_reason(name, dev)
        if reason is not None:
            raise ValueError(f"Invalid backend: {name!r} is not available on {dev}: {reason}")
    return ReferenceBackend()


def _main_device_type(devices: set[torch.device]) -> str:
    types = {d.type for d in devices}
    return "cuda" if "cuda" in types else "cpu"
