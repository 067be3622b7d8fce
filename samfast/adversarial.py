r"""PGD adversarial examples (L-inf and L2) and robust accuracy.

Inputs are images in pixel space [0, 1]; normalization belongs inside the model (the CIFAR
models start with :class:`samfast.cifar.models.Normalize`), as RobustBench does. One PGD step
from the current point x' of the clean input x with gradient g = d loss / d x':

    L-inf:  x' <- clip_box( clip_[x - eps, x + eps]( x' + alpha * sign(g) ) )
    L2:     x' <- clip_box( x + project_eps( x' + alpha * g / ||g|| - x ) ),
            project_eps(d) = d * min(1, eps / ||d||)        (norms per example)

after a random start (uniform in the L-inf ball; uniform in the L2 ball). L-inf defaults to
eps = 8/255, alpha = 2/255; L2 takes no default radius (8/255 would be a meaningless L2 ball),
and its step defaults to eps / 4. With the box active,
the L2 projection onto the ball followed by clipping to the box is the usual approximation of
the projection onto their intersection (it stays inside both).

Only the input gradient is computed (``torch.autograd.grad`` w.r.t. the input: the backward
skips every weight gradient), so a PGD step costs less than a training step. The model is put
in eval mode for the attack (``train_mode=True`` keeps its mode); its modes, parameter
``.grad``s and buffers are exactly as before afterwards. On CUDA the per-step update is one
Triton kernel (``samfast.kernels.pgd``); elsewhere the PyTorch path below, which is the spec.
"""

from __future__ import annotations

import contextlib
import numbers
import warnings
from typing import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ._args import SEED_MAX, float_arg, int_arg, iter_batches

NORMS = ("linf", "l2")
LINF_EPS, LINF_ALPHA = 8 / 255, 2 / 255  # the CIFAR-10 L-inf threat model (Madry et al.)
L2_ALPHA_FRACTION = 0.25


def _per_example_norm(t: Tensor) -> Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def pgd_step_reference(x_adv: Tensor, grad: Tensor, x: Tensor, eps: float, alpha: float,
                       norm: str, lo: float, hi: float) -> Tensor:
    """One PGD update (step, projection onto the eps-ball around x, clip to [lo, hi])."""
    if norm == "linf":
        stepped = x_adv + alpha * grad.sign()
        return torch.minimum(torch.maximum(stepped, x - eps), x + eps).clamp(lo, hi)
    g_norm = _per_example_norm(grad).clamp_min(1e-12)
    delta = x_adv + alpha * grad / g_norm - x
    d_norm = _per_example_norm(delta)
    delta = delta * torch.clamp(eps / d_norm.clamp_min(1e-12), max=1.0)
    return (x + delta).clamp(lo, hi)


def _random_start(x: Tensor, eps: float, norm: str, generator) -> Tensor:
    if norm == "linf":
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype) * 2 - 1
        return x + eps * noise.to(x.device)
    # uniform in the L2 ball: a Gaussian direction, radius eps * U^(1/d)
    direction = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    direction = direction / _per_example_norm(direction).clamp_min(1e-12)
    d = x[0].numel()
    radius = torch.rand(len(x), generator=generator, dtype=x.dtype).pow(1.0 / d).to(x.device)
    return x + eps * radius.view(-1, *([1] * (x.dim() - 1))) * direction


@contextlib.contextmanager
def _attack_mode(model: nn.Module, train_mode: bool):
    modes = {m: m.training for m in model.modules()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()} if train_mode else None
    if not train_mode:
        model.eval()
    try:
        yield
    finally:
        if buffers is not None:
            with torch.no_grad():
                for n, b in model.named_buffers():
                    b.copy_(buffers[n])
        for m, training in modes.items():
            m.training = training


def _step_fn(x: Tensor, use_kernel: bool | None):
    """The fused Triton step (``torch.ops.samfast_triton.pgd_step``) or the reference. By
    default the kernel is used on CUDA once it has matched the reference on this device (a
    check run once per process; a failure warns and keeps the reference)."""
    if use_kernel is None:
        use_kernel = x.is_cuda and _pgd_kernel_checked(x.device)
    if use_kernel:
        from .backends import triton_backend
        return triton_backend.ops().pgd_step
    return pgd_step_reference


_PGD_CHECKED: dict[str, bool] = {}


def _pgd_kernel_checked(device: torch.device) -> bool:
    key = str(device)
    if key not in _PGD_CHECKED:
        from .backends import triton_backend
        reason = triton_backend.unavailable_reason(device)
        if reason is None:
            from .selfcheck import check_pgd
            bad = [c for c in check_pgd(triton_backend.ops(), device) if not c.ok]
            reason = "; ".join(f"{c.case}: max error {c.max_error:.3g} ulp {c.detail}"
                               for c in bad) or None
            if reason is not None:
                warnings.warn(f"samfast: the fused PGD step does not match the reference on "
                              f"{device} ({reason}); using the PyTorch step", RuntimeWarning,
                              stacklevel=4)
        _PGD_CHECKED[key] = reason is None
    return _PGD_CHECKED[key]


