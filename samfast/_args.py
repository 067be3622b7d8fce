"""Argument checks shared by the measurement functions (sharpness, PGD).

Every bad argument raises an error that names it. Integer arguments take anything with
``__index__`` (``np.int64(10)``, a 0-d integer tensor), float arguments any real number
(``np.float32``, a 0-d tensor); bools are refused for both, since ``steps=True`` is a bug,
not a 1.
"""

from __future__ import annotations

import math
import numbers
import operator

import torch
from torch import Tensor


def _is_bool(value) -> bool:
    # np.bool_ has no __index__ and is not a numbers.Real, so only these two get through
    return isinstance(value, bool) or (isinstance(value, Tensor) and value.dtype == torch.bool)


def int_arg(name: str, value, minimum: int, maximum: int | None = None) -> int:
    """``value`` as a Python int in [minimum, maximum], or ValueError naming ``name``."""
    bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    try:
        if _is_bool(value):
            raise TypeError
        index = operator.index(value)
    except (TypeError, RuntimeError):  # RuntimeError: a tensor that is not 0-d integer
        raise ValueError(f"Invalid {name}: {value!r} (must be an int {bounds})") from None
    if index < minimum or (maximum is not None and index > maximum):
        raise ValueError(f"Invalid {name}: {index} (must be an int {bounds})")
    return index


def float_arg(name: str, value, minimum: float = 0.0, strict: bool = False) -> float:
    """``value`` (a real number or a 0-d real tensor) as a finite Python float >= minimum
    (> with ``strict``), or ValueError naming ``name``."""
    bound = f"{'>' if strict else '>='} {minimum:g}"
    real_tensor = (isinstance(value, Tensor) and value.dim() == 0
                   and not value.is_complex() and not _is_bool(value))
    if not real_tensor and (_is_bool(value) or not isinstance(value, numbers.Real)):
        raise ValueError(f"Invalid {name}: {value!r} (must be a finite number {bound})")
    number = float(value)
    if not math.isfinite(number) or number < minimum or (strict and number == minimum):
        raise ValueError(f"Invalid {name}: {value!r} (must be a finite number {bound})")
    return number


SEED_MAX = 2**63 - 1  # torch generators take seeds below 2**64; room for seed + i


_HINT = "pass one batch as (inputs, targets) or an iterable of (inputs, targets) batches"


def iter_batches(data):
    """The (inputs, targets) batches of ``data``, each checked as it comes (so a DataLoader
    streams).

    The rule: a tuple or list of exactly two tensors is one batch (as PyHessian takes it);
    anything else must be an iterable of (inputs, targets) pairs, e.g. a list of tuples or a
    DataLoader. A pair of tensors cannot be an iterable of batches, since its items would be
    tensors rather than pairs, so the rule is unambiguous.
    """
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(
            isinstance(t, Tensor) for t in data):
        x, y = data
        if x.dim() == 0 or y.dim() == 0 or len(x) != len(y):
            raise ValueError(f"Invalid data: a pair of tensors is one (inputs, targets) batch, "
                             f"but their first dimensions differ: inputs {tuple(x.shape)}, "
                             f"targets {tuple(y.shape)}")
        yield x, y
        return
    if isinstance(data, Tensor):
        raise TypeError(f"Invalid data: a single Tensor {tuple(data.shape)}; {_HINT}")
    try:
        batches = iter(data)
    except TypeError:
        raise TypeError(f"Invalid data: {type(data).__name__} is not iterable; {_HINT}") from None
    for i, batch in enumerate(batches):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            what = (f"a Tensor {tuple(batch.shape)}" if isinstance(batch, Tensor)
                    else f"a {type(batch).__name__}"
                    + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
            raise TypeError(f"Invalid data: batch {i} is {what}, not an (inputs, targets) "
                            f"pair; {_HINT}")
        try:
            len(batch[1])
        except TypeError:
            raise TypeError(f"Invalid data: batch {i} has targets of type "
                            f"{type(batch[1]).__name__} without a length (the batch size "
                            f"weighs each batch)") from None
        yield batch[0], batch[1]


def as_batches(data) -> list:
    """The batches of ``data`` (see :func:`iter_batches`) as a list; at least one."""
    batches = list(iter_batches(data))
    if not batches:
        raise ValueError("Invalid data: no batches")
    return batches
