"""SAM under torch.distributed / DistributedDataParallel, with the ascent made explicit.

Two semantics for the ascent (first) pass of a SAM step on R replicas, each with its shard of
the global batch:

* ``"global"`` — the ascent gradient is all-reduced like any other (DDP averages it), so every
  replica perturbs with the same gradient and the same N: identical to single-process SAM on
  the concatenated batch.
* ``"local"`` — m-sharpness (Foret et al.; what the original JAX code does): each replica
  perturbs with its own shard's gradient and its own N; the forward and backward of the ascent
  pass run under ``model.no_sync()`` (no all-reduce at all), and only the descent gradient is
  all-reduced. The replicas' weights stay identical: each restores the same pre-ascent weights
  bit-exactly and applies the same averaged descent gradient.

In both modes the SGD phase of a switch schedule costs one pass and one all-reduce, like plain
DDP training. Skip decisions are the same on every replica: in ``"local"`` mode each
replica's skip flag (its local N is not finite) is all-reduced with MAX on the device before
the ascent uses it (one scalar, no host sync), so a replica that saw an inf does not skip
alone; the descent gradient is the all-reduced one, the same everywhere.

Per-step policies (``samfast.policies``: Interval, LookSAM, RandomSwitch, AdaptiveSAM) are
followed: a step the policy plans as one pass runs one pass and one all-reduce, like the SGD
phase.

Gradient accumulation (``accumulation_steps=k``): both passes run over the same k
micro-batches, each micro-batch's loss divided by k, so the ascent uses the gradient of the
whole batch and the descent the gradient of the whole batch at w + e; k equal micro-batches of
a mean-reduced loss give the full batch's step. Under DDP every micro-batch but the last of a
pass runs under ``no_sync()``: one all-reduce per pass, as without accumulation.

Gradient clipping (``clip_grad_norm=``) applies to the descent gradient, the one the base
optimizer steps with, as ``torch.nn.utils.clip_grad_norm_`` would before ``optimizer.step()``.
Clipping the ascent gradient too (``clip_ascent=True``) matters only for unnormalized SAM,
where e = rho * g and the clip bounds |e| by rho * max_norm; SAM and ASAM normalize the
ascent gradient by its norm, so a global-norm clip (a positive rescaling of g) leaves e
unchanged.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from . import policies as _policies
from .bn import running_stats_disabled
from .fsdp import check_ascent as _check_fsdp_ascent
from .sam import SAM

ASCENTS = ("global", "local")


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP (or the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def _all_replicas_skip(skip: Tensor) -> None:
    """Make a 0-d bool skip flag agree across processes (any replica skips -> all do)."""
    if dist.is_available() and dist.is_initialized():
        flag = skip.to(torch.uint8)  # all-reduce has no MAX for bool on every backend
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        skip.copy_(flag.bool())


def sam_optimizer(optimizer) -> SAM:
    """The :class:`samfast.SAM` inside a framework's wrapper (Lightning's ``LightningOptimizer``,
    Accelerate's ``AcceleratedOptimizer``: both keep the wrapped optimizer in ``.optimizer``),
    or the optimizer itself. Call SAM's own methods on what this returns: a wrapper either
    lacks them or, as ``LightningOptimizer`` does, runs them on a copy of the attributes."""
    inner = optimizer
    while isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer):
        inner = inner.optimizer
    if not isinstance(inner, SAM):
        raise TypeError(f"Invalid optimizer: a samfast.SAM (or a wrapper of one) is needed, got "
                        f"{type(optimizer).__name__}")
    return inner


def _check_step_options(ascent: str, accumulation_steps, clip_grad_norm, clip_ascent) -> None:
    if ascent not in ASCENTS:
        raise ValueError(f"Invalid ascent: {ascent!r} (choose from {', '.join(ASCENTS)})")
    if accumulation_steps is not None and (isinstance(accumulation_steps, bool) or not
                                           isinstance(accumulation_steps, int)
                                           or accumulation_steps < 1):
        raise ValueError(f"Invalid accumulation_steps: {accumulation_steps!r} (must be an int "
                         ">= 1, or None for a loss_fn that takes no argument)")
    if clip_grad_norm is not None and (isinstance(clip_grad_norm, bool) or not
                                       isinstance(clip_grad_norm, (int, float))
                                       or not math.isfinite(clip_grad_norm)
                                       or clip_grad_norm <= 0):
        raise ValueError(f"Invalid clip_grad_norm: {clip_grad_norm!r} (must be a finite number "
                         "> 0, or None)")
    if not isinstance(clip_ascent, bool):
        raise ValueError(f"Invalid clip_ascent: {clip_ascent!r} (must be a bool)")
    if clip_ascent and clip_grad_norm is None:
        raise ValueError("Invalid clip_ascent: True needs clip_grad_norm (the max norm)")


_ONE_PASS_PLANS = (_policies.BASE_STEP, _policies.LOOKSAM_REUSE)


def _check_policy_options(optimizer: SAM, local: bool, clip_grad_norm) -> None:
    """Refuse the policy / option pairs whose step would be wrong rather than run them."""
    name = type(optimizer.policy).__name__
    if isinstance(optimizer.policy, _policies.AdaptiveSAM) and clip_grad_norm is not None:
        # refused from the first step of the run, not only once the SAM phase starts
        raise ValueError(f"Invalid clip_grad_norm: with {name} the first pass's gradient is "
                         "the descent gradient or the ascent gradient depending on a decision "
                         "taken from its unclipped norm inside first_step, so it cannot be "
                         "clipped before that decision; use clip_grad_norm=None with this policy")
    if local and isinstance(optimizer.policy, (_policies.AdaptiveSAM, _policies.LookSAM)):
        raise ValueError(f"Invalid ascent: 'local' with {name}: "
                         + ("each replica would decide from its own gradient norm and run a "
                            "different number of passes (DDP would hang)"
                            if isinstance(optimizer.policy, _policies.AdaptiveSAM) else
                            "each replica would store its own g_v and its reuse steps would "
                            "move the replicas apart") + "; use ascent='global'")


def _clip_grad_norm(optimizer: SAM, max_norm: float, grad_scaler) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the optimizer's gradients, returning the norm
    before clipping. With an enabled ``grad_scaler`` the gradients are still scaled (SAM
    unscales them in its own step): the norm is divided by the scale, so the clip acts on the
    unscaled gradient as ``scaler.unscale_(opt); clip_grad_norm_(...)`` would, with no host
    sync (the scale is read as a tensor)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"]
             if p.grad is not None]
    if not grads:
        return torch.zeros(())
    device = grads[0].device
    norm = torch.linalg.vector_norm(
        torch.stack([n.to(device) for n in torch._foreach_norm(grads)]))
    if grad_scaler is not None and grad_scaler.is_enabled():
        norm = norm / grad_scaler.scale(torch.ones((), device=device, dtype=norm.dtype))
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)  # torch's formula and epsilon
    for g in grads:
        g.mul_(coef.to(g.device, g.dtype))
    return norm


def sam_step(model: nn.Module, optimizer: SAM, loss_fn: Callable[..., Tensor],
             ascent: str = "global", grad_scaler=None, *, accumulation_steps: int | None = None,
             clip_grad_norm: float | None = None, clip_ascent: bool = False) -> Tensor:
    """One training step with or without DDP, following ``optimizer.sam_enabled``.

    ``loss_fn()`` runs the forward pass and returns the loss (no ``zero_grad``, no backward:
    this function does those). Returns the first-pass loss, detached. The second pass leaves
    BatchNorm running statistics alone. With fp16 AMP pass a ``torch.amp.GradScaler``: the
    losses are scaled, the gradients unscaled, and ``grad_scaler.update()`` is called.

    ``accumulation_steps=k``: ``loss_fn(i)`` returns the loss of micro-batch ``i`` (0..k-1)
    and is called k times per pass; the gradients of ``loss_fn(i) / k`` accumulate, and the
    returned loss is the mean of the k first-pass losses. Under DDP only the last micro-batch
    of a pass all-reduces (the others run under ``no_sync()``; with ``ascent="local"`` the whole
    ascent pass does).

    ``clip_grad_norm=max_norm`` clips the global L2 norm of the descent gradient (the second
    pass's; the single pass's in an SGD phase) before the base optimizer uses it, as
    ``torch.nn.utils.clip_grad_norm_`` would (unscaled first under fp16 AMP). ``clip_ascent``
    clips the ascent gradient to the same norm: it bounds |e| by rho * max_norm for
    unnormalized SAM and changes nothing for SAM and ASAM, whose e is scale-free.

    ``optimizer`` may be a framework's wrapper of a SAM (see :func:`sam_optimizer`).

    The optimizer's per-step policy (``samfast.policies``) decides each step while
    ``sam_enabled``: one pass for the one-pass steps it plans (``Interval``'s and
    ``RandomSwitch``'s base steps, ``LookSAM``'s reuse steps), two for SAM steps;
    ``AdaptiveSAM`` decides after the first pass, from its gradient's norm (one host sync).
    Under DDP with ``ascent="global"`` every replica plans and decides alike (the same seeded
    draws, the same all-reduced gradient); ``ascent="local"`` is refused with ``AdaptiveSAM``
    and ``LookSAM`` (per-replica norms and g_v would split the replicas), and
    ``clip_grad_norm`` with ``AdaptiveSAM`` (its decision needs the unclipped norm of a
    gradient that may turn out to be the descent gradient). On ``LookSAM``'s reuse steps the
    clip applies to g before g_v is added back (the paper's order: g_v's weight is relative
    to ||g||), so the descent gradient's norm can exceed ``max_norm``, by a factor of up to
    1 + alpha.
    """
    return _sam_step(model, optimizer, loss_fn, ascent=ascent, grad_scaler=grad_scaler,
                     accumulation_steps=accumulation_steps, clip_grad_norm=clip_grad_norm,
                     clip_ascent=clip_ascent)


def _sam_step(model: nn.Module, optimizer, loss_fn: Callable[..., Tensor], *, ascent: str,
              grad_scaler, accumulation_steps: int | None, clip_grad_norm: float | None,
              clip_ascent: bool, backward: Callable[[Tensor], None] | None = None,
              ddp: DistributedDataParallel | None = None, bn_model: nn.Module | None = None
              ) -> Tensor:
    """:func:`sam_step` for the integrations: ``backward`` replaces the scaled
    ``loss.backward()`` (Lightning's ``manual_backward``, which scales with the precision
    plugin's scaler itself), ``ddp`` is the DDP module whose ``no_sync`` to use when ``model``
    is not it, ``bn_model`` the module whose BatchNorms the second pass leaves alone."""
    _check_step_options(ascent, accumulation_steps, clip_grad_norm, clip_ascent)
    optimizer = sam_optimizer(optimizer)
    _check_fsdp_ascent(optimizer, ascent)
    if ddp is None and isinstance(model, DistributedDataParallel):
        ddp = model
    if ddp is not None and ascent == "local" and grad_scaler is not None:
        raise ValueError("Invalid grad_scaler: fp16 loss scaling with ascent='local' is not "
                         "supported yet (the replicas would have to agree on overflows of "
                         "their own ascent gradients); use bf16 autocast or ascent='global'")
    if backward is None:
        def backward(loss: Tensor) -> None:
            (grad_scaler.scale(loss) if grad_scaler is not None else loss).backward()
    steps = 1 if accumulation_steps is None else accumulation_steps

    def one_pass(sync: bool) -> Tensor:
        """Forward and backward over every micro-batch; all-reduce after the last if sync."""
        total = None
        for i in range(steps):
            no_sync = ddp is not None and (not sync or i < steps - 1)
            with ddp.no_sync() if no_sync else contextlib.nullcontext():
                loss = loss_fn() if accumulation_steps is None else loss_fn(i)
                backward(loss / steps if steps > 1 else loss)
            total = loss.detach() if total is None else total + loss.detach()
        return total / steps if steps > 1 else total

    _check_policy_options(optimizer, ddp is not None and ascent == "local", clip_grad_norm)
    if optimizer.second_pass_due or optimizer.perturbed:
        raise RuntimeError("sam_step called between the optimizer's first_step and second_step "
                           "(finish that step, or abort_step(), first)")
    plan = optimizer.plan_step()
    optimizer.zero_grad()
    if plan in _ONE_PASS_PLANS:
        # One pass: the SGD phase's base step, or a policy's one-pass step inside the SAM
        # phase ("base", LookSAM's reuse step), which first_step takes whole (advancing the
        # policy) and second_step only finishes.
        loss = one_pass(sync=True)
        if clip_grad_norm is not None:
            _clip_grad_norm(optimizer, clip_grad_norm, grad_scaler)
        if optimizer.sam_enabled:
            optimizer.first_step(zero_grad=True, grad_scaler=grad_scaler)
            optimizer.second_step()
        else:
            optimizer.base_step(grad_scaler=grad_scaler)
    else:
        local = ddp is not None and ascent == "local"
        loss = one_pass(sync=not local)
        if clip_ascent:
            _clip_grad_norm(optimizer, clip_grad_norm, grad_scaler)
        optimizer.first_step(zero_grad=True, grad_scaler=grad_scaler,
                             agree_skip=_all_replicas_skip if local else None)
        if optimizer.second_pass_due:  # not after a "decide" plan that decided on one pass
            try:
                # Never tracked: at w + e it is not the model's batch statistics, and after a
                # skipped ascent it repeats the first pass, whose statistics are counted.
                with running_stats_disabled(bn_model if bn_model is not None
                                            else unwrap(model)):
                    one_pass(sync=True)
                if clip_grad_norm is not None:
                    _clip_grad_norm(optimizer, clip_grad_norm, grad_scaler)
            except BaseException:  # the weights hold w + e: put w back before propagating
                optimizer.abort_step()
                raise
            optimizer.second_step(zero_grad=True, grad_scaler=grad_scaler)
        else:
            optimizer.second_step()
    if grad_scaler is not None:
        grad_scaler.update()
    return loss
