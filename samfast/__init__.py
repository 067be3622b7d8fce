"""samfast: fast, exact Sharpness-Aware Minimization for PyTorch.

Public API::

    samfast.SAM, samfast.ASAM, samfast.USAM        # the optimizer (torch.optim conformant)
    samfast.available_backends(device=None)         # ["reference", ...]
    samfast.running_stats_disabled(model)           # BatchNorm helper for the second pass
    samfast.disable_running_stats / enable_running_stats
    samfast.SwitchSchedule                          # SGD -> SAM late, SAM -> SGD, adversarial
    samfast.Interval / LookSAM / RandomSwitch / AdaptiveSAM  # per-step policies (SAM(policy=...))
    samfast.hessian_eigenvalues / hessian_trace     # sharpness (Lanczos, power, Hutchinson)
    samfast.pgd_attack / robust_accuracy            # PGD (L-inf, L2) and robust accuracy
    samfast.distributed.sam_step                    # one step with or without DDP
"""

from ._version import __version__
from .backends import available_backends
from .bn import disable_running_stats, enable_running_stats, running_stats_disabled
from . import policies
from .policies import AdaptiveSAM, Interval, LookSAM, RandomSwitch
from .sam import ASAM, SAM, USAM
from .schedule import SwitchSchedule
from .sharpness import SharpnessInfo, hessian_eigenvalues, hessian_trace
from .adversarial import pgd_attack, robust_accuracy

__all__ = [
    "SAM", "ASAM", "USAM", "available_backends", "disable_running_stats",
    "enable_running_stats", "running_stats_disabled", "SwitchSchedule", "Interval", "LookSAM",
    "RandomSwitch", "AdaptiveSAM", "policies", "hessian_eigenvalues",
    "hessian_trace", "SharpnessInfo", "pgd_attack", "robust_accuracy", "__version__",
]
