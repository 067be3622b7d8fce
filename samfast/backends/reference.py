"""The reference backend: the readable specification of one SAM step.

Every other backend is tested against this module. It works on the model's own parameter
tensors, grouped by (device, dtype) so that each ``torch._foreach_*`` call is one fused launch
per bucket, and keeps the pre-ascent weights as clones so the restore is bit-exact.

Maths, for a parameter w with gradient g in a param group with options (rho, adaptive, eta,
normalize, sam_eps)::

    T(w) = |w| + eta          if adaptive (ASAM)        else 1
    N    = || concat over every param with a grad, every group, of T(w) * g ||_2
    e    = rho * T(w)^2 * g / (N + eps)      if normalize (SAM, ASAM)
    e    = rho * T(w)^2 * g                  otherwise     (unnormalized SAM, "USAM")

N is accumulated in float32, or float64 when any gradient is float64. Half-precision weights
are updated in float32 and rounded once (w <- round(float(w) + e)), as the fused kernels do.

FSDP2 (params that are sharded DTensors, see samfast/fsdp.py): every op above runs on the local
shards of w and g (``local``), N from the all-reduced sum of their squares, and the non-finite
check of a gradient is all-reduced, so that every rank skips together.

LookSAM (samfast/policies.py), with a missing gradient taken as a zero vector and sums over
every param of every group, accumulated like N (float64 if any param is float64):

    full step:   g_v <- g_s - c g,   c = (g . g_s) / ||g||^2   (0 when g = 0)
    reuse step:  g   <- g + alpha ||g|| / (||g_v|| + eps) g_v  (params with a gradient)

each element in the compute dtype and rounded once to the param's dtype; ||g_v|| is that of
g_v as stored.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from typing import Iterable

import torch
from torch import Tensor

from ..fsdp import Sharding, local

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def bucket_by_device_and_dtype(params: Iterable[Tensor]) -> dict[tuple, list[Tensor]]:
    """Params in first-seen order, bucketed by (device, dtype): one foreach launch per bucket."""
    buckets: dict[tuple, list[Tensor]] = defaultdict(list)
    for p in params:
        buckets[(p.device, p.dtype)].append(p)
    return buckets


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16 are computed in fp32; fp32 and fp64 in themselves."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def norm_dtype(params: Iterable[Tensor]) -> torch.dtype:
    return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32


def _upcast(tensors: list[Tensor]) -> list[Tensor]:
    return [t.to(compute_dtype(t.dtype)) for t in tensors]


def _scaled_grads(ws: list[Tensor], gs: list[Tensor], adaptive: bool, eta: float,
                  power: int) -> list[Tensor]:
    """T(w)^power * g in the compute dtype (power 1 for the norm, 2 for the ascent)."""
    gs = _upcast(gs)
    if not adaptive:
        return list(gs)
    t = torch._foreach_abs(_upcast(ws))
    torch._foreach_add_(t, eta)
    if power == 2:
        torch._foreach_mul_(t, t)
    return torch._foreach_mul(t, gs)


def ascent_scale(group: dict, norm: Tensor, cdtype: torch.dtype, device) -> Tensor:
    """e's scale as a 0-d ``cdtype`` tensor on ``device``: rho / (N + eps), or rho (USAM).
    The division is done in N's dtype whether rho is a float or a tensor (a float64 tensor rho
    would otherwise promote it to float64 and round differently)."""
    rho = group["rho"]
    if group["normalize"]:
        if isinstance(rho, Tensor):
            rho = rho.detach().to(device=device, dtype=norm.dtype)
        scale = rho / (norm.to(device) + group["sam_eps"])
    elif isinstance(rho, Tensor):
        scale = rho.detach().to(device)
    else:
        scale = torch.full((), rho, dtype=torch.float64, device=device)
    return scale.to(cdtype).reshape(())  # rho may be a 1-element tensor


def grad_norm(groups: list[dict], device: torch.device, sharding: Sharding | None = None
              ) -> Tensor:
    """N over all groups, as a 0-d tensor on ``device`` (float32, or float64 if any grad is).
    With ``sharding`` the local shards' sums of squares are added up over the ranks."""
    all_params = [p for g in groups for p in g["params"] if p.grad is not None]
    acc = norm_dtype(all_params)
    norms = []
    for group in groups:
        params = [p for p in group["params"] if p.grad is not None]
        for bucket in bucket_by_device_and_dtype(params).values():
            tg = _scaled_grads([local(p.detach()) for p in bucket],
                               [local(p.grad) for p in bucket],
                               group["adaptive"], group["eta"], power=1)
            norms.extend(n.to(device) for n in torch._foreach_norm(tg, 2, dtype=acc))
    if sharding is not None:
        sq = (torch.stack(norms).square().sum() if norms
              else torch.zeros((), dtype=acc, device=device))
        sharding.sum_(sq)
        return sq.sqrt()
    if not norms:
        return torch.zeros((), dtype=acc, device=device)
    return torch.linalg.vector_norm(torch.stack(norms))


