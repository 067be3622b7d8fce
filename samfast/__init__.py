"""samfast: fast, exact Sharpness-Aware Minimization for PyTorch.

Public API::

    samfast.SAM, samfast.ASAM, samfast.USAM        # the optimizer (torch.optim conformant)
    samfast.available_backends(device=None)         # ["reference", ...]
    samfast.running_stats_disabled(model)           # BatchNorm helper for the second pass
    samfast.disable_running_stats / enable_running_stats
"""

from ._version import __version__
from .backends import available_backends
from .bn import disable_running_stats, enable_running_stats, running_stats_disabled
from .sam import ASAM, SAM, USAM

__all__ = [
    "SAM", "ASAM", "USAM", "available_backends", "disable_running_stats",
    "enable_running_stats", "running_stats_disabled", "__version__",
]