def _radius_and_step(norm: str, eps, alpha) -> tuple[float, float]:
    """eps and alpha checked, with their defaults: 8/255 and 2/255 for L-inf; L2 has no
    default radius, and its step defaults to eps / 4, the step / radius ratio of the L-inf
    defaults. A fraction of eps rather than a rule in ``steps`` (2.5 * eps / steps, Madry et
    al.) keeps the step size independent of the number of steps; at the default 10 steps
    the two agree (10 steps cover 2.5 eps)."""
    if norm not in NORMS:
        raise ValueError(f"Invalid norm: {norm!r} (choose from {', '.join(NORMS)})")
    if eps is None:
        if norm == "l2":
            raise ValueError("Invalid eps: None; norm='l2' needs its own radius (the L-inf "
                             "default 8/255 would be an L2 ball of radius 0.03; 0.5 is the "
                             "usual CIFAR-10 L2 radius)")
        eps = LINF_EPS
    eps = float_arg("eps", eps)
    if alpha is None:
        alpha = LINF_ALPHA if norm == "linf" else L2_ALPHA_FRACTION * eps
    return eps, float_arg("alpha", alpha)


def _box(clamp) -> tuple[float, float]:
    if clamp is None:
        return float("-inf"), float("inf")
    try:
        lo, hi = clamp
    except (TypeError, ValueError):
        raise ValueError(f"Invalid clamp: {clamp!r} (a (low, high) pair or None)") from None
    if not all(isinstance(b, numbers.Real) and not isinstance(b, bool) for b in (lo, hi)) \
            or not float(lo) < float(hi):
        raise ValueError(f"Invalid clamp: {clamp!r} (need numbers low < high)")
    return float(lo), float(hi)


def pgd_attack(model: nn.Module, x: Tensor, y: Tensor, eps: float | None = None,
               alpha: float | None = None, steps: int = 10, norm: str = "linf",
               random_start: bool = True, loss_fn: Callable | None = None,
               clamp: tuple[float, float] | None = (0.0, 1.0), train_mode: bool = False,
               generator: torch.Generator | None = None,
               use_kernel: bool | None = None) -> Tensor:
    """PGD-``steps`` adversarial examples for (x, y); returns a detached tensor.

    Args:
        eps: radius, in the units of x (pixels in [0, 1]). L-inf: 8/255 by default. L2: no
            default, it must be given (0.5 is the usual CIFAR-10 L2 radius).
        alpha: step size; by default 2/255 for L-inf and eps / 4 for L2.
        steps: PGD steps (0: the random start only).
        norm: "linf" or "l2".
        loss_fn: maximized loss, ``loss_fn(logits, y)`` (default cross-entropy).
        clamp: the valid box (default [0, 1]); None for no box.
        train_mode: run the model in train mode (BatchNorm buffers are restored after).
        generator: for the random start (CPU generator; default: torch's global one).
        use_kernel: the fused Triton step (default: on CUDA tensors).

    Integer arguments take any integer type (``np.int64``), float arguments any real number;
    a bad argument raises ValueError naming it.
    """
    eps, alpha = _radius_and_step(norm, eps, alpha)
    steps = int_arg("steps", steps, 0)
    lo, hi = _box(clamp)
    loss_fn = loss_fn or F.cross_entropy
    step = _step_fn(x, use_kernel)
    x = x.detach()
    x_adv = _random_start(x, eps, norm, generator).clamp(lo, hi) if random_start else x.clone()
    with _attack_mode(model, train_mode):
        for _ in range(steps):
            x_adv.requires_grad_(True)
            with torch.enable_grad():
                loss = loss_fn(model(x_adv), y)
                grad, = torch.autograd.grad(loss, x_adv)
            x_adv = step(x_adv.detach(), grad, x, eps, alpha, norm, lo, hi)
    return x_adv.detach()


@torch.no_grad()
def robust_accuracy(model: nn.Module, data: Iterable, eps: float | None = None,
                    alpha: float | None = None, steps: int = 20, norm: str = "linf",
                    random_start: bool = True, seed: int = 0, **kwargs) -> float:
    """Accuracy (%) under PGD-``steps`` over ``data``: one (x, y) batch or an iterable of
    them. ``eps``, ``alpha`` (and their defaults) and the other arguments as in
    :func:`pgd_attack`."""
    eps, alpha = _radius_and_step(norm, eps, alpha)
    steps = int_arg("steps", steps, 0)
    seed = int_arg("seed", seed, 0, SEED_MAX)
    gen = torch.Generator().manual_seed(seed)
    correct = total = 0
    for x, y in iter_batches(data):
        x_adv = pgd_attack(model, x, y, eps=eps, alpha=alpha, steps=steps, norm=norm,
                           random_start=random_start, generator=gen, **kwargs)
        with _attack_mode(model, train_mode=False):
            correct += int((model(x_adv).argmax(1) == y).sum())
        total += len(y)
    if total == 0:
        raise ValueError("Invalid data: no samples")
    return 100.0 * correct / total