def plain_sq_norm(params: list[Tensor], acc: torch.dtype, device) -> Tensor:
    """sum of g^2 over ``params`` (all with a gradient), accumulated in ``acc``."""
    terms = [local(p.grad).detach().to(acc).square().sum().to(device) for p in params]
    return torch.stack(terms).sum() if terms else torch.zeros((), dtype=acc, device=device)


def grads_finite(params: list[Tensor]) -> bool:
    """True when every gradient entry is finite (max |g| per tensor; NaN propagates)."""
    for bucket in bucket_by_device_and_dtype(params).values():
        # an FSDP2 shard may be empty (a dimension smaller than the world), and the inf-norm
        # of an empty tensor is undefined
        grads = [g for g in (local(p.grad) for p in bucket) if g.numel()]
        maxes = torch._foreach_norm(grads, float("inf"))
        if maxes and not bool(torch.stack(maxes).isfinite().all()):
            return False
    return True


def ascent_(group: dict, params: list[Tensor], norm: Tensor) -> list[Tensor]:
    """w <- w + e for ``params`` (those of ``group`` with a grad); returns the backups."""
    backups = []
    for bucket in bucket_by_device_and_dtype(params).values():
        ws = [local(p.detach()) for p in bucket]
        cdtype = compute_dtype(ws[0].dtype)
        scale = ascent_scale(group, norm, cdtype, ws[0].device)
        e = _scaled_grads(ws, [local(p.grad) for p in bucket], group["adaptive"], group["eta"],
                          power=2)
        torch._foreach_mul_(e, scale)
        backups.extend(w.clone() for w in ws)
        if cdtype == ws[0].dtype:
            torch._foreach_add_(ws, e)
        else:
            w32 = _upcast(ws)
            torch._foreach_add_(w32, e)
            torch._foreach_copy_(ws, w32)
    return backups


def restore_(params: list[Tensor], backups: list[Tensor]) -> None:
    """w <- backup, bit-exact."""
    if params:
        torch._foreach_copy_([local(p.detach()) for p in params], backups)


