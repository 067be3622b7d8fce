"""BatchNorm during SAM's second pass: use batch statistics, but leave the running stats alone.

The second forward pass runs at the perturbed weights w + e; letting it update BatchNorm's
running mean/var (and ``num_batches_tracked``) would count every batch twice and mix in
statistics of weights the model never takes. Setting ``track_running_stats = False`` on a
module in train mode makes ``F.batch_norm`` use the batch statistics and skip the update
entirely (unlike the common ``momentum = 0`` trick, which still bumps ``num_batches_tracked``
and turns a NaN batch mean into NaN running stats via 0 * NaN).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

_SAVED = "_samfast_track_running_stats"


def _batchnorms(model: nn.Module) -> Iterator[nn.modules.batchnorm._BatchNorm]:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            yield module


def disable_running_stats(model: nn.Module) -> None:
    """Stop BatchNorm layers of ``model`` from updating their running statistics (idempotent)."""
    for bn in _batchnorms(model):
        if not hasattr(bn, _SAVED):
            setattr(bn, _SAVED, bn.track_running_stats)
        bn.track_running_stats = False


def enable_running_stats(model: nn.Module) -> None:
    """Undo :func:`disable_running_stats` (idempotent)."""
    for bn in _batchnorms(model):
        if hasattr(bn, _SAVED):
            bn.track_running_stats = getattr(bn, _SAVED)
            delattr(bn, _SAVED)


@contextlib.contextmanager
def running_stats_disabled(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Context manager around :func:`disable_running_stats`; a no-op when ``enabled`` is False.

    In a ``SAM.step(closure)`` closure, pass ``enabled=opt.perturbed`` so that only the second
    pass leaves the running statistics alone::

        def closure():
            opt.zero_grad()
            with samfast.running_stats_disabled(model, enabled=opt.perturbed):
                loss = loss_fn(model(x), y)
            loss.backward()
            return loss
    """
    if not enabled:
        yield
        return
    disable_running_stats(model)
    try:
        yield
    finally:
        enable_running_stats(model)
