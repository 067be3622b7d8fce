"""samfast: fast, exact Sharpness-Aware Minimization for PyTorch.

Public API::

    samfast.SAM, samfast.ASAM, samfast.USAM        # the optimizer (torch.optim conformant)
    samfast.available_backends(device=None)         # ["reference", ...]
    samfast.running_stats_disabled(model)           # BatchNorm helper for the second pass
    samfast.disable_running_stats / enable_running_stats
    samfast.SwitchSchedule                          # SGD -> SAM late, SAM -> SGD, adversarial
"""

from ._version import __version__
from .backends import available_backends
from .bn import disable_running_stats, enable_running_stats, running_stats_disabled
from .sam import ASAM, SAM, USAM
from .schedule import SwitchSchedule

__all__ = [
    "SAM", "ASAM", "USAM", "available_backends", "disable_running_stats",
    "enable_running_stats", "running_stats_disabled", "SwitchSchedule", "__version__",
]