class ReferenceBackend:
    """Perturb/restore on the model's own tensors; the base optimizer steps them unchanged.

    Each step method returns whether the step was skipped for a non-finite gradient.
    """

    name = "reference"

    def __init__(self) -> None:
        self._optimizer_ref = None
        self._sharding: Sharding | None = None
        self._perturbed: list[Tensor] = []
        self._backups: list[Tensor] = []
        # LookSAM: g_v per param, ||g_v||^2 and whether g_v is valid (see the module docstring)
        self._gv: dict[Tensor, Tensor] = {}
        self._gv_sq: Tensor | None = None
        self._gv_valid = False

    def bind(self, optimizer) -> None:
        self._optimizer_ref = weakref.ref(optimizer)  # no cycle: see FusedBackend
        self._sharding = optimizer._sharding

    @property
    def _optimizer(self):
        return self._optimizer_ref()

    def add_group(self, index: int) -> None:
        pass

    def state_replaced(self) -> None:
        pass

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._optimizer.base_optimizer.zero_grad(set_to_none=set_to_none)

    def on_grad(self, p: Tensor) -> None:
        pass

    def unstarted_momentum(self) -> list[Tensor]:
        return []  # the base optimizer keeps its own state: exactly torch's

    def first_step(self, groups: list[dict], agree_skip=None, store_grad: bool = False) -> bool:
        """Ascent, unless N is not finite (then nothing changes and True is returned). With
        ``store_grad`` (a LookSAM full step) g is kept for the projection in second_step."""
        with_grad = [p for g in groups for p in g["params"] if p.grad is not None]
        if not with_grad:
            raise RuntimeError(
                "SAM.first_step: no parameter has a gradient; call loss.backward() first"
            )
        norm = grad_norm(groups, with_grad[0].device, self._sharding)
        skip = ~torch.isfinite(norm)
        if agree_skip is not None:
            agree_skip(skip)
        if store_grad:
            self._gv_valid = False  # until this step's projection completes
        if bool(skip):
            return True
        if store_grad:
            for p in (p for g in groups for p in g["params"]):
                self._gv[p] = (p.grad.detach().clone() if p.grad is not None
                               else torch.zeros_like(p, memory_format=torch.preserve_format))
        for group in groups:
            params = [p for p in group["params"] if p.grad is not None]
            self._backups.extend(ascent_(group, params, norm))
            self._perturbed.extend(params)
        return False

    def abort(self) -> None:
        """Between the passes: put back the weights the ascent saved."""
        restore_(self._perturbed, self._backups)
        self._perturbed, self._backups = [], []

    def second_step(self, groups: list[dict], base_step, project: bool = False) -> bool:
        """Restore, then ``base_step()`` unless a second-pass gradient is not finite. With
        ``project`` (a LookSAM full step) g_v is computed from g and the gradients g_s."""
        with_grad = [p for g in groups for p in g["params"] if p.grad is not None]
        finite = self._grads_finite(with_grad)
        restore_(self._perturbed, self._backups)
        self._perturbed, self._backups = [], []
        if finite:
            if project:
                self._project([p for g in groups for p in g["params"]])
            base_step()
        return not finite

    def _grads_finite(self, params: list[Tensor]) -> bool:
        """``grads_finite``, the same on every rank when the params are sharded."""
        finite = grads_finite(params)
        if self._sharding is not None:
            skip = torch.tensor(not finite, device=params[0].device)
            self._sharding.any_(skip)
            finite = not bool(skip)
        return finite

    def _project(self, params: list[Tensor]) -> None:
        """g_v <- g_s - (g . g_s / ||g||^2) g, where self._gv holds g."""
        acc = norm_dtype(params)
        device = params[0].device
        dot = torch.zeros((), dtype=acc, device=device)
        gg = torch.zeros((), dtype=acc, device=device)
        for p in params:
            g = self._gv[p].to(acc)
            gg = gg + g.square().sum().to(device)
            if p.grad is not None:
                dot = dot + (g * p.grad.detach().to(acc)).sum().to(device)
        coef = dot / gg if float(gg) > 0 else torch.zeros_like(gg)
        sq = torch.zeros((), dtype=acc, device=device)
        for p in params:
            cdtype = compute_dtype(p.dtype)
            g = self._gv[p]
            gs = (p.grad.detach().to(cdtype) if p.grad is not None
                  else torch.zeros_like(g, dtype=cdtype))
            g.copy_(gs - coef.to(g.device, cdtype) * g.to(cdtype))
            sq = sq + g.to(acc).square().sum().to(device)
        self._gv_sq, self._gv_valid = sq, True

    def grad_sq_norm(self, groups: list[dict]) -> Tensor:
        """||g||^2 over the params with a gradient (AdaptiveSAM's statistic)."""
        with_grad = [p for g in groups for p in g["params"] if p.grad is not None]
        if not with_grad:
            raise RuntimeError("SAM: no parameter has a gradient; call loss.backward() first")
        sq = plain_sq_norm(with_grad, norm_dtype(with_grad), with_grad[0].device)
        if self._sharding is not None:
            self._sharding.sum_(sq)
        return sq

    def base_step(self, groups: list[dict], base_step, reuse=None) -> bool:
        """The base optimizer's step, unless a gradient is not finite. ``reuse`` = (alpha,
        eps): a LookSAM step between full ones: g <- g + alpha ||g|| / (||g_v|| + eps) g_v
        first (skipped, as a SAM step is, when ||g|| is not finite)."""
        with_grad = [p for g in groups for p in g["params"] if p.grad is not None]
        if reuse is not None and with_grad:
            alpha, eps = reuse
            params = [p for g in groups for p in g["params"]]
            gnorm = plain_sq_norm(with_grad, norm_dtype(params), with_grad[0].device).sqrt()
            if not bool(torch.isfinite(gnorm)):
                return True
            if self._gv_valid:
                coef = alpha * gnorm / (self._gv_sq.sqrt() + eps)
                for p in with_grad:
                    cdtype = compute_dtype(p.dtype)
                    g = p.grad.detach()
                    g.copy_(g.to(cdtype) + coef.to(g.device, cdtype) * self._gv[p].to(cdtype))
        if not self._grads_finite(with_grad):
            return True
        base_step()
        return False

    # -- LookSAM state (checkpoints) ------------------------------------------------------------

    def looksam_state(self, params: list[Tensor]) -> dict:
        """g_v per param (None where none is stored), ||g_v||^2 and whether g_v is valid."""
        return {"gv": [self._gv.get(p) for p in params],
                "gv_sq_norm": self._gv_sq, "gv_valid": torch.tensor(self._gv_valid)}

    def load_looksam_state(self, params: list[Tensor], state: dict) -> None:
        self._gv = {p: gv.to(p.device, p.dtype).clone() for p, gv in zip(params, state["gv"])
                    if gv is not None}
        sq = state["gv_sq_norm"]
        self._gv_sq = None if sq is None else sq.to(params[0].device).clone()
        self._gv_valid = bool(state["gv_valid"]) and self._gv_sq is not None \
            and len(self._gv) == len(params)

    def release_gv(self) -> None:
        self._gv, self._gv_sq, self._gv_valid = {}, None, False

    def invalidate_gv(self) -> None:
        """LookSAM's g_v is not reused: reuse steps are base steps until the next full step
        (a no-op without LookSAM)."""
        self._gv_valid = False
